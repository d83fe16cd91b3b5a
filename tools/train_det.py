#!/usr/bin/env python
"""Train a ResNet-C4 Faster R-CNN: tools/train_det.py --config configs/det/X.yaml [--resume] [key=value ...]."""
from __future__ import annotations

import argparse
import json
import sys

from detres.config.load import ConfigError, load_config
from detres.engine.det_trainer import train_detector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config (task: det)")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    parser.add_argument("overrides", nargs="*", help="config overrides such as solver.max_iter=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train_detector(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"train_det: error: {exc}", file=sys.stderr)
        return 2
    summary = {"COCO": metrics["coco"]["summary"], "VOC mAP": metrics["voc"]["mAP"],
               "iterations": metrics["iterations"], "train_time_s": metrics["train_time_s"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
