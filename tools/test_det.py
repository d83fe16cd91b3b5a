#!/usr/bin/env python
"""Evaluate a trained detector on a dataset: tools/test_det.py --config C.yaml --checkpoint M.pt [M2.pt ...] [key=value
...].

Several checkpoints are evaluated as one ensemble (Appendix B: union of proposals, averaged scores and
boxes; the class lists must agree). The Appendix-B test-time extras come from the config's test section,
overridden by the flags (--box-refinement, --multiscale --scales ..., --flip, ...). Writes COCO results JSON,
the ground truth it scored (coco_gt.json), VOC devkit result files,
metrics.json, a per-class precision-recall plot (pr_curves.png) and example PNGs under --out
(default <output_dir>/test) and prints the COCO and VOC metrics.
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
from detres.data.build import build_detection_dataset  # noqa: E402
from detres.engine.det_test import test_detector  # noqa: E402
from detres.engine.run.setup import resolve_device  # noqa: E402
from detres.inference.ensemble import load_ensemble  # noqa: E402
from detres.inference.test_config import TestConfig, add_test_arguments, split_overrides  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402
from detres.utils.atomic import dumps_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: det); data.val_* is the test set")
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="train_det checkpoint(s) (model_final.pt or last.pt); several = an ensemble",
    )
    parser.add_argument("--out", default=None, help="output folder (default <output_dir>/test)")
    add_test_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.val_ann=...")
    args = parser.parse_args(argv)
    args.checkpoint, args.overrides = split_overrides(args.checkpoint, args.overrides)
    args.scales, args.overrides = split_overrides(args.scales, args.overrides)
    try:
        cfg = load_config(args.config, args.overrides)
        options = TestConfig.from_config(cfg).with_flags(args)
        device = resolve_device(cfg.device)
        models, meta = load_ensemble(args.checkpoint, device=device)
        dataset = build_detection_dataset(cfg, "val", train=False, class_names=meta["class_names"])
        names = [c["name"] for c in dataset.categories]
        if names != meta["class_names"]:
            raise ValueError(
                f"{args.checkpoint[0]} was trained on classes {meta['class_names']}, the test set has {names}"
            )
        out = Path(args.out) if args.out else Path(cfg.output_dir) / "test"
        metrics = test_detector(models, dataset, meta, cfg, out_dir=out, device=device, options=options)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"test_det: error: {exc}", file=sys.stderr)
        return 2
    print(
        dumps_json(
            {
                "COCO": metrics["coco"]["summary"],
                "VOC mAP": metrics["voc"]["mAP"],
                "VOC per class": metrics["voc"]["per_class"],
                "out": str(out),
            }
        )
    )
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        sys.exit(main())
