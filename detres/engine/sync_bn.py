"""SyncBatchNorm for ``solver.sync_bn``: batch statistics over the global batch of all ranks, on CUDA and CPU.

torch's ``nn.SyncBatchNorm`` runs on GPUs only; :class:`GlooSyncBatchNorm` computes the same thing with
differentiable all-reduces (``torch.distributed.nn``), so CPU (gloo) runs and tests get it too.
:func:`convert_sync_batchnorm` picks torch's layer on CUDA and ours elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm"]


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode mean and variance are those of the inputs of every rank together.

    Two all-reduces per layer (the sum, then the squared deviations from the global mean: the two-pass
    variance, as accurate as one process's). Gradients flow through them, so each rank's inputs receive
    the gradient of the global objective, as with ``nn.SyncBatchNorm``. Eval mode, or no process group:
    plain BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlooSyncBatchNorm expects 4-D input, got {x.dim()}-D")
        count = x.new_tensor([float(x.shape[0] * x.shape[2] * x.shape[3])])
        count = dist_fn.all_reduce(count)  # ranks may hold different batch sizes
        mean = dist_fn.all_reduce(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def _convert_gloo(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_gloo(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers synchronised over the ranks (torch's SyncBatchNorm on CUDA,
    :class:`GlooSyncBatchNorm` elsewhere); the state_dict keys do not change, so checkpoints load into
    the plain model. Frozen BN (no batch statistics) is left alone. Convert before moving to the device."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError("solver.sync_bn=true but the model has no BatchNorm layers: set solver.sync_bn=false")
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_gloo(model)
