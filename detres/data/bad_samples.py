"""The bad-sample policy (``data.on_bad_sample``): stop at the first bad sample, or drop, count and list them."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from detres.utils.dist import is_main_process

__all__ = ["BOX_TOLERANCE_PX", "BadSampleError", "BadSamples", "POLICIES", "SKIPPED_FILE", "write_skipped"]

log = logging.getLogger(__name__)
POLICIES = ("error", "skip")
SKIPPED_FILE = "skipped_samples.json"
# How far (pixels) a box may stick out of its image before it is malformed rather than clipped: annotation
# tools round to the pixel, and VOC's inclusive xmax may equal the width.
BOX_TOLERANCE_PX = 1.0


class BadSampleError(ValueError):
    """A sample (image file or annotation) is unusable and ``data.on_bad_sample`` is "error"."""


class BadSamples:
    """Collects bad samples under one policy: "error" raises at the first, "skip" records (file, reason).

    A dataset reports every unusable image or annotation here and leaves it out when :meth:`report`
    returns (which it only does under "skip").
    """

    def __init__(self, policy: str = "error", *, source: str = "data.on_bad_sample") -> None:
        if policy not in POLICIES:
            raise ValueError(f"{source}: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.skipped: list[dict[str, str]] = []

    @classmethod
    def from_config(cls, cfg: Any) -> BadSamples:
        """The policy of ``cfg.data.on_bad_sample`` ("error" for configs written before the option)."""
        return cls(str(cfg.data.get("on_bad_sample", "error")))

    def report(self, file: str | os.PathLike, reason: str, *, kind: str = "annotation") -> None:
        """Raise BadSampleError naming ``file`` and ``reason`` (policy "error"), else record the sample."""
        if self.policy == "error":
            raise BadSampleError(f"{file}: {reason} (data.on_bad_sample=skip drops such samples and lists them)")
        self.skipped.append({"file": str(file), "kind": kind, "reason": reason})

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """One line: how many samples were skipped, of which kinds."""
        kinds = Counter(s["kind"] for s in self.skipped)
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"skipped {len(self.skipped)} bad samples ({parts or 'none'}) under data.on_bad_sample=skip"


def write_skipped(out_dir: str | os.PathLike, *collections: BadSamples) -> Path | None:
    """Under "skip": write every recorded sample to ``<out_dir>/skipped_samples.json`` (atomically) and log one
    summary line; returns the path (None under "error", where nothing can have been skipped)."""
    from detres.utils.atomic import write_json_atomic

    if not collections or all(c.policy == "error" for c in collections):
        return None
    if not is_main_process():  # torchrun: every rank checked the same data; rank 0 writes the list
        return Path(out_dir) / SKIPPED_FILE
    merged = BadSamples("skip")
    for c in {id(c): c for c in collections}.values():  # train and val may share one collection
        merged.skipped += c.skipped
    path = Path(out_dir) / SKIPPED_FILE
    write_json_atomic(path, {"policy": "skip", "count": len(merged), "samples": merged.skipped})
    (log.warning if len(merged) else log.info)("%s; list in %s", merged.summary(), path)
    return path
