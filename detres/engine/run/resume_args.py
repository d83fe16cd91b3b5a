"""The resume options shared by the training tools (--resume, --resume-or-start, --resume-from, --allow-model-
change)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_resume_arguments", "resume_kwargs"]


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the resume flags; :func:`resume_kwargs` turns them into the trainers' keyword arguments."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue <output_dir>/last.pt (an error when there is none)"
    )
    group.add_argument(
        "--resume-or-start",
        action="store_true",
        help="continue <output_dir>/last.pt when there is one, else start a fresh run (job scripts "
        "that are restarted after pre-emption)",
    )
    group.add_argument(
        "--resume-from",
        metavar="PATH",
        help="continue this checkpoint, e.g. an older <output_dir>/checkpoints/iter_*.pt; it becomes "
        "last.pt and the newer kept checkpoints are removed",
    )
    parser.add_argument(
        "--allow-model-change",
        action="store_true",
        help="on resume, build the model from the config's changed model.* options and load the "
        "checkpoint's weights into it (an error when a shape differs); without it such a "
        "resume is refused",
    )


def resume_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``resume`` / ``resume_from`` / ``allow_model_change`` for train_classifier, train_detector, train_localizer."""
    resume: bool | str = "auto" if args.resume_or_start else bool(args.resume)
    return {"resume": resume, "resume_from": args.resume_from, "allow_model_change": args.allow_model_change}
