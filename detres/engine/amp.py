"""Mixed precision on CUDA (autocast + GradScaler) for the training loops; CPU runs always stay fp32."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "AMP_DTYPES",
    "SCALER_KEY",
    "MixedPrecision",
    "check_amp_dtype",
    "mixed_precision_from_config",
    "scaler_state_into",
]

log = logging.getLogger(__name__)
AMP_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SCALER_KEY = "amp_scaler"  # where last.pt keeps the GradScaler state, next to "optimizer"


def check_amp_dtype(dtype: Any, key: str = "solver.amp_dtype") -> str:
    """``dtype`` if it names an autocast dtype we support; a ValueError naming ``key`` otherwise."""
    if dtype not in AMP_DTYPES:
        raise ValueError(f"{key} must be one of {sorted(AMP_DTYPES)}, got {dtype!r}")
    return dtype


class MixedPrecision:
    """Autocast for the forward pass and a (scaled) backward + optimizer step.

    Active only when ``enabled`` and ``device`` is CUDA. On any other device it is a no-op that
    computes exactly the fp32 step (bf16 matmuls on this project's CPUs die with SIGILL, and CPU
    autocast would change the numbers), after one warning. float16 needs loss scaling (its
    gradients underflow); bfloat16 has fp32's exponent range and runs without a scaler.
    """

    def __init__(self, *, enabled: bool, device: torch.device | str, dtype: str = "float16") -> None:
        self.dtype_name = check_amp_dtype(dtype, key="amp dtype")
        self.device = torch.device(device)
        self._active = bool(enabled) and self.device.type == "cuda"
        if enabled and not self._active:
            log.warning("solver.amp is CUDA-only; running fp32 on %s", self.device.type)
        use_scaler = self._active and self.dtype_name == "float16"
        self._scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    @property
    def active(self) -> bool:
        """True when forward passes really run under CUDA autocast."""
        return self._active

    @property
    def dtype(self) -> torch.dtype:
        return AMP_DTYPES[self.dtype_name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """CUDA autocast when active; otherwise a context that changes nothing."""
        if not self._active:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (the caller zeroes the gradients first, as before).

        With a scaler, a step whose gradients hold inf/NaN is skipped and the scale lowered, the
        usual float16 practice; the loops' own non-finite *loss* checks still run before this.
        """
        if self._scaler is None:
            loss.backward()
            optimizer.step()
            return
        self._scaler.scale(loss).backward()
        self._scaler.step(optimizer)
        self._scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state ({} without a scaler: fp32 or bfloat16)."""
        return {} if self._scaler is None else self._scaler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore a saved scaler state; an empty / missing one (an fp32 checkpoint) keeps the fresh scaler."""
        if self._scaler is not None and state:
            self._scaler.load_state_dict(dict(state))


def mixed_precision_from_config(solver: Mapping[str, Any], device: torch.device | str) -> MixedPrecision:
    """``solver.amp`` / ``solver.amp_dtype`` -> MixedPrecision (a bad dtype fails naming the key)."""
    dtype = check_amp_dtype(solver.get("amp_dtype", "float16"))
    return MixedPrecision(enabled=bool(solver.get("amp", False)), device=device, dtype=dtype)


def scaler_state_into(payload: dict[str, Any], amp: MixedPrecision | None) -> dict[str, Any]:
    """``payload`` with the scaler state added under ``amp_scaler`` when there is one (fp32 checkpoints unchanged)."""
    state = amp.state_dict() if amp is not None else {}
    if state:
        payload[SCALER_KEY] = state
    return payload
