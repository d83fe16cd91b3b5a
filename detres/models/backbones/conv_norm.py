"""conv -> norm with a frozen BatchNorm folded into the conv on the fly: one pass over the activations, no BN graph."""

from __future__ import annotations

import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

from detres.models.backbones import cpu_execution

__all__ = ["apply_conv_norm", "apply_shortcut", "conv_forward", "fold_norm_into_conv"]


def conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s function of ``x`` with ``weight`` and ``bias`` in place of its own (float32 1x1 stride-1 convs
    on CPU through oneDNN unless :func:`detres.models.backbones.cpu_execution.cpu_pointwise_onednn` says otherwise;
    the route is decided at every call)."""
    if cpu_execution.routes_pointwise_to_onednn(conv, x):
        return F.conv2d(x, weight, bias, 1, 0, cpu_execution.ONEDNN_POINTWISE_DILATION, 1)
    return conv._conv_forward(x, weight, bias)


def fold_norm_into_conv(
    weight: Tensor,
    bias: Tensor | None,
    *,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one conv equal to a conv (``weight``, ``bias``) followed by a BN with fixed statistics.

    The BN is the per-channel affine map y = s * z + t with s = norm_weight / sqrt(running_var + eps) and
    t = norm_bias - running_mean * s, so the conv's filters are scaled by s and its bias becomes s * bias + t.
    Computed in the inputs' dtype and differentiable (the on-the-fly fold trains through it); the inference
    rewrite passes float64 copies to round the product once.
    """
    scale = (running_var + eps).rsqrt()
    if norm_weight is not None:
        scale = norm_weight * scale
    shift = running_mean * scale if bias is None else (running_mean - bias) * scale
    shift = -shift if norm_bias is None else norm_bias - shift
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def apply_conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A frozen BN (a fixed per-channel affine map y = s * z + t) is folded into the conv as
    weight * s and bias t, so the activations are written once and autograd records only the conv (the weight's
    gradient flows through the cheap weight * s). Other norms (training BN, Identity after
    ``prepare_for_inference``) run as usual. Same function of x up to float rounding (~1e-6 relative)."""
    if _hooked(conv) or type(conv) is not nn.Conv2d:
        return norm(conv(x))
    if not isinstance(norm, torchvision.ops.FrozenBatchNorm2d) or conv.bias is not None:
        return norm(conv_forward(conv, x, conv.weight, conv.bias))
    weight, bias = fold_norm_into_conv(
        conv.weight,
        None,
        running_mean=norm.running_mean,
        running_var=norm.running_var,
        eps=norm.eps,
        norm_weight=norm.weight,
        norm_bias=norm.bias,
    )
    return conv_forward(conv, x, weight, bias)


def apply_shortcut(downsample: nn.Module | None, x: Tensor) -> Tensor:
    """The block's shortcut branch: identity, a projection ``Sequential(conv, norm)`` (folded as above) or any
    other module (option A's zero padding)."""
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and isinstance(downsample[0], nn.Conv2d):
        return apply_conv_norm(downsample[0], downsample[1], x)
    return downsample(x)


def _hooked(conv: nn.Module) -> bool:
    """A conv with hooks (FLOP counters, feature probes) must run as a module call, or they would not fire."""
    return bool(conv._forward_hooks or conv._forward_pre_hooks)
