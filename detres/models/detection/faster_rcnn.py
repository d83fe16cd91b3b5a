"""Faster R-CNN assembly on a ResNet-C4 (Appendix A) or VGG-16 backbone: input transform, trunk, RPN, RoI heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from detres.models.backbones.backbone_config import trunk_from_config
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.box_head import BoxHead, FastRCNNPredictor
from detres.models.detection.context import ContextRoIHeads
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.roi_pooler import RoIPooler
from detres.models.detection.rpn import RegionProposalNetwork
from detres.models.detection.rpn_head import RPNHead
from detres.models.detection.transform import DetectorTransform

__all__ = ["FasterRCNN"]


class FasterRCNN(nn.Module):
    """Faster R-CNN with one shared stride-16 feature map (C4) used by both the RPN and the RoI heads.

    Args:
        trunk: images [B,3,H,W] (normalised) -> C4 features [B,C,H/16,W/16].
        rpn: ``RegionProposalNetwork``-like: (features, image_sizes, targets) -> (proposals, losses).
        roi_heads: ``RoIHeads``-like: (features, proposals, image_sizes, targets) -> (detections, losses).
        transform: the input / output transform (:class:`DetectorTransform`): the test-scale resize, the
            backbone's normalisation, padding, and boxes back in the input images' pixels.

    Inputs are 0..255 RGB float images [3,H,W] of any sizes. Training mode takes them at the scale the data
    pipeline resized them to and returns the dict of RPN and RoI-head losses; eval mode resizes each image to
    the test scale and returns per image a dict ``boxes`` [D,4] (the input image's pixels, clipped),
    ``scores`` [D], ``labels`` [D] (1..K).
    """

    def __init__(self, trunk: nn.Module, rpn: nn.Module, roi_heads: nn.Module, *, transform: DetectorTransform) -> None:
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.rpn = rpn
        self.roi_heads = roi_heads
        self._register_load_state_dict_pre_hook(_normalisation_in_transform)

    @classmethod
    def from_config(
        cls,
        model_cfg: Mapping[str, Any],
        *,
        input_cfg: Mapping[str, Any],
        num_classes: int,
        load_weights: bool = True,
        frozen_bn: bool = True,
        class_agnostic_bbox: bool = False,
    ) -> FasterRCNN:
        """The detector of a ``task: det`` config's ``model`` tree (and its ``input`` tree: the test scale of the
        transform); each part reads its own sub-tree.

        ``num_classes`` counts OBJECT classes K (``len(dataset.categories)``); the predictor adds background.
        ``load_weights``: initialise the backbone from ``model.weights`` (checked against the config, BN
        statistics included); False builds the same network for a checkpoint's state_dict to fill.
        ``frozen_bn`` (ResNet only): False keeps trainable BN, for from-scratch toys. With
        ``model.roi_heads.global_context`` the heads are :class:`ContextRoIHeads` (Appendix B), whose
        predictor takes ``[region | context]`` vectors.
        """
        if int(num_classes) < 1:
            raise ValueError(
                f"FasterRCNN: num_classes (object classes, background excluded) must be >= 1, got {num_classes}"
            )
        roi_cfg = model_cfg["roi_heads"]
        trunk, conv5_head, head_dim = trunk_from_config(
            model_cfg,
            pooler_resolution=int(roi_cfg["pooler_resolution"]),
            load_weights=load_weights,
            frozen_bn=frozen_bn,
        )
        anchor_generator = AnchorGenerator.from_config(model_cfg, stride=trunk.stride)
        rpn = RegionProposalNetwork.from_config(
            model_cfg["rpn"],
            anchor_generator=anchor_generator,
            head=RPNHead(trunk.out_channels, anchor_generator.num_anchors_per_location()),
        )
        heads_class = ContextRoIHeads if roi_cfg["global_context"] else RoIHeads
        roi_heads = heads_class.from_config(
            roi_cfg,
            pooler=RoIPooler.from_config(roi_cfg, spatial_scale=1.0 / trunk.stride),
            box_head=BoxHead(conv5_head, out_features=head_dim),
            predictor=FastRCNNPredictor.from_config(
                roi_cfg, in_features=head_dim, num_classes=int(num_classes) + 1, class_agnostic_bbox=class_agnostic_bbox
            ),
        )
        transform = DetectorTransform.from_config(model_cfg, input_cfg, load_weights=load_weights)
        return cls(trunk, rpn, roi_heads, transform=transform)

    def preprocess(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad images at their size into one batch [B,3,Hp,Wp] (:meth:`DetectorTransform.normalise`);
        returns it with the valid (h, w) of each image."""
        return self.transform.normalise(images, image_sizes)

    def _prepare(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None,
        image_sizes: Sequence[Sequence[int]] | None,
    ) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]] | None]:
        """Preprocessed batch, valid sizes, and the targets moved to the batch's device."""
        batch, sizes = self.preprocess(images, image_sizes)
        if targets is not None:
            if len(targets) != len(sizes):
                raise ValueError(f"FasterRCNN: got {len(targets)} targets for {len(sizes)} images")
            targets = [
                {k: (v.to(batch.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets
            ]
        return batch, sizes, targets

    def forward(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: dict of 4 losses (RPN cls/box, RoI cls/box). Eval: list of detection dicts in the pixels of
        the given images (each resized to the test scale on the way in, its boxes mapped back on the way out).

        Targets: per image "boxes" [N,4], "labels" [N] (1..K), optionally "crowd_boxes" [C,4]
        (regions whose anchors / proposals are ignored in training, see the RPN and RoI heads).
        """
        if self.training and targets is None:
            raise ValueError("FasterRCNN: targets are required in training mode")
        if not self.training:
            originals, resized = self.transform.to_test_scale(images, image_sizes)
            batch, sizes = self.transform.normalise(resized)
            return self.transform.postprocess(self.detect(batch, sizes), originals, resized)
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        features = self.trunk(batch)
        proposals, rpn_losses = self.rpn(features, sizes, targets)
        _, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        overlap = set(rpn_losses) & set(roi_losses)
        if overlap:
            raise ValueError(f"FasterRCNN: RPN and RoI heads both report losses named {sorted(overlap)}")
        return {**rpn_losses, **roi_losses}

    def detect(self, batch: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The eval forward from a normalised, padded batch [B,3,Hp,Wp] and each image's valid (h, w): trunk, RPN
        proposals, RoI heads' detections per image (input-image pixels). What export traces, with the sizes of a
        traced image (0-dim tensors): every step keeps them traced, so the exported model takes any image size."""
        features = self.trunk(batch)
        proposals, _ = self.rpn(features, image_sizes)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
        return detections

    # ------------------------------------------------------------- stage-wise passes (alternating training)
    def rpn_losses(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Trunk + RPN only: {"loss_rpn_cls", "loss_rpn_box"} (an RPN step of Ren et al.'s 4-step training).

        Needs training mode in the RPN; no proposals are made and the RoI heads are not run.
        """
        if not self.rpn.training:
            raise ValueError("FasterRCNN.rpn_losses: the RPN must be in training mode")
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        _, losses = self.rpn(self.trunk(batch), sizes, targets, compute_proposals=False)
        return losses

    @torch.no_grad()
    def propose(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        mode: str | None = "train",
    ) -> list[torch.Tensor]:
        """This network's RPN proposals per image (input-image pixels, detached), with the ``mode``
        ("train" / "test") top-n values: what a Fast R-CNN step of the 4-step training trains on."""
        batch, sizes, _ = self._prepare(images, None, image_sizes)
        return self.rpn.propose(self.trunk(batch), sizes, mode=mode)

    def detector_losses(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        proposals: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Trunk + RoI heads on fixed proposals: {"loss_cls", "loss_box_reg"} (a Fast R-CNN step).

        ``proposals``: per image [Ni,4] boxes in the same input-image pixels (e.g. another network's
        :meth:`propose`); None = this network's own RPN proposals ("train" top-n, no gradient), as in
        step 4, where the shared trunk and the RPN are frozen.
        """
        if not self.roi_heads.training:
            raise ValueError("FasterRCNN.detector_losses: the RoI heads must be in training mode")
        batch, sizes, targets = self._prepare(images, targets, image_sizes)
        features = self.trunk(batch)
        if proposals is None:
            proposals = self.rpn.propose(features.detach(), sizes, mode="train")
        elif len(proposals) != len(sizes):
            raise ValueError(f"FasterRCNN: got {len(proposals)} proposal sets for {len(sizes)} images")
        proposals = [p.detach().to(device=features.device, dtype=torch.float32) for p in proposals]
        _, losses = self.roi_heads(features, proposals, sizes, targets)
        return losses


def _normalisation_in_transform(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """State dicts that keep the normalisation buffers at the detector's top level load into its transform."""
    for name in ("pixel_mean", "pixel_std"):
        if prefix + name in state_dict and prefix + "transform." + name not in state_dict:
            state_dict[prefix + "transform." + name] = state_dict.pop(prefix + name)
