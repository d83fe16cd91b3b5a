"""Evaluate saved detection results: COCO (12 numbers + per-category AP) or PASCAL VOC devkit mAP."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.utils.atomic import write_json_atomic


def _fmt(value: float) -> str:
    return "  nan" if value != value else f"{value:.4f}"


def run_coco(args: argparse.Namespace) -> dict[str, Any]:
    from detres.evaluation.coco import evaluate_coco

    result = evaluate_coco(args.gt, args.results, iou_type=args.iou_type, backend=args.backend)
    print(result["summary_text"], end="")
    print(f"\nper-category AP ({args.iou_type}, IoU=0.50:0.95, -1 = no ground truth):")
    for cat in result["per_category"]:
        print(f"  {cat['name']:<24s} {_fmt(cat['AP'])}")
    result.pop("summary_text")
    return result


def run_voc(args: argparse.Namespace) -> dict[str, Any]:
    from detres.evaluation.voc import evaluate_voc

    result = evaluate_voc(
        args.annotations,
        args.image_set,
        args.results,
        classes=args.classes,
        iou_thresh=args.iou,
        use_07_metric=args.use_07_metric,
        strict_classes=True,  # a misspelt --classes name is an error listing the valid ones, not an AP of nan
    )
    metric = "VOC07 11-point" if args.use_07_metric else "VOC2010+ area"
    print(f"VOC AP ({metric}, IoU >= {args.iou}), {result['num_images']} images:")
    for name, ap in result["per_class"].items():
        counts = f"positives {result['num_positives'][name]}, detections {result['num_detections'][name]}"
        print(f"  {name:<24s} {_fmt(ap)}  ({counts})")
    print(f"  {'mAP':<24s} {_fmt(result['mAP'])}")
    return result


def build_parser() -> argparse.ArgumentParser:
    from detres.evaluation.coco_backend import BACKENDS, DEFAULT_BACKEND

    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="format", required=True)

    coco = sub.add_parser("coco", help="COCO AP/AR with pycocotools (or faster-coco-eval)")
    coco.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    coco.add_argument("--results", required=True, help="results JSON: a list, or a dict with an 'annotations' list")
    coco.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    coco.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="library computing the metrics: pycocotools (the reference) or faster_coco_eval "
        "(same AP within 1e-6, faster on large sets; pip install faster-coco-eval)",
    )
    coco.add_argument("--json-out", help="write the metrics to this JSON file")
    coco.set_defaults(func=run_coco)

    voc = sub.add_parser("voc", help="PASCAL VOC devkit AP from per-class result files")
    voc.add_argument("--annotations", required=True, help="folder of VOC XML files")
    voc.add_argument("--image-set", help="ImageSets file with the image ids (default: every XML in --annotations)")
    voc.add_argument(
        "--results", required=True, help="per-class result file pattern containing {cls}, e.g. 'out/{cls}.txt'"
    )
    voc.add_argument("--classes", nargs="+", help="class names (default: sorted names found in the XML files)")
    voc.add_argument("--iou", type=float, default=0.5, help="IoU threshold; a detection matches when IoU >= this")
    voc.add_argument("--use-07-metric", action="store_true", help="VOC2007 11-point AP instead of the area metric")
    voc.add_argument("--json-out", help="write the metrics to this JSON file")
    voc.set_defaults(func=run_voc)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"
    try:
        result = args.func(args)
        if args.json_out:
            write_json_atomic(args.json_out, result)
            print(f"metrics written to {args.json_out}")
    except (OSError, ValueError, ImportError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
