"""JSON-lines metric logs: one JSON object per line, appended and flushed as training goes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator


def _clean(value: Any) -> Any:
    """Make tensors/numpy scalars JSON-able and keep NaN/inf readable (as strings)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLinesLogger:
    """Append-only metrics log; on resume, lines past the resumed iteration are dropped first."""

    def __init__(self, path: str | Path, *, resume_from_iter: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_iter is not None and self.path.exists():
            kept = [r for r in read_json_lines(self.path) if r.get("iter", 0) <= resume_from_iter]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_from_iter is None and self.path.exists():
            self.path.unlink()

    def log(self, **record: Any) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with self.path.open("a") as handle:
            handle.write(line + "\n")


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
