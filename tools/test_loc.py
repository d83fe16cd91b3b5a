#!/usr/bin/env python
"""Test a localizer (RPN stage, or RPN + R-CNN): tools/test_loc.py --config C.yaml --checkpoint M.pt [--classifier
CLS.pt] [--mode 1crop|dense|both] [--json-out F] [key=value ...].

A ``--checkpoint`` of the R-CNN stage is tested with the RPN-stage checkpoint it was trained on (its
``rpn_checkpoint``): the whole of Table 13 in one report, the RPN's own rows (``--mode``) and the "RPN+R-CNN" rows
(dense), on the same images and predicted classes. Prints Table 13's rows: LOC error on the ground-truth class
(1-crop and/or dense) and, with a classifier
(``--classifier`` or ``test.classifier``), top-1/top-5 LOC error of dense testing on its top-5 predicted classes.
Writes devkit prediction files and loc_test.json to --out-dir (default <output_dir>/test). Bad input exits 2.
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
from detres.engine.loc_data import load_loc_records  # noqa: E402
from detres.engine.loc_eval import (
    format_table,  # noqa: E402
    test_from_config,  # noqa: E402
)
from detres.models.localization.rcnn_localizer import load_rpn_rcnn_localizer  # noqa: E402
from detres.models.localization.rpn_localizer import load_localizer  # noqa: E402
from detres.utils.atomic import write_json_atomic  # noqa: E402
from detres.utils.torch_files import load_checkpoint  # noqa: E402

MODES = {"1crop": ("1crop",), "dense": ("dense",), "both": ("1crop", "dense")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (task: loc)")
    parser.add_argument("--checkpoint", required=True, help="train_loc model_final.pt / last.pt")
    parser.add_argument("--classifier", default=None, help="train_cls checkpoint for predicted classes")
    parser.add_argument("--classifier-mode", default=None, choices=("1crop", "dense"))
    parser.add_argument("--mode", default="both", choices=sorted(MODES))
    parser.add_argument("--out-dir", default=None, help="prediction files (default <output_dir>/test)")
    parser.add_argument("--json-out", default=None, help="write the report as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides such as test.scales=[64,96]")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.task != "loc":
            raise ConfigError(f"{args.config}: task is {cfg.task!r}; test_loc needs a 'task: loc' config")
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint: file not found: {args.checkpoint}")
        stage = load_checkpoint(args.checkpoint, mmap=True).get("stage")
        if stage == "rcnn":
            model, meta = load_rpn_rcnn_localizer(args.checkpoint, score_fusion=cfg.test.rcnn_score_fusion)
            modes, prefix, rpn_modes = ("dense",), "rpn_rcnn", MODES[args.mode]
        else:
            model, meta = load_localizer(args.checkpoint)
            modes, prefix, rpn_modes = MODES[args.mode], "rpn", ()
        _, val, synsets = load_loc_records(cfg.data)
        if synsets != meta["synsets"]:
            raise ValueError(
                f"{args.checkpoint}: trained on {len(meta['synsets'])} synsets that differ from "
                f"data.root's {len(synsets)}"
            )
        if args.classifier is not None and not Path(args.classifier).is_file():
            raise FileNotFoundError(f"--classifier: file not found: {args.classifier}")
        out_dir = Path(args.out_dir) if args.out_dir else Path(cfg.output_dir) / "test"
        report = test_from_config(
            model,
            cfg,
            val,
            synsets,
            out_dir=out_dir,
            modes=modes,
            row_prefix=prefix,
            classifier=args.classifier,
            classifier_mode=args.classifier_mode,
            rpn_modes=rpn_modes,
        )
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"test_loc: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json_out:
        write_json_atomic(args.json_out, dict(report, checkpoint=args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
