"""One run per output folder: an advisory ``flock`` on ``<output_dir>/.lock`` that holds the owner's pid.

The kernel drops a ``flock`` when its process dies (also by ``kill -9``), so a crashed run never leaves a
stale lock behind: the file may stay, but it is only locked while a live process holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"


class RunLockedError(FileExistsError):
    """Another live process trains into the same output folder."""


class RunLock:
    """``with RunLock(output_dir):`` holds the folder's lock for the block (re-entrant within one process)."""

    _held: dict[Path, int] = {}  # folder -> open fd, so nested trainers of one process share the lock

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir).resolve()
        self.path = self.folder / LOCK_NAME
        self._owner = False

    def __enter__(self) -> RunLock:
        if self.folder in RunLock._held:
            return self  # this process already holds it (e.g. a stage that calls another trainer)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by another training run (pid {holder}, lock file "
                f"{self.path}); wait for it to finish or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        RunLock._held[self.folder] = fd
        self._owner = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._owner:
            return
        fd = RunLock._held.pop(self.folder)
        os.ftruncate(fd, 0)  # an unlocked file naming a pid would mislead a reader
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._owner = False
