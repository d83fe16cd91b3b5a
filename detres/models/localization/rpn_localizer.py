"""The RPN stage of the ImageNet localizer (Appendix C): a ResNet conv1..conv4 trunk + the per-class RPN."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detres.config.load import ConfigError, config_from_tree
from detres.models.backbones.backbone_config import backbone_normalization, check_backbone_checkpoint
from detres.models.backbones.resnet_c4 import build_resnet_c4
from detres.models.backbones.weights import check_backbone_bn_statistics
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.rpn_head import RPNHead
from detres.models.localization.per_class_rpn import PerClassRPN
from detres.utils.torch_files import load_checkpoint

__all__ = ["RPNLocalizer", "load_localizer", "localizer_backbone", "rebuild_localizer"]


class RPNLocalizer(nn.Module):
    """Normalise 0..255 RGB images, run the C4 trunk (stride 16, frozen BN) and the :class:`PerClassRPN`.

    ``forward(images [B,3,H,W], targets)`` returns the training losses; :meth:`class_boxes` gives, per image
    and requested class, the class's top regressed anchors (boxes in the input's pixels) and their scores.
    """

    def __init__(self, trunk: nn.Module, rpn: PerClassRPN, *, pixel_mean: Sequence[float], pixel_std: Sequence[float]):
        super().__init__()
        self.trunk, self.rpn = trunk, rpn
        self.register_buffer("pixel_mean", torch.as_tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.as_tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

    @classmethod
    def from_config(
        cls, model_cfg: Mapping[str, Any], *, num_classes: int, load_weights: bool = True, frozen_bn: bool = True
    ) -> RPNLocalizer:
        """The RPN-stage localizer of a ``task: loc`` config's ``model`` tree (K = ``num_classes`` per-class outputs).

        ``load_weights``: initialise the trunk from ``model.weights`` (checked first); False builds the same network
        for a checkpoint's state_dict. The per-class RPN reads ``model.rpn``; its ``allowed_border`` = -1 (the
        default) keeps cross-boundary anchors: in a 224 crop most objects touch the border.
        """
        weights, mean, std = localizer_backbone(model_cfg, load_weights=load_weights)
        trunk, _head, _ = build_resnet_c4(
            int(model_cfg["depth"]),
            weights_path=weights,
            freeze_at=int(model_cfg["freeze_at"]),
            stride_in_1x1=bool(model_cfg["stride_in_1x1"]),
            frozen_bn=frozen_bn,
            base_width=int(model_cfg["base_width"]),
        )
        anchors = AnchorGenerator.from_config(model_cfg, stride=trunk.stride)
        head = RPNHead(trunk.out_channels, anchors.num_anchors_per_location(), num_classes=int(num_classes))
        rpn = PerClassRPN.from_config(model_cfg["rpn"], anchor_generator=anchors, head=head)
        return cls(trunk, rpn, pixel_mean=mean, pixel_std=std)

    @property
    def num_classes(self) -> int:
        return self.rpn.head.num_classes

    def features(self, images: Tensor) -> Tensor:
        return self.trunk((images.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std)

    def forward(self, images: Tensor, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Training losses {"loss_rpn_cls", "loss_rpn_box"} of a batch of same-size crops."""
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.rpn(self.features(images), sizes, targets)[1]

    @torch.no_grad()
    def class_boxes(
        self, image: Tensor, classes: Sequence[int], *, top_n: int = 200, nms_thresh: float | None = None
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """One image [3,H,W] (fully convolutional: any size) -> {class: (boxes [n,4], scores [n])}, best first."""
        size = [tuple(image.shape[-2:])]
        return self.rpn.class_boxes(
            self.features(image[None]), size, [list(classes)], top_n=top_n, nms_thresh=nms_thresh
        )[0]


def localizer_backbone(
    model_cfg: Mapping[str, Any], *, load_weights: bool
) -> tuple[str | None, list[float], list[float]]:
    """What both localizer stages take from a ``task: loc`` config's ``model`` tree: the train_cls checkpoint to
    load (checked: architecture, recomputed BN; None when not loading) and the normalisation it was trained with."""
    weights = model_cfg["weights"] if load_weights else None
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model.weights: backbone checkpoint not found: {weights}")
        check_backbone_checkpoint(weights, model_cfg)
        # Appendix A/C: BN statistics recomputed after pre-training, then frozen (as for the detector)
        check_backbone_bn_statistics(weights, allow_unrecomputed_bn=bool(model_cfg["allow_unrecomputed_bn"]))
    mean, std = backbone_normalization(weights or None)
    return weights or None, mean, std


def load_localizer(
    path: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[RPNLocalizer, dict[str, Any]]:
    """Rebuild a train_loc checkpoint's localizer (eval mode); returns (model, metadata incl. synsets, config)."""
    return rebuild_localizer(path, network=RPNLocalizer, stage="rpn", device=device)


def rebuild_localizer(
    path: str | os.PathLike, *, network: type[nn.Module], stage: str, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The one rebuild path of both localizer stages: the ``stage`` ("rpn" / "rcnn") checkpoint's ``network`` from
    its config tree (``network.from_config``, the backbone file is not read) and weights, in eval mode; returns
    (model, metadata incl. config and iter)."""
    state = load_checkpoint(path)
    names = {"rpn": "RPN", "rcnn": "R-CNN"}
    missing = [key for key in ("model", "config", "meta") if key not in state]
    if missing or state.get("stage") != stage:
        raise ValueError(
            f"{path}: not a train_loc {names[stage]}-stage checkpoint (missing {missing or [f'stage={stage}']})"
        )
    try:
        cfg = config_from_tree(state["config"], task="loc")
    except ConfigError as exc:
        raise ValueError(f"{path}: its config: {exc}") from None
    synsets = state["meta"].get("synsets") if isinstance(state["meta"], Mapping) else None
    if not isinstance(synsets, (list, tuple)) or not synsets:
        raise ValueError(f"{path}: meta.synsets is missing or empty; a train_loc checkpoint records its classes")
    model = network.from_config(cfg.model, num_classes=len(synsets), load_weights=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), dict(state["meta"], config=state["config"], iter=state.get("iter"))
