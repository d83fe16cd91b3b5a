"""Config → keyword arguments → models: the only place that reads model options from a Config."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from detres.models.resnet import build_cifar_resnet, build_resnet


def classifier_kwargs_from_config(model_cfg: Mapping[str, Any], *, num_classes: int) -> dict[str, Any]:
    """The explicit arguments of :func:`build_classifier` (also stored in checkpoints as ``model_args``)."""
    kwargs = {
        "arch": model_cfg["arch"],
        "depth": int(model_cfg["depth"]),
        "num_classes": int(num_classes),
        "shortcut": model_cfg["shortcut"],
        "plain": bool(model_cfg["plain"]),
        "zero_init_residual": bool(model_cfg["zero_init_residual"]),
    }
    if model_cfg["arch"] == "imagenet":
        kwargs["stride_in_1x1"] = bool(model_cfg["stride_in_1x1"])
    return kwargs


def build_classifier(*, arch: str = "imagenet", depth: int = 50, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """An ImageNet (Table 1) or CIFAR (6n+2) ResNet classifier from explicit arguments."""
    if arch == "imagenet":
        return build_resnet(depth, num_classes=num_classes, **kwargs)
    if arch == "cifar":
        kwargs.pop("stride_in_1x1", None)  # CIFAR nets have no bottlenecks
        return build_cifar_resnet(depth, num_classes=num_classes, **kwargs)
    raise ValueError(f"model.arch must be 'imagenet' or 'cifar', got {arch!r}")
