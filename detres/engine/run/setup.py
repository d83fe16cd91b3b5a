"""Start of every training run: the folder's lock, stop signals, the resume guard, the saved config, seeds, device."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detres.config.load import Config, dump_config
from detres.config.validate import check_device
from detres.engine.run.checkpoint import CheckpointManager, link_or_copy, remove_stale_temp_files
from detres.engine.run.lock import RunLock
from detres.engine.seeded_data import seed_everything
from detres.utils.dist import max_over_ranks
from detres.utils.torch_files import load_checkpoint

__all__ = [
    "RESUME_MODES",
    "RunStart",
    "TrainingInterrupted",
    "load_model_state",
    "model_changes",
    "resolve_device",
    "run_guard",
    "start_run",
    "stop_if_signalled",
]

log = logging.getLogger(__name__)
# resume: False = a fresh run (an existing last.pt is refused), True = continue last.pt (it must exist),
# "auto" = continue last.pt when there is one, else start fresh (tools: --resume-or-start).
RESUME_MODES = (False, True, "auto")
DEFAULT_KEEP = 3  # solver.keep_checkpoints when a config predates the key


def resolve_device(name: str) -> torch.device:
    """ "auto" = CUDA when available, else CPU; else cpu, cuda, cuda:N or mps, refused (ConfigError) if absent here."""
    check_device(name, need_available=True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------- stop signals
class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after ``last.pt`` was saved; ``exit_status`` = 128 + signal number."""

    def __init__(self, signum: int, iteration: int, path: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at iteration {iteration}: saved {path}; continue with --resume")
        self.signum, self.iteration, self.path = signum, iteration, path
        self.exit_status = 128 + signum


_pending: list[int] = []  # signals received by the training process, oldest first


def _on_signal(signum: int, frame: Any) -> None:
    if os.getpid() != _owner_pid[0]:
        return  # a forked DataLoader worker: the main process stops it; no KeyboardInterrupt traceback there
    if _pending:
        raise KeyboardInterrupt  # a second signal: stop now, without the checkpoint
    _pending.append(signum)
    log.warning(
        "%s received: saving last.pt after the current step, then stopping (send it again to stop at once)",
        signal.Signals(signum).name,
    )


_owner_pid = [0]


@contextmanager
def _stop_signals() -> Iterator[None]:
    """While training, SIGINT / SIGTERM ask the loop to save and stop (:func:`stop_if_signalled`)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _pending.clear()
    _owner_pid[0] = os.getpid()
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending.clear()


def stop_if_signalled(iteration: int, save: Callable[[], Path]) -> None:
    """At a step boundary: if a stop signal came, ``save()`` the checkpoint and raise :class:`TrainingInterrupted`.
    Under torchrun the ranks agree (a signal on any rank stops all of them at the same step)."""
    signum = max_over_ranks(_pending[0] if _pending else 0)
    if signum:
        raise TrainingInterrupted(signum, iteration, save())


@contextmanager
def run_guard(output_dir: str | os.PathLike, *, lock: bool = True) -> Iterator[None]:
    """Around a whole training run: the folder's lock (one run per folder) and the stop-signal handlers.
    ``lock=False``: the handlers only (torchrun's ranks other than 0, whose rank 0 holds the lock)."""
    with RunLock(output_dir) if lock else nullcontext(), _stop_signals():
        try:
            yield
        except BaseException:
            _close_progress_bars()  # so that the caller's one-line error is printed below them, not overdrawn
            raise


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ----------------------------------------------------------------------------------------- resume
def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def model_changes(saved_config: Mapping[str, Any] | None, cfg: Config) -> list[str]:
    """``model.*`` options of ``cfg`` that differ from those a checkpoint was trained with, as "key old → new"
    (keys the checkpoint's config lacks, e.g. added in a later version, are not compared)."""
    if not isinstance(saved_config, Mapping) or not isinstance(saved_config.get("model"), Mapping):
        return []
    old, new = _flatten(saved_config["model"], "model"), _flatten(cfg.to_dict()["model"], "model")
    return [f"{key} {old[key]!r} → {new[key]!r}" for key in sorted(new) if key in old and old[key] != new[key]]


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    """Load checkpoint weights into ``model``; a missing, extra or differently shaped tensor is a one-line error."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    extra = [k for k in state_dict if k not in ours]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or extra or shapes:
        parts = [
            f"{what} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra), ("shape mismatch:", shapes))
            if names
        ]
        raise ValueError(f"{source}: its weights do not fit the model built from this config ({'; '.join(parts)})")
    model.load_state_dict(state_dict)


def _resume_source(out: Path, resume: bool | str, resume_from: str | os.PathLike | None) -> Path | None:
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    last = out / "last.pt"
    if resume_from is not None:
        source = Path(resume_from)
        if not source.is_file():
            raise FileNotFoundError(f"--resume-from: checkpoint not found: {source}")
        return source
    if resume is True and not last.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint to continue in {out} ({last} does not exist); check "
            f"output_dir, or pass --resume-or-start to start fresh when there is none"
        )
    if resume is False and last.exists():
        raise FileExistsError(f"{last} exists: pass --resume to continue it or choose another output_dir")
    return last if resume and last.is_file() else None


@dataclass
class RunStart:
    """What :func:`start_run` prepared: folder, device, the checkpoint resumed from (if any), the checkpoint writer."""

    out: Path
    last_path: Path
    device: torch.device
    state: dict | None
    source: Path | None  # the file ``state`` was read from
    checkpoints: CheckpointManager
    model_changed: bool  # resumed with changed model.* options (allowed): build the model from the config

    @property
    def start_iter(self) -> int:
        return int(self.state["iter"]) if self.state is not None else 0


def start_run(
    cfg: Config,
    *,
    resume: bool | str = False,
    resume_from: str | os.PathLike | None = None,
    allow_model_change: bool = False,
) -> RunStart:
    """Create ``cfg.output_dir`` (call inside :func:`run_guard`), remove temp files of a killed write, pick and
    check the checkpoint to resume, save the config, seed.

    A fresh run refuses a folder with ``last.pt``; ``resume=True`` refuses one without; ``resume_from`` resumes an
    older kept checkpoint (it becomes ``last.pt``; newer kept ones are removed). Changed ``model.*`` options are
    refused unless ``allow_model_change`` (then the config's model is built and the old weights loaded into it).
    """
    resolve_device(cfg.device)  # a bad or absent device fails before any output is written
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    source = _resume_source(out, resume, resume_from if resume_from is None else Path(resume_from))
    state = load_checkpoint(source) if source is not None else None
    changes = model_changes(state.get("config"), cfg) if state is not None else []
    if changes and not allow_model_change:
        raise ValueError(
            f"{source}: resuming with changed model options ({'; '.join(changes)}); resume with the "
            f"checkpoint's values, or pass --allow-model-change to build the new model and load the "
            f"old weights into it"
        )
    keep = cfg.solver.get("keep_checkpoints", DEFAULT_KEEP)
    checkpoints = CheckpointManager(out, keep=keep, last_iter=int(state["iter"]) if state is not None else None)
    last_path = out / "last.pt"
    if state is not None:
        if source.resolve() != last_path.resolve():
            link_or_copy(source, last_path)  # last.pt is always the state the run continues from
        checkpoints.forget_after(int(state["iter"]))
    if changes:
        log.warning("--allow-model-change: building the model with %s", "; ".join(changes))
    dump_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    return RunStart(out, last_path, resolve_device(cfg.device), state, source, checkpoints, bool(changes))
