"""Inference-time model rewrites: fold frozen/eval BatchNorm into the preceding conv (same detections, fewer passes)."""

from __future__ import annotations

import copy

import torch
import torchvision.models.resnet as tv_resnet
import torchvision.ops
from torch import nn

from detres.models.backbones import resnet as detres_resnet
from detres.models.backbones import resnet_c4 as detres_backbone
from detres.models.backbones.conv_norm import fold_norm_into_conv

__all__ = ["fold_frozen_batchnorm", "prepare_for_inference", "count_batchnorm"]

_NORM_TYPES = (torchvision.ops.FrozenBatchNorm2d, nn.BatchNorm2d)

# Modules whose forward applies ``bnK`` directly to the output of ``convK`` and uses that conv
# output nowhere else. Only these (and nn.Sequential, below) are rewritten: guessing from
# attribute names on unknown modules could fold a norm that is not applied to the conv output.
_CONV_BN_OWNERS: tuple[type[nn.Module], ...] = (
    detres_resnet.BasicBlock,
    detres_resnet.Bottleneck,
    detres_resnet.ResNet,
    detres_resnet.CifarResNet,
    detres_backbone.ResNetC4Trunk,
    tv_resnet.BasicBlock,
    tv_resnet.Bottleneck,
    tv_resnet.ResNet,
)
_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm2d / FrozenBatchNorm2d modules in ``model`` (0 once everything is folded)."""
    return sum(isinstance(m, _NORM_TYPES) for m in model.modules())


def _fold_pair(conv: nn.Conv2d, norm: nn.Module, where: str) -> None:
    """Rewrite ``conv`` in place so that conv'(x) == norm(conv(x)) in eval mode."""
    if isinstance(norm, nn.BatchNorm2d):
        if norm.training:
            raise ValueError(
                f"fold_frozen_batchnorm: {where} is a BatchNorm2d in training mode; call model.eval() first"
            )
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError(f"fold_frozen_batchnorm: {where} has no running statistics (track_running_stats=False)")
    num_features = norm.running_mean.numel()
    if conv.out_channels != num_features:
        raise ValueError(
            f"fold_frozen_batchnorm: {where} normalises {num_features} channels but its conv has {conv.out_channels}"
        )
    # Fold in float64 so the new weights are the exact product rounded once to fp32.
    dtype = conv.weight.dtype
    weight, bias = fold_norm_into_conv(
        conv.weight.detach().double(),
        None if conv.bias is None else conv.bias.detach().double(),
        running_mean=norm.running_mean.double(),
        running_var=norm.running_var.double(),
        eps=float(norm.eps),
        norm_weight=None if norm.weight is None else norm.weight.detach().double(),
        norm_bias=None if norm.bias is None else norm.bias.detach().double(),
    )
    conv.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)


def _identity_like(norm: nn.Module) -> nn.Identity:
    """The norm's replacement, in the same train/eval mode so that model.training stays uniform."""
    return nn.Identity().train(norm.training)


def _fold_children(module: nn.Module, prefix: str) -> int:
    folded = 0
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORM_TYPES):
                _fold_pair(conv, norm, f"{prefix}{second}")
                module._modules[second] = _identity_like(norm)
                folded += 1
    elif isinstance(module, _CONV_BN_OWNERS):
        for conv_name, norm_name in _NAMED_PAIRS:
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORM_TYPES):
                _fold_pair(conv, norm, f"{prefix}{norm_name}")
                setattr(module, norm_name, _identity_like(norm))
                folded += 1
    for name, child in module.named_children():
        folded += _fold_children(child, f"{prefix}{name}.")
    return folded


def fold_frozen_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return an equivalent model whose conv -> BN pairs are single convs with a bias.

    Folds every FrozenBatchNorm2d (and eval-mode nn.BatchNorm2d) that directly follows a conv in
    a ResNet block / stem (detres or torchvision) or in an nn.Sequential (projection shortcuts);
    the norm becomes nn.Identity. A per-channel affine after a conv is the same as scaling the
    conv's output filters, so the result matches the original up to fp32 rounding while skipping
    two elementwise passes over every activation.

    The result is for inference: its state_dict (conv biases, no norm entries) no longer loads
    training checkpoints, so fold after loading weights.

    Args:
        model: any module; norms in other places are left as they are (see ``count_batchnorm``).
        inplace: rewrite ``model`` itself instead of a deep copy (the default leaves it untouched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_frozen_batchnorm: expected an nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        _fold_children(out, "")
    return out


def prepare_for_inference(model: nn.Module, *, fold_bn: bool = True) -> nn.Module:
    """Copy of ``model`` in eval mode with gradients off and (by default) BatchNorm folded into convs.

    Run the result under ``torch.inference_mode()``; the original model is left untouched.
    """
    out = copy.deepcopy(model).eval()
    if fold_bn:
        out = fold_frozen_batchnorm(out, inplace=True).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out
