"""Metric logs: JSON lines (one object per line, appended as training goes) and TensorBoard event files beside them.

Only rank 0 of a distributed run writes either; the other ranks' loggers do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detres.utils.dist import is_main_process

log = logging.getLogger(__name__)
EVENT_GLOB = "events.out.tfevents.*"  # TensorBoard's event file names


def _clean(value: Any) -> Any:
    """Make tensors/numpy scalars JSON-able and keep NaN/inf readable (as strings)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLinesLogger:
    """Append-only metrics log; on resume, lines past the resumed iteration are dropped first.

    ``tensorboard``: also write every numeric field of a record as a TensorBoard scalar (tag = the field
    name, step = the record's ``iter``) into event files in the same folder (``tensorboard --logdir`` on
    it, or on a parent of many runs). A fresh run deletes the folder's old event files, as it deletes the
    old ``metrics.jsonl``; a resumed one tells TensorBoard to drop the steps past the resumed iteration.
    On a distributed run's ranks other than 0 the logger is inert (no file is touched).
    """

    def __init__(self, path: str | Path, *, resume_from_iter: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.enabled = is_main_process()
        self._writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_iter is not None and self.path.exists():
            kept = [r for r in read_json_lines(self.path) if r.get("iter", 0) <= resume_from_iter]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_from_iter is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            self._writer = _event_writer(self.path.parent, resume_from_iter)

    def log(self, **record: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with self.path.open("a") as handle:
            handle.write(line + "\n")
        if self._writer is not None:
            step = record.get("iter")
            for key, value in record.items():
                value = _clean(value)
                if key != "iter" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._writer.add_scalar(key, float(value), global_step=step)
            self._writer.flush()  # a watched run shows each record as soon as it is logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _event_writer(folder: Path, resume_from_iter: int | None) -> Any:
    """A TensorBoard SummaryWriter on ``folder`` (None, after a warning, when tensorboard is not installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # a declared dependency, but a bare environment should still train
        log.warning("no TensorBoard event files: %s (pip install tensorboard)", exc)
        return None
    if resume_from_iter is None:
        for old in folder.glob(EVENT_GLOB):
            old.unlink()
    purge = None if resume_from_iter is None else resume_from_iter + 1
    return SummaryWriter(log_dir=str(folder), purge_step=purge)


def read_json_lines(path: str | Path) -> list[dict]:
    return list(_iter_json_lines(Path(path)))


def _iter_json_lines(path: Path) -> Iterator[dict]:
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc
