"""Config → keyword arguments → models: the only place that reads model options from a Config; and back
from a checkpoint's stored arguments to a trained model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from detres.models.backbones.alexnet import alexnet
from detres.models.backbones.resnet import build_cifar_resnet, build_resnet
from detres.models.backbones.vgg import vgg16
from detres.utils.torch_files import load_checkpoint

CLASSIFIER_ARCHS = ("imagenet", "cifar", "vgg16", "alexnet")
FIXED_DEPTH = {"vgg16": 16, "alexnet": 8}  # weight layers: 13 conv + 3 fc; 5 conv + 3 fc
DEFAULT_VGG_SIZE = {"width": 64, "hidden": 4096}  # the paper's VGG-16 (checkpoints older than the options)


def _vgg_size_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """``width``/``hidden`` of a narrower VGG-16; the paper's 64/4096 record nothing (as checkpoints before the
    options), so a full-size VGG-16's ``model_args`` are unchanged."""
    sizes = {"width": int(model_cfg["vgg_width"]), "hidden": int(model_cfg["vgg_hidden"])}
    return {key: value for key, value in sizes.items() if value != DEFAULT_VGG_SIZE[key]}


def classifier_kwargs_from_config(model_cfg: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """The explicit arguments of :func:`build_classifier` (also stored in checkpoints as ``model_args``).

    VGG-16 and AlexNet record their fixed depth (16, and AlexNet's eight learned layers) so that every
    checkpoint names ``arch`` and ``depth``; ``model.depth`` is not read for them.
    """
    arch = model_cfg["arch"]
    if arch in FIXED_DEPTH:
        kwargs = {
            "arch": arch,
            "depth": FIXED_DEPTH[arch],
            "num_classes": int(num_classes),
            "dropout": float(model_cfg["dropout"]),
        }
        if arch == "vgg16":
            kwargs["batch_norm"] = bool(model_cfg["batch_norm"])
            kwargs.update(_vgg_size_kwargs(model_cfg))
        else:
            kwargs["groups"] = int(model_cfg["groups"])
        return kwargs
    kwargs = {
        "arch": arch,
        "depth": int(model_cfg["depth"]),
        "num_classes": int(num_classes),
        "shortcut": model_cfg["shortcut"],
        "plain": bool(model_cfg["plain"]),
        "zero_init_residual": bool(model_cfg["zero_init_residual"]),
    }
    if arch == "imagenet":
        kwargs["stride_in_1x1"] = bool(model_cfg["stride_in_1x1"])
        kwargs["base_width"] = int(model_cfg["base_width"])
    return kwargs


def build_classifier(*, arch: str = "imagenet", depth: int = 50, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """An ImageNet (Table 1) or CIFAR (6n+2) ResNet, VGG-16 or AlexNet classifier from explicit arguments."""
    if arch == "imagenet":
        return build_resnet(depth, num_classes=num_classes, **kwargs)
    if arch == "cifar":
        kwargs.pop("stride_in_1x1", None)  # CIFAR nets have no bottlenecks
        return build_cifar_resnet(depth, num_classes=num_classes, **kwargs)
    if arch in FIXED_DEPTH:
        if depth != FIXED_DEPTH[arch]:
            raise ValueError(f"model.arch={arch!r} has depth {FIXED_DEPTH[arch]}, got depth={depth!r}")
        return (vgg16 if arch == "vgg16" else alexnet)(num_classes=num_classes, **kwargs)
    raise ValueError(f"model.arch must be one of {CLASSIFIER_ARCHS}, got {arch!r}")


DETECTOR_BACKBONES = {"resnet": "imagenet", "vgg16": "vgg16"}  # model.backbone -> the train_cls model.arch it takes


def _backbone_name(model_cfg: Mapping[str, Any]) -> str:
    """``model.backbone`` ("resnet" when absent, e.g. a config tree older than the option)."""
    backbone = str(model_cfg.get("backbone", "resnet"))
    if backbone not in DETECTOR_BACKBONES:
        raise ValueError(f"model.backbone must be one of {sorted(DETECTOR_BACKBONES)}, got {backbone!r}")
    return backbone


def _check_backbone_args(saved: Mapping[str, Any] | None, model_cfg: Mapping[str, Any], weights: str) -> None:
    """A train_cls checkpoint records its architecture: refuse a config that asks for another one."""
    if not saved:
        return
    backbone, arch = _backbone_name(model_cfg), saved.get("arch", "imagenet")
    if arch != DETECTOR_BACKBONES[backbone]:
        if arch not in DETECTOR_BACKBONES.values():
            raise ValueError(
                f"{weights}: a model.arch={arch!r} network cannot be a detection backbone; "
                "pre-train with model.arch=imagenet (model.backbone=resnet) or vgg16 "
                "(model.backbone=vgg16)"
            )
        raise ValueError(
            f"{weights} holds a model.arch={arch!r} network but the config sets "
            f"model.backbone={backbone!r}; use model.backbone="
            f"{'vgg16' if arch == 'vgg16' else 'resnet'} or another checkpoint"
        )
    if backbone == "vgg16":
        if saved.get("batch_norm"):
            raise ValueError(
                f"{weights} holds a VGG-16 with batch_norm=True; the detection backbone is the "
                "paper's VGG-16 without BN (pre-train with model.batch_norm=false)"
            )
        for key, option in (("width", "vgg_width"), ("hidden", "vgg_hidden")):
            found, wanted = saved.get(key, DEFAULT_VGG_SIZE[key]), model_cfg.get(option, DEFAULT_VGG_SIZE[key])
            if int(found) != int(wanted):
                raise ValueError(
                    f"{weights} holds a VGG-16 with {key}={int(found)} but the config sets model.{option}={int(wanted)}"
                )
        return  # depth / base_width / stride options are ResNet ones
    for key in ("depth", "base_width", "stride_in_1x1"):
        if key in saved and saved[key] != model_cfg[key]:
            raise ValueError(
                f"{weights} holds a backbone with {key}={saved[key]!r} but the config sets "
                f"model.{key}={model_cfg[key]!r}"
            )


def _backbone_normalisation(model_cfg: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The mean/std the backbone was trained with: our checkpoint's statistics, else ImageNet's.

    A train_cls checkpoint records the training-set channel mean (and std if it divided by one);
    torchvision-format and legacy CIFAR weights were trained with torchvision's ImageNet mean/std.
    """
    from detres.data.transforms.imagenet_stats import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    weights = model_cfg["weights"]
    if weights:
        state = load_checkpoint(weights, mmap=True)  # metadata only: the weights are read once, by the backbone
        _check_backbone_args(state.get("model_args"), model_cfg, weights)
        stats = state.get("data_stats")
        if "model" in state and isinstance(stats, dict):
            mean = stats.get("fixed_mean") or [float(v) for v in stats["channel_mean"]]
            std = stats.get("std") or [1.0, 1.0, 1.0]
            return [float(v) for v in mean], [float(v) for v in std]
    return list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB)


def detector_kwargs_from_config(model_cfg: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Explicit arguments of :func:`detres.models.detection.faster_rcnn.build_faster_rcnn` (stored as ``model_args``).

    ``num_classes`` counts object classes only (background is added by the predictor). With
    ``model.backbone: vgg16`` the ResNet options (depth, base_width, stride_in_1x1) are stored but unused,
    and with ``resnet`` the VGG ones (vgg_width, vgg_hidden).
    """
    _backbone_name(model_cfg)  # a typo fails here, before any checkpoint is read
    mean, std = _backbone_normalisation(model_cfg)
    if model_cfg["pixel_mean"] is not None:
        mean = [float(v) for v in model_cfg["pixel_mean"]]
    if model_cfg["pixel_std"] is not None:
        std = [float(v) for v in model_cfg["pixel_std"]]
    rpn, roi = model_cfg["rpn"], model_cfg["roi_heads"]
    kwargs: dict[str, Any] = {
        # Absent from checkpoints written before it existed: build_faster_rcnn's default ("resnet").
        "backbone": _backbone_name(model_cfg),
        "depth": int(model_cfg["depth"]),
        "num_classes": int(num_classes),
        "weights_path": model_cfg["weights"],
        "freeze_at": int(model_cfg["freeze_at"]),
        "allow_unrecomputed_bn": bool(model_cfg["allow_unrecomputed_bn"]),
        "stride_in_1x1": bool(model_cfg["stride_in_1x1"]),
        "base_width": int(model_cfg["base_width"]),
        # Absent from checkpoints (and config trees) older than the options: the paper's 64 and 4096.
        "vgg_width": int(model_cfg.get("vgg_width", DEFAULT_VGG_SIZE["width"])),
        "vgg_hidden": int(model_cfg.get("vgg_hidden", DEFAULT_VGG_SIZE["hidden"])),
        "pixel_mean": mean,
        "pixel_std": std,
        "anchor_sizes": [float(s) for s in model_cfg["anchor_sizes"]],
        "aspect_ratios": [float(r) for r in model_cfg["aspect_ratios"]],
        "pooler_type": roi["pooler_type"],
        "pooler_resolution": int(roi["pooler_resolution"]),
        "sampling_ratio": int(roi["sampling_ratio"]),
        "bbox_reg_weights": [float(w) for w in roi["bbox_reg_weights"]],
        "score_thresh": float(roi["score_thresh"]),
        "nms_thresh": float(roi["nms_thresh"]),
        "detections_per_img": int(roi["detections_per_img"]),
        "nms_method": str(roi["nms_method"]),
        "soft_nms_sigma": float(roi["soft_nms_sigma"]),
        "soft_nms_score_thresh": float(roi["soft_nms_score_thresh"]),
        "box_voting": bool(roi["box_voting"]),
        "box_voting_iou": float(roi["box_voting_iou"]),
        # Absent from checkpoints written before it existed: build_faster_rcnn's default (no context).
        "global_context": bool(roi["global_context"]),
    }
    kwargs.update({f"rpn_{key}": value for key, value in rpn.items()})
    for key in (
        "fg_iou_thresh",
        "bg_iou_thresh_hi",
        "bg_iou_thresh_lo",
        "batch_size_per_image",
        "positive_fraction",
        "crowd_iof_thresh",
    ):
        kwargs[f"roi_{key}"] = roi[key]
    return kwargs


# Test-time post-processing arguments of RoIHeads (absent from checkpoints written before they existed:
# those rebuild with the defaults, i.e. the paper's hard NMS without voting).
POSTPROCESS_KEYS = ("nms_method", "soft_nms_sigma", "soft_nms_score_thresh", "box_voting", "box_voting_iou")


def configure_postprocess(model: nn.Module, **options: Any) -> nn.Module:
    """Set the RoI heads' test-time post-processing (keys of ``POSTPROCESS_KEYS``; None = leave as is)."""
    from detres.models.detection.postprocess import check_postprocess_options

    unknown = sorted(set(options) - set(POSTPROCESS_KEYS))
    if unknown:
        raise ValueError(f"configure_postprocess: unknown options {unknown}; expected {list(POSTPROCESS_KEYS)}")
    heads = model.roi_heads
    merged = {key: getattr(heads, key) for key in POSTPROCESS_KEYS}
    merged.update({key: value for key, value in options.items() if value is not None})
    check_postprocess_options(**{k: v for k, v in merged.items() if k != "box_voting"})
    casts = {
        "nms_method": str,
        "soft_nms_sigma": float,
        "soft_nms_score_thresh": float,
        "box_voting": bool,
        "box_voting_iou": float,
    }
    for key, value in merged.items():
        setattr(heads, key, casts[key](value))
    return model


def build_detector(**kwargs: Any) -> nn.Module:
    """A ResNet-C4 or VGG-16 Faster R-CNN from the explicit arguments of :func:`detector_kwargs_from_config`."""
    from detres.models.detection.faster_rcnn import build_faster_rcnn

    post = {key: kwargs.pop(key) for key in POSTPROCESS_KEYS if key in kwargs}
    return configure_postprocess(build_faster_rcnn(**kwargs), **post)


def load_detector(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained detector from a train_det checkpoint; returns (model in eval mode, metadata)."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "model_args", "meta") if key not in state]
    if missing:
        hint = " (a train_cls checkpoint? use it as model.weights)" if "data_stats" in state else ""
        raise ValueError(f"{path}: not a train_det checkpoint (missing {missing}){hint}")
    _check_detector_record(path, state["model_args"], state["meta"])
    model = build_detector(**dict(state["model_args"], weights_path=None))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # torch lists every mismatched tensor over many lines
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path}: 'model' weights do not fit its 'model_args': {first}") from None
    return model.to(device).eval(), dict(state["meta"], config=state.get("config"))


def _check_detector_record(path: str | os.PathLike, model_args: Any, meta: Any) -> None:
    """One-line errors for a hand-edited checkpoint: unknown or missing ``model_args``, ``meta`` without class names."""
    import inspect

    from detres.models.detection.faster_rcnn import build_faster_rcnn

    if not isinstance(model_args, Mapping) or not isinstance(meta, Mapping):
        raise ValueError(f"{path}: 'model_args' and 'meta' must be mappings")
    params = inspect.signature(build_faster_rcnn).parameters
    known = set(params) | set(POSTPROCESS_KEYS)
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model_args {unknown}; valid keys: {', '.join(sorted(known))}")
    required = sorted(k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in model_args)
    if required:
        raise ValueError(f"{path}: model_args lacks {required}")
    names = meta.get("class_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{path}: meta.class_names is missing or not a list of class names (got {names!r}); "
            f"a train_det checkpoint records them"
        )
    num_classes = model_args.get("num_classes")
    if isinstance(num_classes, int) and len(names) != num_classes:  # object classes; background is not counted
        raise ValueError(
            f"{path}: meta.class_names has {len(names)} names but model_args.num_classes={num_classes}; they must agree"
        )
