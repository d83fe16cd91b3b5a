"""Command-line options for test-time post-processing, shared by tools/test_det.py and tools/infer.py."""
from __future__ import annotations

import argparse
from typing import Any

from detres.models.postprocess import NMS_METHODS


def add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """--nms-method, --soft-nms-*, --box-voting[-iou]: each overrides the checkpoint's setting only when given."""
    parser.add_argument("--nms-method", choices=NMS_METHODS, default=None,
                        help="per-class NMS: nms (hard, the paper), soft_linear or soft_gaussian (Bodla et al.)")
    parser.add_argument("--soft-nms-sigma", type=float, default=None, help="soft_gaussian's sigma")
    parser.add_argument("--soft-nms-score-thresh", type=float, default=None,
                        help="soft-NMS drops boxes whose decayed score is not above this")
    parser.add_argument("--box-voting", action=argparse.BooleanOptionalAction, default=None,
                        help="Appendix-B box voting after NMS (--no-box-voting: off)")
    parser.add_argument("--box-voting-iou", type=float, default=None, help="IoU at which a pre-NMS box votes")


def postprocess_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as keyword arguments of ``configure_postprocess`` (None = keep the checkpoint's)."""
    return {"nms_method": args.nms_method, "soft_nms_sigma": args.soft_nms_sigma,
            "soft_nms_score_thresh": args.soft_nms_score_thresh, "box_voting": args.box_voting,
            "box_voting_iou": args.box_voting_iou}
