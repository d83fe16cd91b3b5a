#!/usr/bin/env python
"""Export a trained detector: tools/export.py --checkpoint M.pt --out DIR [--format torchscript onnx] [--size 320].

Writes DIR/model.ts (TorchScript) and/or DIR/model.onnx (ONNX, dynamic image size) of the detector's
single-image eval forward (BN folded unless --no-fast-path), plus DIR/export.json: the formats, the ONNX
opset, the input contract (float32 [3,H,W] RGB 0..255, resized as tools/infer.py resizes; boxes, scores,
labels out) and the class names. A missing or foreign checkpoint or an unknown format exits with status 2
and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.inference.export import EXPORT_FORMATS, export_detector  # noqa: E402
from detres.models.build import load_detector  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="train_det checkpoint (model_final.pt)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--format",
        nargs="+",
        default=list(EXPORT_FORMATS),
        metavar="FORMAT",
        help=f"one or more of {', '.join(EXPORT_FORMATS)} (default: both)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="shorter side of the traced example image (default: the model's test scale); "
        "the exported models take any size",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the installed torch's)")
    parser.add_argument("--no-fast-path", action="store_true", help="keep BatchNorm unfolded")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        unknown = [f for f in args.format if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"unknown --format {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}")
        if args.size is not None and args.size < 16:
            raise ValueError(f"--size must be >= 16, got {args.size}")
        model, meta = load_detector(args.checkpoint)
        size = args.size or model.transform.min_size
        info = export_detector(
            model,
            args.out,
            formats=args.format,
            meta=meta,
            example_hw=(size, size * 5 // 4),
            fast_path=not args.no_fast_path,
            opset=args.opset,
            source=str(args.checkpoint),
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    for name, entry in info["formats"].items():
        print(f"{name}: {args.out / entry['file']}")
    print(f"contract -> {args.out / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
