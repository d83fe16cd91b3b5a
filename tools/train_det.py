#!/usr/bin/env python
"""Train a ResNet-C4 Faster R-CNN: tools/train_det.py --config configs/det/X.yaml [--resume] [key=value ...].

Writes <output_dir>/{config.yaml, metrics.jsonl, last.pt, model_final.pt, metrics.json,
loss_curves.png, val_curves.png, test/}. Bad input (unknown config key, missing annotation or
image file, an existing run without --resume) exits with status 2 and a message naming it.
Resume: --resume continues <output_dir>/last.pt (an error when there is none), --resume-or-start starts fresh
when there is none, --resume-from PATH continues an older <output_dir>/checkpoints/iter_*.pt; changed model.*
options are refused on resume unless --allow-model-change. SIGINT / SIGTERM save last.pt and exit 130 / 143; a
NaN / Inf loss or state exits 1 naming the last good checkpoint; a second run in the same folder exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.config.load import load_config  # noqa: E402
from detres.engine.distributed import is_main_process  # noqa: E402
from detres.engine.run.exit_status import run_training  # noqa: E402
from detres.engine.run.resume_args import add_resume_arguments, resume_kwargs  # noqa: E402
from detres.engine.tasks.detection import train_detector  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402
from detres.utils.atomic import dumps_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: det)")
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides such as solver.max_iter=100")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before or after the options
    status, metrics = run_training(
        "train_det", lambda: train_detector(load_config(args.config, args.overrides), **resume_kwargs(args))
    )
    if status:
        return status
    if not is_main_process():
        return 0  # torchrun: rank 0 prints the summary
    summary = {
        "COCO": metrics["coco"]["summary"],
        "VOC mAP": metrics["voc"]["mAP"],
        "iterations": metrics["iterations"],
        "train_time_s": metrics["train_time_s"],
    }
    print(dumps_json(summary))
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        sys.exit(main())
