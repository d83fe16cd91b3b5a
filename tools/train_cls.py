#!/usr/bin/env python
"""Pre-train a ResNet classifier: tools/train_cls.py --config configs/cls/X.yaml [--resume] [key=value ...]."""
from __future__ import annotations

import argparse
import json
import sys

from detres.config.load import ConfigError, load_config
from detres.engine.cls_trainer import train_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config (task: cls)")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    parser.add_argument("overrides", nargs="*", help="config overrides such as solver.max_iter=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train_classifier(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"train_cls: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
