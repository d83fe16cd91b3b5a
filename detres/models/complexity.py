"""Model complexity: parameter counts and multiply-add ("FLOPs" in the paper's Table 1) counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_multiply_adds(module: nn.Conv2d, output: Tensor) -> int:
    # Each output element is a dot product over (in_channels / groups) * kh * kw inputs.
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_multiply_adds(module: nn.Linear, output: Tensor) -> int:
    return output.numel() * module.in_features


def count_multiply_adds(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of all Conv2d and Linear layers for one forward pass on a zero input.

    The count is for the whole ``input_size`` batch (use batch 1 for per-image numbers).
    Bias additions, BN, ReLU, pooling and shortcut additions are not counted, which is the
    convention of the paper's FLOP numbers (multiply-adds of the weighted layers).
    The count depends on shapes only, so a model built under ``torch.device("meta")`` gives
    the same answer without any arithmetic.
    """
    if len(input_size) != 4 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size: expected a positive (N, C, H, W), got {tuple(input_size)}")
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += _conv_multiply_adds(module, output)
        else:
            total += _linear_multiply_adds(module, output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was_training = model.training
    try:
        # Eval mode: BN with batch statistics would reject a batch of 1 and would touch buffers.
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(int(s) for s in input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
