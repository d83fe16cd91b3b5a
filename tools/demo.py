#!/usr/bin/env python
"""Run the main job end-to-end on the built-in shapes world.

tools/demo.py --out runs/demo [--overwrite] [--no-ablation] [--no-localization]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detres.engine.demo import run_demo
from detres.evaluation.ablation import cost_warnings, markdown_table
from detres.models.detection.fast_roi_pool import single_thread_roi_pool
from detres.utils.atomic import dumps_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run folder (classification + detection outputs)")
    parser.add_argument("--data", default="data_toy", help="where the shapes world is generated (reused if there)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the Table-9 rows (baseline, +box refinement, +multi-scale) after testing",
    )
    parser.add_argument(
        "--no-localization",
        action="store_true",
        help="skip the localizer's RPN stage (Appendix C) on the shapes world's LOC split",
    )
    args = parser.parse_args(argv)
    try:
        summary = run_demo(
            args.out,
            data_root=args.data,
            repo_root=Path(__file__).resolve().parents[1],
            overwrite=args.overwrite,
            seed=args.seed,
            ablation=not args.no_ablation,
            localization=not args.no_localization,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(dumps_json(summary))
    if summary["ablation"] is not None:
        print(markdown_table(summary["ablation"]["rows"]))
        for line in cost_warnings(summary["ablation"]["rows"]):
            print(line)
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        sys.exit(main())
