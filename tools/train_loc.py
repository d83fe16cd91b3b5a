#!/usr/bin/env python
"""Train the ImageNet-style localizer (Appendix C): tools/train_loc.py --config configs/loc/X.yaml [--stage rpn]
[--resume] [key=value ...].

Stage rpn: the per-class RPN on a train_cls backbone; writes <output_dir>/{config.yaml, metrics.jsonl, last.pt,
model_final.pt, loss_curves.png, metrics.json, test/} and prints the Table-13-style report. Stage rcnn: the
RoI-centric R-CNN on the proposals of the RPN stage's model.rcnn.rpn_checkpoint (also proposals.pt), then the
RPN+R-CNN dense rows. Bad input exits with status 2 and a message naming the file/field.
Resume: --resume continues <output_dir>/last.pt (an error when there is none), --resume-or-start starts fresh
when there is none, --resume-from PATH continues an older <output_dir>/checkpoints/iter_*.pt; changed model.*
options are refused on resume unless --allow-model-change. SIGINT / SIGTERM save last.pt and exit 130 / 143; a
NaN / Inf loss or state exits 1 naming the last good checkpoint; a second run in the same folder exits 2.
Both stages run data-parallel under torchrun (solver.images_per_batch / model.rcnn.regions_per_batch are the
global batches, split over the processes; rank 0 writes the files and tests) and equal a one-process run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.config.load import ConfigError, load_config  # noqa: E402
from detres.engine.distributed import is_main_process  # noqa: E402
from detres.engine.loc_eval import format_table  # noqa: E402
from detres.engine.run.exit_status import run_training  # noqa: E402
from detres.engine.run.resume_args import add_resume_arguments, resume_kwargs  # noqa: E402
from detres.engine.tasks.localization import STAGES, train_localizer  # noqa: E402


def _train(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    if cfg.task != "loc":
        raise ConfigError(f"{args.config}: task is {cfg.task!r}; train_loc needs a 'task: loc' config")
    return train_localizer(cfg, **resume_kwargs(args), stage=args.stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: loc)")
    parser.add_argument(
        "--stage", default="rpn", choices=STAGES, help="rpn (default) or rcnn (needs model.rcnn.rpn_checkpoint)"
    )
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides such as solver.max_iter=100")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    status, report = run_training("train_loc", lambda: _train(args))
    if status:
        return status
    if not is_main_process():
        return 0  # torchrun: rank 0 tests and prints the report
    print(format_table(report))
    print(f"iterations {report['iterations']}, training CPU time {report['train_cpu_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
