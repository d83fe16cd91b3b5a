#!/usr/bin/env python
"""Train a ResNet-C4 Faster R-CNN: tools/train_det.py --config configs/det/X.yaml [--resume] [key=value ...].

Writes <output_dir>/{config.yaml, metrics.jsonl, last.pt, model_final.pt, metrics.json,
loss_curves.png, val_curves.png, test/}. Bad input (unknown config key, missing annotation or
image file, an existing run without --resume) exits with status 2 and a message naming it.
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
from detres.engine.det_trainer import train_detector  # noqa: E402
from detres.utils.atomic import dumps_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except FloatingPointError as exc:  # diverged: not bad input, but a clear message beats a traceback
        print(f"train_det: error: {exc}", file=sys.stderr)
        return 1
    summary = {"COCO": metrics["coco"]["summary"], "VOC mAP": metrics["voc"]["mAP"],
               "iterations": metrics["iterations"], "train_time_s": metrics["train_time_s"]}
    print(dumps_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
