"""conv -> norm with a frozen BatchNorm folded into the conv on the fly: one pass over the activations, no BN graph."""
from __future__ import annotations

import torchvision.ops
from torch import Tensor, nn

__all__ = ["apply_conv_norm", "apply_shortcut"]


def apply_conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A frozen BN (a fixed per-channel affine map y = s * z + t) is folded into the conv as
    weight * s and bias t, so the activations are written once and autograd records only the conv (the weight's
    gradient flows through the cheap weight * s). Other norms (training BN, Identity after
    ``prepare_for_inference``) run as usual. Same function of x up to float rounding (~1e-6 relative)."""
    if not isinstance(norm, torchvision.ops.FrozenBatchNorm2d) or conv.bias is not None or _hooked(conv):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift)


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
