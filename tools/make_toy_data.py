"""Command line: write the shapes-world toy data (ImageFolder, COCO, VOC, ILSVRC-style) and print its counts."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.data.shapes.world import CATEGORIES, SMALL_COUNTS, generate_shapes_world, summarize_shapes_world  # noqa: E402

_COUNT_FLAGS = {
    "num_cls_train_per_class": "--cls-train-per-class",
    "num_cls_val_per_class": "--cls-val-per-class",
    "num_det_train": "--det-train",
    "num_det_val": "--det-val",
    "num_loc_train": "--loc-train",
    "num_loc_val": "--loc-val",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data_toy"), help="output folder (default: data_toy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives byte-identical files")
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny counts for smoke tests: " + ", ".join(f"{k}={v}" for k, v in SMALL_COUNTS.items()),
    )
    for key, flag in _COUNT_FLAGS.items():
        parser.add_argument(flag, dest=key, type=int, default=None, help=f"override {key}")
    for task in ("cls", "det", "loc"):
        parser.add_argument(
            f"--{task}-size",
            dest=f"{task}_size",
            type=int,
            nargs=2,
            metavar=("MIN", "MAX"),
            default=None,
            help=f"{task} image side range in pixels",
        )
    return parser.parse_args(argv)


def _print_summary(summary: dict[str, Any]) -> None:
    width = max(len(n) for n in CATEGORIES)
    header = f"{'class':<{width}}  cls/train  cls/val  det/train  det/val  loc/train  loc/val"
    print(header)
    print("-" * len(header))
    for name in CATEGORIES:
        cells = [
            summary["cls"]["train"][name],
            summary["cls"]["val"][name],
            summary["det"]["train"]["objects"][name],
            summary["det"]["val"]["objects"][name],
            summary["loc"]["train"]["images"][name],
            summary["loc"]["val"]["images"][name],
        ]
        print(
            f"{name:<{width}}  {cells[0]:>9}  {cells[1]:>7}  {cells[2]:>9}  {cells[3]:>7}  {cells[4]:>9}  {cells[5]:>7}"
        )
    for split in ("train", "val"):
        print(
            f"det/{split}: {summary['det'][split]['images']} images; "
            f"loc/{split}: {sum(summary['loc'][split]['images'].values())} images, "
            f"{summary['loc'][split]['objects']} objects"
        )
    print("(det columns count objects; cls and loc columns count images)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs: dict[str, Any] = dict(SMALL_COUNTS) if args.small else {}
    for key in _COUNT_FLAGS:
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    for task in ("cls", "det", "loc"):
        if getattr(args, f"{task}_size") is not None:
            kwargs[f"{task}_size"] = tuple(getattr(args, f"{task}_size"))
    start = time.perf_counter()
    try:
        paths = generate_shapes_world(args.out, seed=args.seed, **kwargs)
    except (ValueError, OSError) as exc:  # bad sizes/counts or a folder we must not overwrite
        print(f"make_toy_data: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"shapes world in {paths['root']} ({elapsed:.1f} s; unchanged folders are reused)")
    for key in ("cls_train", "det_coco_train", "voc_root", "loc_root"):
        print(f"  {key}: {paths[key]}")
    _print_summary(summarize_shapes_world(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
