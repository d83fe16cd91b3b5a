"""The RPN stage of the ImageNet localizer (Appendix C): a ResNet conv1..conv4 trunk + the per-class RPN."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detres.models.backbones.resnet_c4 import build_resnet_c4
from detres.models.backbones.weights import check_backbone_bn_statistics
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.rpn import RPNHead
from detres.models.localization.per_class_rpn import PerClassRPN
from detres.utils.torch_files import load_checkpoint

__all__ = [
    "RPNLocalizer",
    "backbone_normalization",
    "build_rpn_localizer",
    "check_loc_backbone",
    "load_localizer",
    "rpn_localizer_kwargs_from_config",
]


class RPNLocalizer(nn.Module):
    """Normalise 0..255 RGB images, run the C4 trunk (stride 16, frozen BN) and the :class:`PerClassRPN`.

    ``forward(images [B,3,H,W], targets)`` returns the training losses; :meth:`class_boxes` gives, per image
    and requested class, the class's top regressed anchors (boxes in the input's pixels) and their scores.
    """

    def __init__(
        self,
        trunk: nn.Module,
        rpn: PerClassRPN,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.trunk, self.rpn = trunk, rpn
        self.register_buffer("pixel_mean", torch.as_tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.as_tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

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


def build_rpn_localizer(
    *,
    num_classes: int,
    depth: int = 101,
    base_width: int = 64,
    stride_in_1x1: bool = False,
    weights_path: str | os.PathLike | None = None,
    freeze_at: int = 2,
    frozen_bn: bool = True,
    pixel_mean: Sequence[float] = IMAGENET_MEAN_RGB,
    pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
    anchor_sizes: Sequence[float] = (64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    batch_size_per_image: int = 8,
    positive_fraction: float = 0.5,
    pre_nms_top_n_test: int = 6000,
    nms_thresh: float = 0.7,
    allowed_border: float = -1,
) -> RPNLocalizer:
    """An :class:`RPNLocalizer` from explicit arguments (those of :func:`rpn_localizer_kwargs_from_config`).

    ``weights_path``: a train_cls checkpoint of an ImageNet ResNet (its fc is not used); None = random init.
    ``batch_size_per_image`` = 8 and ``positive_fraction`` = 0.5 are the paper's 8 anchors sampled 1:1.
    ``allowed_border`` = -1 keeps cross-boundary anchors: in a 224 crop (or a 56 one) most objects touch the
    border, and ignoring the anchors that cross it would leave few positives for large objects.
    """
    trunk, _head, _ = build_resnet_c4(
        int(depth),
        weights_path=weights_path,
        freeze_at=int(freeze_at),
        stride_in_1x1=bool(stride_in_1x1),
        frozen_bn=bool(frozen_bn),
        base_width=int(base_width),
    )
    anchors = AnchorGenerator(
        sizes=[float(s) for s in anchor_sizes], aspect_ratios=[float(r) for r in aspect_ratios], stride=trunk.stride
    )
    head = RPNHead(trunk.out_channels, anchors.num_anchors_per_location(), num_classes=int(num_classes))
    rpn = PerClassRPN(
        anchors,
        head,
        fg_iou_thresh=float(fg_iou_thresh),
        bg_iou_thresh=float(bg_iou_thresh),
        batch_size_per_image=int(batch_size_per_image),
        positive_fraction=float(positive_fraction),
        pre_nms_top_n_test=int(pre_nms_top_n_test),
        nms_thresh=float(nms_thresh),
        allowed_border=float(allowed_border),
    )
    return RPNLocalizer(trunk, rpn, pixel_mean=pixel_mean, pixel_std=pixel_std)


def backbone_normalization(weights: str | os.PathLike | None) -> tuple[list[float], list[float]]:
    """The per-channel mean/std (0..255) a train_cls backbone was trained with; ImageNet's for other files.

    A checkpoint trained with a per-pixel mean image records its channel mean too; a fully-convolutional
    localizer sees images of any size, so (as the detector does) it subtracts the channel mean.
    """
    if weights is None:
        return list(IMAGENET_MEAN_RGB), [1.0, 1.0, 1.0]
    state = load_checkpoint(weights, mmap=True)
    stats = state.get("data_stats") if isinstance(state, dict) else None
    if isinstance(stats, dict) and "model" in state:
        mean = stats.get("fixed_mean") or [float(v) for v in stats["channel_mean"]]
        std = stats.get("std") or [1.0, 1.0, 1.0]
        return [float(v) for v in mean], [float(v) for v in std]
    return list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB)


def check_loc_backbone(weights: str, model_cfg: Mapping[str, Any]) -> None:
    """A train_cls checkpoint records its architecture: refuse a config asking for another one."""
    saved = load_checkpoint(weights, mmap=True).get("model_args") or {}
    if saved.get("arch", "imagenet") != "imagenet":
        raise ValueError(
            f"{weights}: model.arch={saved['arch']!r}; the localizer needs an ImageNet ResNet "
            "(train_cls model.arch=imagenet)"
        )
    for key in ("depth", "base_width", "stride_in_1x1"):
        if key in saved and saved[key] != model_cfg[key]:
            raise ValueError(
                f"{weights} holds a backbone with {key}={saved[key]!r} but the config sets "
                f"model.{key}={model_cfg[key]!r}"
            )


def loc_backbone_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone arguments both localizer stages take from a ``task: loc`` config's ``model`` tree, after
    checking the train_cls checkpoint (architecture, recomputed BN) and reading its normalisation."""
    weights = model_cfg["weights"]
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model.weights: backbone checkpoint not found: {weights}")
        check_loc_backbone(weights, model_cfg)
        # Appendix A/C: BN statistics recomputed after pre-training, then frozen (as for the detector)
        check_backbone_bn_statistics(weights, allow_unrecomputed_bn=bool(model_cfg["allow_unrecomputed_bn"]))
    mean, std = backbone_normalization(weights or None)
    return {
        "depth": int(model_cfg["depth"]),
        "base_width": int(model_cfg["base_width"]),
        "stride_in_1x1": bool(model_cfg["stride_in_1x1"]),
        "weights_path": weights or None,
        "freeze_at": int(model_cfg["freeze_at"]),
        "pixel_mean": mean,
        "pixel_std": std,
    }


def rpn_localizer_kwargs_from_config(model_cfg: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Explicit arguments of :func:`build_rpn_localizer` from a ``task: loc`` config's ``model`` tree."""
    rpn = model_cfg["rpn"]
    return {
        "num_classes": int(num_classes),
        **loc_backbone_kwargs(model_cfg),
        "anchor_sizes": [float(s) for s in model_cfg["anchor_sizes"]],
        "aspect_ratios": [float(r) for r in model_cfg["aspect_ratios"]],
        **{
            key: rpn[key]
            for key in (
                "fg_iou_thresh",
                "bg_iou_thresh",
                "batch_size_per_image",
                "positive_fraction",
                "pre_nms_top_n_test",
                "nms_thresh",
                "allowed_border",
            )
        },
    }


def load_localizer(
    path: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[RPNLocalizer, dict[str, Any]]:
    """Rebuild a train_loc checkpoint's localizer (eval mode); returns (model, metadata incl. synsets, config)."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "model_args", "meta") if key not in state]
    if missing or state.get("stage") != "rpn":
        raise ValueError(f"{path}: not a train_loc RPN-stage checkpoint (missing {missing or ['stage=rpn']})")
    model = build_rpn_localizer(**dict(state["model_args"], weights_path=None))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), dict(state["meta"], config=state.get("config"), iter=state.get("iter"))
