"""How a training tool ends: one stderr line and an exit status for every way a run can stop.

0 done; 1 diverged (a NaN / Inf loss or state; the message names the last good checkpoint); 2 bad input or a
refused request (config, data, resume); 128 + signal when SIGINT / SIGTERM stopped the run after saving last.pt
(as shells report it), 130 for a second Ctrl-C that stopped it at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from detres.config.load import ConfigError
from detres.engine.run.setup import TrainingInterrupted

__all__ = ["run_training"]

T = TypeVar("T")
BAD_INPUT = (ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError)


def run_training(tool: str, train: Callable[[], T]) -> tuple[int, T | None]:
    """Call ``train()``; returns (0, its result) or (exit status, None) after printing ``<tool>: ...`` to stderr."""
    try:
        return 0, train()
    except BAD_INPUT as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2, None
    except FloatingPointError as exc:  # diverged: not bad input, but a clear message beats a traceback
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 1, None
    except TrainingInterrupted as exc:  # last.pt saved at the iteration reached
        print(f"{tool}: {exc}", file=sys.stderr)
        return exc.exit_status, None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130, None
