"""Models from a config tree: classifiers (from keyword arguments, stored as a train_cls checkpoint's
``model_args``) and the detector (each part's ``from_config``); and back from a train_det checkpoint's config
tree to a trained detector."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from detres.config.load import Config, ConfigError, config_from_tree
from detres.models.backbones.alexnet import alexnet
from detres.models.backbones.backbone_config import PAPER_VGG_SIZE
from detres.models.backbones.resnet import build_cifar_resnet, build_resnet
from detres.models.backbones.vgg import vgg16
from detres.models.detection.faster_rcnn import FasterRCNN
from detres.utils.torch_files import load_checkpoint

CLASSIFIER_ARCHS = ("imagenet", "cifar", "vgg16", "alexnet")
FIXED_DEPTH = {"vgg16": 16, "alexnet": 8}  # weight layers: 13 conv + 3 fc; 5 conv + 3 fc


def _vgg_size_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """``width``/``hidden`` of a narrower VGG-16; the paper's 64/4096 record nothing (as checkpoints before the
    options), so a full-size VGG-16's ``model_args`` are unchanged."""
    sizes = {"width": int(model_cfg["vgg_width"]), "hidden": int(model_cfg["vgg_hidden"])}
    return {key: value for key, value in sizes.items() if value != PAPER_VGG_SIZE[key]}


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


def build_detector(
    model_cfg: Mapping[str, Any], *, input_cfg: Mapping[str, Any], num_classes: int, load_weights: bool = True
) -> FasterRCNN:
    """The ResNet-C4 or VGG-16 Faster R-CNN of a ``task: det`` config's ``model`` tree, testing at its ``input``
    tree's test scale (:meth:`FasterRCNN.from_config`); ``num_classes`` counts object classes (background is added)."""
    return FasterRCNN.from_config(model_cfg, input_cfg=input_cfg, num_classes=num_classes, load_weights=load_weights)


def detector_state(model: nn.Module, *, config: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a train_det checkpoint :func:`detector_from_state` reads: the weights, the whole config tree the
    model is rebuilt from (``task: det``) and the metadata (``class_names`` at least); trainers add their state."""
    return {"model": model.state_dict(), "config": _plain_tree(config), "meta": dict(meta)}


def _plain_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain dicts (a checkpoint is read with torch.load's weights_only, which refuses other classes)."""
    return {key: _plain_tree(value) if isinstance(value, Mapping) else value for key, value in tree.items()}


def detector_from_state(state: Mapping[str, Any], *, source: str) -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild a train_det checkpoint's detector from its config tree and weights; returns (model, metadata).

    The one rebuild path of every reader (load_detector, the predictor, test/infer/export tools). The
    backbone file named by ``model.weights`` is not read: the state_dict holds every weight and the
    normalisation buffers. ``source`` names the checkpoint in errors.
    """
    missing = [key for key in ("model", "config", "meta") if key not in state]
    if missing:
        hint = " (a train_cls checkpoint? use it as model.weights)" if "data_stats" in state else ""
        raise ValueError(f"{source}: not a train_det checkpoint (missing {missing}){hint}")
    cfg, meta = _checked_record(source, state["config"], state["meta"])
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=len(meta["class_names"]), load_weights=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # torch lists every mismatched tensor over many lines
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"{source}: 'model' weights do not fit its config's model: {first}") from None
    return model, dict(meta, config=cfg.to_dict())


def load_detector(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild a trained detector from a train_det checkpoint; returns (model in eval mode, metadata incl. config)."""
    model, meta = detector_from_state(load_checkpoint(path), source=str(path))
    return model.to(device).eval(), meta


def _checked_record(source: str, config: Any, meta: Any) -> tuple[Config, Mapping[str, Any]]:
    """One-line errors for a hand-edited checkpoint: an invalid config tree, ``meta`` without class names."""
    if not isinstance(config, Mapping) or not isinstance(meta, Mapping):
        raise ValueError(f"{source}: 'config' and 'meta' must be mappings")
    try:
        cfg = config_from_tree(config, task="det")
    except ConfigError as exc:
        raise ValueError(f"{source}: its config: {exc}") from None
    names = meta.get("class_names")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{source}: meta.class_names is missing or not a list of class names (got {names!r}); "
            f"a train_det checkpoint records them"
        )
    return cfg, meta
