"""The per-region layers of Fast R-CNN on a C4 trunk: the box head (conv5_x or fc6/fc7 + pooling) and the sibling
predictor (class scores, per-class box deltas)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from detres.models.backbones.cpu_execution import CHANNELS_LAST_MIN_SIZE

__all__ = ["BoxHead", "FastRCNNPredictor"]


class BoxHead(nn.Module):
    """Post-RoI layers: run the per-region network (conv5_x + pooling) and return one vector per RoI.

    Args:
        conv5_head: module mapping [R,C,S,S] -> [R,D] or [R,D,1,1] (e.g. ResNetC5Head); the
            same instance can be applied to any RoI set (regions, whole-image context box).
        out_features: D; read from ``conv5_head.out_channels`` when omitted.
    """

    def __init__(self, conv5_head: nn.Module, *, out_features: int | None = None) -> None:
        super().__init__()
        if out_features is None:
            out_features = getattr(conv5_head, "out_channels", None)
        if out_features is None:
            raise ValueError("BoxHead: pass out_features or give conv5_head an 'out_channels' attribute")
        self.conv5_head = conv5_head
        self.out_features = int(out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[R,C,S,S] pooled RoI features -> [R,D] region vectors."""
        if pooled.dim() != 4:
            raise ValueError(f"BoxHead: pooled features must be [R,C,S,S], got {tuple(pooled.shape)}")
        if pooled.device.type == "cpu" and min(pooled.shape[2:]) >= CHANNELS_LAST_MIN_SIZE:
            # oneDNN's convolutions (forward and backward) run faster on channels-last maps of this size;
            # a no-op for the fast RoI pool's output, which already is channels-last.
            pooled = pooled.contiguous(memory_format=torch.channels_last)
        out = self.conv5_head(pooled)
        if out.dim() == 4:
            if out.shape[2:] != (1, 1):
                raise ValueError(f"BoxHead: conv5_head returned a spatial map {tuple(out.shape)}; pool it first")
            out = out.flatten(1)
        if out.dim() != 2 or out.shape[1] != self.out_features:
            raise ValueError(f"BoxHead: conv5_head output must be [R,{self.out_features}], got {tuple(out.shape)}")
        return out


class FastRCNNPredictor(nn.Module):
    """The two sibling layers: class scores (K+1 incl. background) and per-class box deltas.

    Args:
        in_features: region vector size D.
        num_classes: K+1, background included.
        class_agnostic_bbox: one shared box regressor (4 outputs) instead of 4(K+1).
    """

    def __init__(self, in_features: int, num_classes: int, *, class_agnostic_bbox: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"FastRCNNPredictor: num_classes counts background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_agnostic_bbox = bool(class_agnostic_bbox)
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic_bbox else 4 * num_classes)
        # Fast R-CNN initialisation: small Gaussians, zero biases.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    @classmethod
    def from_config(
        cls, roi_cfg: Mapping[str, Any], *, in_features: int, num_classes: int, class_agnostic_bbox: bool = False
    ) -> FastRCNNPredictor:
        """The predictor of a ``model.roi_heads`` tree: with ``global_context`` it takes ``[region | context]``
        vectors, twice the box head's ``in_features`` (Appendix B)."""
        width = 2 * int(in_features) if roi_cfg["global_context"] else int(in_features)
        return cls(width, num_classes, class_agnostic_bbox=class_agnostic_bbox)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[R,D] -> (class_logits [R,K+1], box_deltas [R,4(K+1)] or [R,4] if class-agnostic)."""
        if x.dim() > 2:
            x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)
