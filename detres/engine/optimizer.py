"""Detection SGD with Ren et al.'s parameter groups: weights (LR, decay) and biases (2x LR, no decay).

py-faster-rcnn, whose hyper-parameters the ResNet paper's Appendix A keeps ("the same as in [32]"),
gives every bias ``lr_mult: 2, decay_mult: 0`` and every weight ``lr_mult: 1, decay_mult: 1`` with a
base weight decay of 5e-4. detectron2 expresses the same with ``BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS``;
so does :func:`build_detection_optimizer`. Frozen parameters (``requires_grad=False``) never enter the
optimizer; frozen BN has buffers, not parameters, so it is not optimised either.

The LR schedule gives one LR per iteration; :func:`set_lr` scales it by each group's ``lr_factor``
(so warm-up and steps scale biases and weights alike).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detres.engine.lr_schedule import LRSchedule
from detres.engine.run.setup import load_model_state

__all__ = [
    "is_bias",
    "detection_param_groups",
    "build_detection_optimizer",
    "build_step_solver",
    "load_optimizer_state",
    "set_lr",
]


def is_bias(name: str) -> bool:
    """A bias parameter by its name (``conv.bias``, ``cls_score.bias``; also a trainable BN's shift)."""
    return name.rsplit(".", 1)[-1] == "bias"


def detection_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float | None = None,
    modules: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups "weights" and "biases" (empty groups are left out) of the trainable parameters.

    Each group carries ``lr_factor`` (1 for weights, ``bias_lr_factor`` for biases), its ``lr``
    (= base_lr x lr_factor) and ``weight_decay`` (``weight_decay_bias`` for biases, None = the same
    as weights). ``modules``: only parameters under these top-level children (e.g. ``["rpn"]``);
    None = the whole model. Shared parameters are listed once.
    """
    if bias_lr_factor <= 0:
        raise ValueError(f"bias_lr_factor must be positive, got {bias_lr_factor}")
    wanted = None if modules is None else set(modules)
    if wanted is not None:
        unknown = wanted - {name for name, _ in model.named_children()}
        if unknown:
            raise ValueError(f"detection_param_groups: the model has no submodules {sorted(unknown)}")
    decay_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        if wanted is not None and name.split(".", 1)[0] not in wanted:
            continue
        seen.add(id(param))
        (biases if is_bias(name) else weights).append(param)
    groups = [
        {"name": "weights", "params": weights, "lr_factor": 1.0, "lr": base_lr, "weight_decay": float(weight_decay)},
        {
            "name": "biases",
            "params": biases,
            "lr_factor": float(bias_lr_factor),
            "lr": base_lr * bias_lr_factor,
            "weight_decay": float(decay_bias),
        },
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("detection_param_groups: no trainable parameters to optimise")
    return groups


def build_detection_optimizer(
    model: nn.Module, solver: Mapping[str, Any], *, modules: Iterable[str] | None = None
) -> torch.optim.SGD:
    """SGD with momentum over :func:`detection_param_groups`, from the ``solver`` config options
    (base_lr, momentum, weight_decay, bias_lr_factor, weight_decay_bias)."""
    groups = detection_param_groups(
        model,
        base_lr=float(solver["base_lr"]),
        weight_decay=float(solver["weight_decay"]),
        bias_lr_factor=float(solver.get("bias_lr_factor", 1.0)),
        weight_decay_bias=solver.get("weight_decay_bias"),
        modules=modules,
    )
    return torch.optim.SGD(groups, lr=float(solver["base_lr"]), momentum=float(solver["momentum"]))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr`` x its ``lr_factor`` (1 when the group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_factor", 1.0))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: Path) -> None:
    """Restore SGD state (momentum buffers, group LRs) from a checkpoint, with a clear error when the
    parameter groups differ (e.g. a checkpoint from before weights and biases were separate groups)."""
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        groups = [len(g["params"]) for g in state.get("param_groups", [])]
        ours = [len(g["params"]) for g in optimizer.param_groups]
        raise ValueError(
            f"{source}: its optimizer state has parameter groups of sizes {groups}, this run's has "
            f"{ours} (solver options or trainable layers changed?); cannot resume: {exc}"
        ) from None


def build_step_solver(
    model: nn.Module, solver: Any, state: dict | None, source: Path
) -> tuple[torch.optim.Optimizer, LRSchedule, int]:
    """SGD with the detection parameter groups and the step schedule of ``solver``; with a checkpoint ``state``
    (read from ``source``) the model weights, momentum buffers and iteration are restored.
    Returns (optimizer, schedule, start iteration)."""
    optimizer = build_detection_optimizer(model, solver)
    schedule = LRSchedule(
        optimizer,
        base_lr=solver.base_lr,
        mode="step",
        steps=solver.steps,
        gamma=solver.gamma,
        warmup_iters=solver.warmup_iters,
        warmup_lr=solver.warmup_lr,
    )
    if state is None:
        return optimizer, schedule, 0
    load_model_state(model, state["model"], source)
    load_optimizer_state(optimizer, state["optimizer"], source)
    return optimizer, schedule, int(state["iter"])
