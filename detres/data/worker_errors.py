"""Readable data errors from DataLoader workers: the one line that names the bad file, not a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def original_worker_message(exc: BaseException) -> str | None:
    """The original message of an error re-raised from a DataLoader worker, or None if it is not one.

    torch re-raises a worker's exception with the same type but a message holding the worker's
    whole traceback; the last lines of that traceback are ``<module.ClassName>: <original message>``.
    """
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    if "DataLoader worker" not in text or "Original Traceback" not in text:
        return None
    lines = text.rstrip().splitlines()
    pattern = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ?(.*)$")
    for start in range(len(lines) - 1, 0, -1):
        match = pattern.match(lines[start])
        if match:
            return "\n".join([match.group(1), *lines[start + 1 :]]).strip()
    return None


@contextmanager
def readable_worker_errors() -> Iterator[None]:
    """Re-raise data errors (unreadable images, missing files) from loader workers with their own message.

    Without this a corrupt image met inside a worker surfaces as a multi-line worker traceback;
    with it the user sees the same exception type with the one line that names the file.
    """
    try:
        yield
    except (ValueError, OSError) as exc:
        message = original_worker_message(exc)
        if message is None:
            raise
        try:
            clean = type(exc)(message)
        except Exception:  # an exception type that cannot be rebuilt from one message: keep it as is
            raise exc from None
        raise clean from None


def readable(batches: Iterable[T]) -> Iterator[T]:
    """Iterate ``batches`` (e.g. a DataLoader) with :func:`readable_worker_errors` around every fetch."""
    with readable_worker_errors():
        yield from batches
