"""Training checkpoints of a run folder: ``last.pt`` plus the last K kept by iteration, never a non-finite state,
and the last *good* one restored as ``last.pt`` when training diverges.

Layout: ``<output_dir>/last.pt`` (what ``--resume`` continues) and ``<output_dir>/checkpoints/iter_0000100.pt``
(the last ``solver.keep_checkpoints`` saves, hard links of the ``last.pt`` they were, for ``--resume-from``).
Writes are atomic (:mod:`detres.utils.atomic`); temp files of a write killed mid-way are removed at the next
start (:func:`remove_stale_temp_files`, called once the run holds the folder's lock).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from detres.utils.dist import is_main_process
from detres.utils.torch_files import save_checkpoint

__all__ = ["CheckpointManager", "Diverged", "KEPT_DIR", "non_finite_entries", "remove_stale_temp_files"]

log = logging.getLogger(__name__)
KEPT_DIR = "checkpoints"
_KEPT = re.compile(r"^iter_(\d+)\.pt$")
# Payload entries that hold the training state (a non-finite value there must never reach disk).
STATE_KEYS = ("model", "optimizer", "proposal_model")


class Diverged(FloatingPointError):
    """Training produced a non-finite loss or state. ``failed_from``: the iteration of the state the failing
    step started from (checkpoints of that iteration or later are not good: the step is repeated exactly on
    resume and fails again), or None when unknown."""

    def __init__(self, message: str, *, failed_from: int | None = None) -> None:
        super().__init__(message)
        self.failed_from = failed_from
        self.rewound = False  # set once last.pt was set back to the last good checkpoint


def non_finite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``tree`` (nested dicts / lists) holding NaN or Inf."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return [] if bool(torch.isfinite(tree).all()) else [prefix or "<tensor>"]
        return []
    if isinstance(tree, Mapping):
        return [n for k, v in tree.items() for n in non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in non_finite_entries(v, f"{prefix}[{i}]")]
    return []


def check_finite_payload(payload: Mapping[str, Any], iteration: int, path: Path) -> None:
    """Refuse (:class:`Diverged`) a checkpoint whose model / optimizer state holds NaN or Inf."""
    bad = [n for key in STATE_KEYS if key in payload for n in non_finite_entries(payload[key], key)]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise Diverged(
            f"iteration {iteration}: the training state is not finite ({shown}); it was not saved to "
            f"{path.name}; lower solver.base_lr",
            failed_from=iteration - 1,
        )


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files (``.<name>.<random>.tmp``) that an atomic write killed mid-way left in ``folder``
    (and below); call only while holding the folder's run lock. Returns them; one log line when any."""
    stale = [p for p in folder.rglob(".*.tmp") if p.is_file() and p.name.count(".") >= 3]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning(
            "removed %d temp file(s) of an interrupted write in %s: %s",
            len(stale),
            folder,
            ", ".join(str(p.relative_to(folder)) for p in stale[:5]),
        )
    return stale


class CheckpointManager:
    """Writes ``last.pt`` (+ a kept copy by iteration) for one run and knows its last good checkpoint.

    ``keep``: how many iteration-named copies to keep in ``checkpoints/`` (0 = only ``last.pt``).
    ``last_iter``: the iteration of the ``last.pt`` a resumed run started from (None for a fresh run).
    """

    def __init__(self, out: Path, *, keep: int, last_iter: int | None = None) -> None:
        if int(keep) != keep or keep < 0:
            raise ValueError(f"solver.keep_checkpoints must be an integer >= 0, got {keep!r}")
        self.out, self.keep = Path(out), int(keep)
        self.last_path = self.out / "last.pt"
        self.kept_dir = self.out / KEPT_DIR
        self.last_iter = last_iter
        self._loss_at: dict[int, float] = {}  # loss of the step that started from a saved state
        self._saved: set[int] = set()  # iterations saved by this process
        self._best_loss = math.inf  # lowest finite loss of this process (the scale a sane loss has)

    def kept(self) -> dict[int, Path]:
        """Iteration -> path of the kept copies, oldest first."""
        if not self.kept_dir.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.kept_dir.iterdir() if (m := _KEPT.match(p.name))}
        return dict(sorted(found.items()))

    def kept_path(self, iteration: int) -> Path:
        return self.kept_dir / f"iter_{iteration:07d}.pt"

    def save(self, payload: dict[str, Any], iteration: int) -> Path:
        """Write ``payload`` as ``last.pt`` (refusing a non-finite state) and keep a copy named by iteration."""
        check_finite_payload(payload, iteration, self.last_path)
        save_checkpoint(self.last_path, payload)
        self.last_iter = iteration
        self._saved.add(iteration)
        if self.keep > 0:
            link_or_copy(self.last_path, self.kept_path(iteration))
            sane = self._newest_sane()
            for old in list(self.kept())[: -self.keep]:
                if old != sane:  # while the loss is blowing up, the last sane state is what a resume needs
                    self.kept_path(old).unlink(missing_ok=True)
        return self.last_path

    def _newest_sane(self) -> int | None:
        """The newest kept iteration whose step had a known, not exploded loss."""
        known = [it for it in self.kept() if it in self._loss_at and not self._exploded(it)]
        return known[-1] if known else None

    def forget_after(self, iteration: int) -> None:
        """Drop kept copies newer than ``iteration`` (a resume from an older one abandons that trajectory)."""
        newer = [it for it in self.kept() if it > iteration]
        for it in newer:
            self.kept_path(it).unlink(missing_ok=True)
        if newer:
            log.warning(
                "resuming from iteration %d: removed the newer kept checkpoints of iterations %s",
                iteration,
                ", ".join(map(str, newer)),
            )

    def note_loss(self, iteration: int, loss: float) -> None:
        """Record the loss of the step that started from state ``iteration`` (used to tell a blown-up but finite
        checkpoint from a good one when training diverges)."""
        if math.isfinite(loss):
            self._best_loss = min(self._best_loss, loss)
        if iteration == self.last_iter or iteration in self._saved:
            self._loss_at[iteration] = loss

    def _exploded(self, iteration: int) -> bool:
        """The step from this state had a loss far above the best of the run (100x, at least 10): a state that
        already diverged, even if finite; a lower LR would not save it."""
        loss = self._loss_at.get(iteration)
        return loss is not None and (not math.isfinite(loss) or loss > 100 * max(self._best_loss, 0.1))

    def good_description(self) -> str:
        if self.last_iter is None or not self.last_path.is_file():
            return (
                f"no good checkpoint is left (the diverged ones are {self.kept_dir}/diverged_iter_*.pt): start "
                f"again (without --resume) with a lower solver.base_lr"
            )
        return (
            f"the last good checkpoint is {self.last_path} (iteration {self.last_iter}): continue it with a "
            f"lower LR, e.g. --resume solver.base_lr=<lower>"
        )

    def diverged(self, exc: FloatingPointError) -> Diverged:
        """The error to stop with after ``exc``; ``last.pt`` is first set back to the newest checkpoint older than
        the failing step's starting state (that state repeats the failure on an exact resume)."""
        failed_from = getattr(exc, "failed_from", None)
        if failed_from is not None:
            bad_from = failed_from
            saved = {*self.kept(), *([self.last_iter] if self.last_iter is not None else [])}
            for it in sorted((it for it in saved if it < failed_from), reverse=True):
                if not self._exploded(it):
                    break
                bad_from = it  # its loss had already blown up: not a state to continue from either
            # under torchrun only rank 0 touches the files (the other ranks hold a copy of its manager)
            if self.last_iter is not None and self.last_iter >= bad_from and is_main_process():
                self._restore_before(bad_from)
        stopped = Diverged(
            f"{str(exc).removesuffix('; lower solver.base_lr')}; training stopped; {self.good_description()}",
            failed_from=failed_from,
        )
        stopped.rewound = True
        return stopped

    @contextmanager
    def stop_on_divergence(self) -> Iterator[None]:
        """Turn a :class:`FloatingPointError` in the block into :meth:`diverged`'s one-line error."""
        try:
            yield
        except FloatingPointError as exc:
            if getattr(exc, "rewound", False):
                raise  # an inner block already reported it (a run of several loops)
            raise self.diverged(exc) from None

    def _restore_before(self, failed_from: int) -> None:
        """Rename the checkpoints of ``failed_from`` and later to ``checkpoints/diverged_iter_*.pt`` (kept for a
        post-mortem or a deliberate --resume-from) and make the newest older one ``last.pt``."""
        self.kept_dir.mkdir(parents=True, exist_ok=True)
        for it in [it for it in self.kept() if it >= failed_from]:
            os.replace(self.kept_path(it), self.kept_dir / f"diverged_iter_{it:07d}.pt")
        if self.last_path.is_file():
            diverged = self.kept_dir / f"diverged_iter_{self.last_iter:07d}.pt"
            if diverged.is_file():
                self.last_path.unlink()  # the kept copy of the same state was renamed above
            else:
                os.replace(self.last_path, diverged)
        good = list(self.kept())
        self.last_iter = None
        if good:
            link_or_copy(self.kept_path(good[-1]), self.last_path)
            self.last_iter = good[-1]


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes atomically: a hard link (no copy) where the file system allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network / FUSE file systems): copy
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
