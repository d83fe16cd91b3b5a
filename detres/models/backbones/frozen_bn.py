"""Frozen batch normalization (fixed affine + statistics) and precise recomputation of BN statistics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torchvision.ops
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """BatchNorm2d with constant statistics and affine parameters, all stored as buffers.

    The arithmetic and the state_dict handling come from torchvision.ops.FrozenBatchNorm2d:
    keys ``weight, bias, running_mean, running_var`` as in nn.BatchNorm2d, and a
    ``num_batches_tracked`` entry in a loaded state_dict is dropped. Being buffers, none of
    them receives gradients or changes in train mode (detection fine-tuning freezes BN, Sec. 4.4 / App. A).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        if int(num_features) < 1:
            raise ValueError(f"FrozenBatchNorm2d: num_features must be >= 1, got {num_features}")
        super().__init__(int(num_features), eps=eps)
        self.num_features = int(num_features)

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm) -> FrozenBatchNorm2d:
        """A frozen copy of ``bn``'s current affine parameters and running statistics."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {bn!r}: it has no running statistics (track_running_stats=False)")
        frozen = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen.to(device=bn.running_mean.device)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d / nn.SyncBatchNorm in ``module`` (recursively) by a FrozenBatchNorm2d copy.

    Returns the converted module: a new object when ``module`` itself is a BatchNorm2d,
    otherwise ``module`` modified in place.
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        converted = convert_frozen_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class _StatsAccumulator:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        # Channel dim 1; statistics over every other dim (N, H, W), as BatchNorm normalises.
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        n = x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] > 0 else 0
        if n == 0:
            return
        dims = [d for d in range(x.dim()) if d != 1]
        # Per-batch two-pass statistics in the input dtype (no float64 copy of the activations).
        batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=0)
        batch_mean = batch_mean.to(torch.float64)
        batch_m2 = batch_var.to(torch.float64) * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        # Chan et al. pairwise merge: exact count-weighted combination of means and E[x^2].
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total


def recompute_bn_statistics(model: nn.Module, batches: Iterable[Tensor], num_batches: int | None = None) -> None:
    """Set every BatchNorm layer's running statistics to the exact population statistics of its input.

    The model is run on ``batches`` (tensors, or tuples/lists whose first item is the input
    tensor) with the BN layers in train mode, so each layer normalises with batch statistics
    as during training, and every other module in eval mode; all modes are restored afterwards.
    For each BN layer the mean and the variance of its input over all samples and pixels of all
    batches are accumulated exactly (count-weighted, independent of batch sizes and of BN
    momentum). ``running_var`` receives the *unbiased* variance (divisor count - 1), the same
    estimator BatchNorm feeds into ``running_var`` during training and then uses at eval.
    ``num_batches`` caps the number of batches read (at most that many; a shorter iterable is
    used whole, and the statistics are exact over what was read).
    """
    names = {
        m: name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }
    bn_layers = list(names)
    if not bn_layers:
        raise ValueError("recompute_bn_statistics: the model has no BatchNorm layer with running statistics")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"recompute_bn_statistics: num_batches must be >= 1, got {num_batches}")

    accumulators = {bn: _StatsAccumulator() for bn in bn_layers}
    # The train-mode forwards update the buffers with momentum; put them back afterwards (also on
    # error) and only then write the exact statistics.
    saved_buffers = {bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bn_layers}
    saved_modes = {m: m.training for m in model.modules()}
    handles = [
        bn.register_forward_pre_hook(lambda mod, inputs, acc=accumulators[bn]: acc.add(inputs[0])) for bn in bn_layers
    ]
    first = next(model.parameters(), None)
    device = first.device if first is not None else bn_layers[0].running_mean.device
    seen = 0
    try:
        model.eval()
        for bn in bn_layers:
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, Tensor):
                    raise TypeError(f"recompute_bn_statistics: batch {seen} is {type(x).__name__}, expected a Tensor")
                model(x.to(device))
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in saved_modes.items():
            m.training = mode
        with torch.no_grad():
            for bn, buffers in saved_buffers.items():
                for name, value in buffers.items():
                    getattr(bn, name).copy_(value)

    if seen == 0:
        raise ValueError("recompute_bn_statistics: `batches` yielded no batch")
    for bn, acc in accumulators.items():
        if acc.mean is None:
            raise ValueError(f"recompute_bn_statistics: BatchNorm layer '{names[bn]}' was never run by the forward")
        if acc.count < 2:
            raise ValueError(
                f"recompute_bn_statistics: BatchNorm layer '{names[bn]}' saw {acc.count} value per channel; "
                "an unbiased variance needs at least 2"
            )
        var = acc.m2 / (acc.count - 1)
        with torch.no_grad():
            bn.running_mean.copy_(acc.mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
