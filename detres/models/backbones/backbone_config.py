"""The pre-trained backbone a detector or localizer starts from: which network, whether a train_cls checkpoint fits
the config, the normalisation it was trained with, and the C4 trunk built from a ``model`` config tree."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from detres.models.backbones.resnet_c4 import build_resnet_c4
from detres.models.backbones.vgg16_split import build_vgg16_c4
from detres.utils.torch_files import load_checkpoint

__all__ = [
    "DETECTOR_BACKBONES",
    "PAPER_VGG_SIZE",
    "backbone_name",
    "backbone_normalization",
    "check_backbone_checkpoint",
    "model_normalization",
    "trunk_from_config",
]

DETECTOR_BACKBONES = {"resnet": "imagenet", "vgg16": "vgg16"}  # model.backbone -> the train_cls model.arch it takes
PAPER_VGG_SIZE = {"width": 64, "hidden": 4096}  # what a VGG-16 checkpoint recording no size holds


def backbone_name(model_cfg: Mapping[str, Any]) -> str:
    """``model.backbone`` ("resnet" for a ``task: loc`` tree, which has no such key: the localizer is a ResNet)."""
    backbone = str(model_cfg.get("backbone", "resnet"))
    if backbone not in DETECTOR_BACKBONES:
        raise ValueError(f"model.backbone must be one of {sorted(DETECTOR_BACKBONES)}, got {backbone!r}")
    return backbone


def check_backbone_checkpoint(weights: str | os.PathLike, model_cfg: Mapping[str, Any]) -> None:
    """A train_cls checkpoint records its architecture (``model_args``): refuse a config that asks for another one.

    Files recording nothing (torchvision state_dicts) are accepted; the backbone loader checks their tensors.
    """
    state = load_checkpoint(weights, mmap=True)  # metadata only: the tensors are mapped, not read
    saved = (state.get("model_args") if isinstance(state, Mapping) else None) or {}
    if not saved:
        return
    backbone, arch = backbone_name(model_cfg), saved.get("arch", "imagenet")
    if arch != DETECTOR_BACKBONES[backbone] and "backbone" not in model_cfg:  # a localizer: ResNets only
        raise ValueError(
            f"{weights}: model.arch={arch!r}; the localizer needs an ImageNet ResNet (train_cls model.arch=imagenet)"
        )
    if arch != DETECTOR_BACKBONES[backbone]:
        if arch not in DETECTOR_BACKBONES.values():
            raise ValueError(
                f"{weights}: a model.arch={arch!r} network cannot be a detection backbone; pre-train with "
                "model.arch=imagenet (model.backbone=resnet) or vgg16 (model.backbone=vgg16)"
            )
        raise ValueError(
            f"{weights} holds a model.arch={arch!r} network but the config sets model.backbone={backbone!r}; "
            f"use model.backbone={'vgg16' if arch == 'vgg16' else 'resnet'} or another checkpoint"
        )
    if backbone == "vgg16":
        if saved.get("batch_norm"):
            raise ValueError(
                f"{weights} holds a VGG-16 with batch_norm=True; the detection backbone is the "
                "paper's VGG-16 without BN (pre-train with model.batch_norm=false)"
            )
        for key, option in (("width", "vgg_width"), ("hidden", "vgg_hidden")):
            found, wanted = int(saved.get(key, PAPER_VGG_SIZE[key])), int(model_cfg[option])
            if found != wanted:
                raise ValueError(
                    f"{weights} holds a VGG-16 with {key}={found} but the config sets model.{option}={wanted}"
                )
        return  # depth / base_width / stride options are ResNet ones
    for key in ("depth", "base_width", "stride_in_1x1"):
        if key in saved and saved[key] != model_cfg[key]:
            raise ValueError(
                f"{weights} holds a backbone with {key}={saved[key]!r} but the config sets "
                f"model.{key}={model_cfg[key]!r}"
            )


def backbone_normalization(weights: str | os.PathLike | None) -> tuple[list[float], list[float]]:
    """The per-channel RGB mean / std (0..255) the backbone was trained with.

    A train_cls checkpoint records its training-set channel mean (also when it subtracted a per-pixel mean
    image: a fully-convolutional network sees images of any size) and its std if it divided by one (else
    [1, 1, 1], the papers' mean subtraction only). Any other file, and a randomly initialised backbone
    (``weights`` None), get torchvision's ImageNet mean and std, which torchvision-format weights were
    trained with.
    """
    if weights:
        state = load_checkpoint(weights, mmap=True)
        stats = state.get("data_stats") if isinstance(state, Mapping) else None
        if "model" in state and isinstance(stats, Mapping):
            mean = stats.get("fixed_mean") or [float(v) for v in stats["channel_mean"]]
            std = stats.get("std") or [1.0, 1.0, 1.0]
            return [float(v) for v in mean], [float(v) for v in std]
    return list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB)


def model_normalization(model_cfg: Mapping[str, Any], *, load_weights: bool = True) -> tuple[list[float], list[float]]:
    """``model.pixel_mean`` / ``model.pixel_std`` where set, else :func:`backbone_normalization` of ``model.weights``
    (not read when ``load_weights`` is False: a rebuilt network gets its statistics from its state_dict)."""
    mean, std = backbone_normalization(model_cfg["weights"] if load_weights else None)
    if model_cfg["pixel_mean"] is not None:
        mean = [float(v) for v in model_cfg["pixel_mean"]]
    if model_cfg["pixel_std"] is not None:
        std = [float(v) for v in model_cfg["pixel_std"]]
    return mean, std


def _checked_weights(model_cfg: Mapping[str, Any], *, load_weights: bool, frozen_bn: bool) -> str | None:
    """``model.weights`` to load (None: random init, or a rebuild whose weights come from its own checkpoint).
    A missing file is left to the trunk builder, whose error names it."""
    weights = model_cfg["weights"] if load_weights else None
    if not weights:
        return None
    if not os.path.isfile(weights):
        return str(weights)
    check_backbone_checkpoint(weights, model_cfg)
    if backbone_name(model_cfg) == "resnet" and frozen_bn:
        from detres.models.backbones.weights import check_backbone_bn_statistics

        # Appendix A: BN statistics recomputed on the training set after pre-training, then frozen
        check_backbone_bn_statistics(weights, allow_unrecomputed_bn=bool(model_cfg["allow_unrecomputed_bn"]))
    return str(weights)


def trunk_from_config(
    model_cfg: Mapping[str, Any], *, pooler_resolution: int, load_weights: bool = True, frozen_bn: bool = True
) -> tuple[nn.Module, nn.Module, int]:
    """(C4 trunk, per-region head, region vector size) of ``model.backbone`` from a ``model`` config tree.

    ``load_weights``: read ``model.weights`` (checked against the config first); False builds the same
    network randomly initialised, for a checkpoint's own state_dict to fill. ``pooler_resolution``: the
    RoI grid the head takes (VGG-16's fc6 needs 7). ``frozen_bn`` (ResNet): False keeps trainable BN (from-scratch
    toys; the BN-statistics check is then skipped). VGG-16 has no BN.
    """
    weights = _checked_weights(model_cfg, load_weights=load_weights, frozen_bn=frozen_bn)
    if backbone_name(model_cfg) == "vgg16":
        return build_vgg16_c4(
            weights_path=weights,
            freeze_at=int(model_cfg["freeze_at"]),
            pooler_resolution=int(pooler_resolution),
            width=int(model_cfg["vgg_width"]),
            hidden=int(model_cfg["vgg_hidden"]),
        )
    return build_resnet_c4(
        int(model_cfg["depth"]),
        weights_path=weights,
        freeze_at=int(model_cfg["freeze_at"]),
        stride_in_1x1=bool(model_cfg["stride_in_1x1"]),
        frozen_bn=frozen_bn,
        base_width=int(model_cfg["base_width"]),
    )
