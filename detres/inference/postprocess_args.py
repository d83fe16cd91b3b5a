"""Command-line options for test-time post-processing and the Appendix-B extras, shared by test_det, infer,
ablate_det."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from detres.inference.test_time import TestTimeOptions
from detres.models.detection.postprocess import NMS_METHODS


def add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """--nms-method, --soft-nms-*, --box-voting[-iou]: each overrides the checkpoint's setting only when given."""
    parser.add_argument(
        "--nms-method",
        choices=NMS_METHODS,
        default=None,
        help="per-class NMS: nms (hard, the paper), soft_linear or soft_gaussian (Bodla et al.)",
    )
    parser.add_argument("--soft-nms-sigma", type=float, default=None, help="soft_gaussian's sigma")
    parser.add_argument(
        "--soft-nms-score-thresh",
        type=float,
        default=None,
        help="soft-NMS drops boxes whose decayed score is not above this",
    )
    parser.add_argument(
        "--box-voting",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Appendix-B box voting after NMS (--no-box-voting: off)",
    )
    parser.add_argument("--box-voting-iou", type=float, default=None, help="IoU at which a pre-NMS box votes")


def postprocess_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as keyword arguments of ``configure_postprocess`` (None = keep the checkpoint's)."""
    return {
        "nms_method": args.nms_method,
        "soft_nms_sigma": args.soft_nms_sigma,
        "soft_nms_score_thresh": args.soft_nms_score_thresh,
        "box_voting": args.box_voting,
        "box_voting_iou": args.box_voting_iou,
    }


def add_test_time_arguments(parser: argparse.ArgumentParser, *, defaults: str = "the config's test section") -> None:
    """The Appendix-B test-time switches (``TestTimeOptions``); each overrides the base options only when given."""
    group = parser.add_argument_group(f"Appendix-B test-time extras (default: {defaults})")
    group.add_argument(
        "--box-refinement",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="second RoI pass on the regressed boxes, NMS on the union of both passes",
    )
    group.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score RoIs on an image pyramid, maxout of the two levels bracketing --reference-size",
    )
    group.add_argument(
        "--scales",
        nargs="+",
        default=None,
        metavar="N",  # parsed as floats by test_time_options
        help="pyramid shorter sides in pixels (with --multiscale)",
    )
    group.add_argument(
        "--reference-size",
        type=float,
        default=None,
        metavar="F",
        help="RoI side whose area picks the pyramid levels (the pre-training crop, 224)",
    )
    group.add_argument(
        "--pyramid-proposals",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --multiscale, also run the RPN on every level and merge the proposals",
    )
    group.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average scores and boxes with those of the mirrored image",
    )
    group.add_argument(
        "--proposal-nms",
        type=float,
        default=None,
        metavar="F",
        help="NMS threshold when merging proposal sets (ensembles, pyramid proposals)",
    )
    group.add_argument(
        "--max-proposals", type=int, default=None, metavar="N", help="proposals kept after merging proposal sets"
    )


# flag destination -> TestTimeOptions field
_TEST_TIME_FIELDS = {
    "box_refinement": "box_refinement",
    "multiscale": "multiscale",
    "scales": "scales",
    "reference_size": "reference_size",
    "pyramid_proposals": "pyramid_proposals",
    "flip": "flip",
    "proposal_nms": "proposal_nms_thresh",
    "max_proposals": "max_proposals",
}


def test_time_options(args: argparse.Namespace, base: TestTimeOptions) -> TestTimeOptions:
    """``base`` with the test-time flags that were given (None = keep ``base``'s value).

    Raises ValueError naming the flag when the result is not a valid ``TestTimeOptions``.
    """
    changes: dict[str, Any] = {}
    for dest, field in _TEST_TIME_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            changes[field] = _floats(value, "--scales") if dest == "scales" else value
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        named = [
            f"--{dest.replace('_', '-')}"
            for dest, field in _TEST_TIME_FIELDS.items()
            if field in changes and field in str(exc)
        ]
        raise ValueError(f"{', '.join(named) or 'test-time flags'}: {exc}") from None


def _floats(values: list[str], flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"{flag}: expected numbers, got {values}") from None


def split_overrides(values: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """Separate ``key=value`` config overrides that a ``nargs="+"`` option swallowed from its own values.

    ``--checkpoint a.pt b.pt data.val_ann=x.json`` parses the override as a third checkpoint; an entry is
    taken for an override when it has a ``=`` whose left side is a dotted name and is not an existing file.
    Returns (the option's values, the overrides: the swallowed ones first); None values stay None.
    """
    kept, moved = [], []
    for value in values or []:
        key = value.split("=", 1)[0]
        if "=" in value and key.replace(".", "").replace("_", "").isalnum() and not Path(value).exists():
            moved.append(value)
        else:
            kept.append(value)
    return (None if values is None else kept), [*moved, *overrides]
