#!/usr/bin/env python
"""Pre-train a ResNet classifier: tools/train_cls.py --config configs/cls/X.yaml [--resume] [key=value ...].

Writes <output_dir>/{config.yaml, metrics.jsonl, last.pt, model_final.pt, metrics.json, curves.png}.
The validation set is data.val_dir as class folders, or a flat image folder labelled by data.val_labels
("<file> <class name> ..." per line, e.g. Tiny-ImageNet's val_annotations.txt); images of classes the
training set lacks are skipped, warned about once and counted in metrics.json (val_skipped_unknown_class).
LR: solver.lr_schedule=plateau (divide by 10 when the val error plateaus, not sooner than
solver.plateau_min_epochs after the start / the last drop) or solver.lr_schedule=step "solver.steps=[...]".
Bad input (unknown config key, missing folder, empty class folder, unreadable image) exits with
status 2 and a one-line message naming the key or file.
Resume: --resume continues <output_dir>/last.pt (an error when there is none), --resume-or-start starts fresh
when there is none, --resume-from PATH continues an older <output_dir>/checkpoints/iter_*.pt; changed model.*
options are refused on resume unless --allow-model-change. SIGINT / SIGTERM save last.pt and exit 130 / 143; a
NaN / Inf loss or state exits 1 naming the last good checkpoint; a second run in the same folder exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.config.load import ConfigError, load_config  # noqa: E402
from detres.engine.distributed import is_main_process  # noqa: E402
from detres.engine.run.exit_status import run_training  # noqa: E402
from detres.engine.run.resume_args import add_resume_arguments, resume_kwargs  # noqa: E402
from detres.engine.tasks.classification import train_classifier  # noqa: E402
from detres.utils.atomic import dumps_json  # noqa: E402


def _train(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    if cfg.task != "cls":
        raise ConfigError(f"{args.config}: task is {cfg.task!r}; train_cls needs a 'cls' config")
    return train_classifier(cfg, **resume_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: cls)")
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides such as solver.max_iter=100")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before or after the options
    status, metrics = run_training("train_cls", lambda: _train(args))
    if status:
        return status
    if is_main_process():  # torchrun: rank 0 prints the metrics
        print(dumps_json(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
