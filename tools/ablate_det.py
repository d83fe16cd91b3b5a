#!/usr/bin/env python
"""Table 9 of the ResNet paper on a val set: tools/ablate_det.py --config C.yaml --baseline M.pt [--context M2.pt]
[--ensemble M3.pt ...] [--rows baseline,refinement,context,multiscale,ensemble] [--max-images N] [--out DIR]
[--json-out F] [key=value ...].

Rows, each adding to the row above: baseline (all extras off), +box refinement (with box voting), +context
(the --context checkpoint), +multi-scale (the config's test.multiscale), ensemble (the main model plus
--ensemble). Prints a markdown table (COCO mAP@.5 and mAP@[.5:.95], VOC07 mAP, seconds and GFLOPs per image,
cost vs FLOPs); --json-out writes the rows as JSON, --out the per-row COCO results files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.config.load import ConfigError, load_config  # noqa: E402
from detres.engine.ablation import run_ablation  # noqa: E402
from detres.engine.run.setup import resolve_device  # noqa: E402
from detres.evaluation.ablation import ROW_NAMES, cost_warnings, markdown_table  # noqa: E402
from detres.inference.test_config import split_overrides  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402
from detres.utils.atomic import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: det); data.val_* is the test set")
    parser.add_argument("--baseline", required=True, help="baseline train_det checkpoint")
    parser.add_argument("--context", default=None, help="global-context checkpoint (the +context row)")
    parser.add_argument("--ensemble", nargs="+", default=[], help="further ensemble members (the ensemble row)")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated subset of {','.join(ROW_NAMES)} (default: every row the checkpoints allow)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N val images only")
    parser.add_argument("--out", type=Path, default=None, help="folder for per-row COCO results files")
    parser.add_argument("--json-out", type=Path, default=None, help="write the rows as a JSON list here")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.val_ann=...")
    args = parser.parse_args(argv)
    args.ensemble, args.overrides = split_overrides(args.ensemble, args.overrides)
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    try:
        cfg = load_config(args.config, args.overrides)
        rows = run_ablation(
            cfg,
            baseline=args.baseline,
            context=args.context,
            ensemble=args.ensemble,
            rows=args.rows,
            max_images=args.max_images,
            out_dir=args.out,
            device=resolve_device(cfg.device),
            log=lambda line: print(line, file=sys.stderr),
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"ablate_det: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    for line in cost_warnings(rows):
        print(line)
    if args.json_out is not None:
        write_json_atomic(args.json_out, rows)
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        sys.exit(main())
