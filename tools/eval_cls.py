#!/usr/bin/env python
"""Evaluate a classification checkpoint (train_cls, legacy CIFAR .th or torchvision state_dict) on an
ImageFolder, or on a flat image folder plus a labels file (--val-labels; ImageNet / Tiny-ImageNet val).

Examples:
  tools/eval_cls.py --checkpoint runs/cls/shapes_r18/model_final.pt --data data_toy/cls/val \\
      --modes 1crop 10crop multiscale
  tools/eval_cls.py --checkpoint ../shared/data/resnet_cifar_weights/pretrained_models/resnet20-12fca82f.th \\
      --data ../shared/data/cifar10/test --arch cifar --depth 20 --normalize imagenet --modes 1crop multiscale
  tools/eval_cls.py --checkpoint runs/cls/tinyimagenet_r18_backbone/model_final.pt \\
      --data ../shared/data/tiny_imagenet_loc/tiny-imagenet-200/val/images \\
      --val-labels ../shared/data/tiny_imagenet_loc/tiny-imagenet-200/val/val_annotations.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.engine.cls_eval import NORMALIZE_CHOICES, evaluate_checkpoint  # noqa: E402
from detres.evaluation.classification import MODES  # noqa: E402
from detres.utils.atomic import atomic_write_text  # noqa: E402


def _size_or_none(text: str) -> int | None | str:
    if text.lower() in ("none", "auto"):
        return text.lower() if text.lower() == "auto" else None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _size_or_auto(text: str) -> int | str:
    value = _size_or_none(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pt / .th / .pth)")
    parser.add_argument(
        "--data",
        required=True,
        help="ImageFolder root <data>/<class>/*.jpg|png, or a flat image folder with --val-labels",
    )
    parser.add_argument(
        "--val-labels",
        default=None,
        help="labels file for a flat --data folder: '<file> <class name> [ignored columns]' per "
        "line (Tiny-ImageNet val_annotations.txt); classes the model lacks are skipped and counted",
    )
    parser.add_argument(
        "--arch",
        choices=("imagenet", "cifar"),
        default=None,
        help="network family (external weights; inferred from the keys when left out)",
    )
    parser.add_argument("--depth", type=int, default=None, help="network depth (inferred when left out)")
    parser.add_argument(
        "--normalize",
        choices=NORMALIZE_CHOICES,
        default="auto",
        help="checkpoint: the training-set statistics stored in a train_cls checkpoint; "
        "imagenet: torchvision mean/std on RGB; auto: checkpoint if stored, else imagenet",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["1crop"], help="test protocols")
    parser.add_argument(
        "--resize",
        type=_size_or_none,
        default="auto",
        help="1crop/10crop: shorter side before cropping ('none' keeps the size; default: what the "
        "checkpoint was trained for, 256 for ImageNet nets, none for CIFAR nets)",
    )
    parser.add_argument(
        "--crop",
        type=_size_or_none,
        default="auto",
        help="1crop/10crop crop size (default: the training crop, 224 or 32)",
    )
    parser.add_argument("--scales", type=int, nargs="+", default=None, help="multiscale: shorter sides")
    parser.add_argument(
        "--train-crop",
        type=_size_or_auto,
        default="auto",
        help="multiscale: the training crop size, whose conv5 window (224 -> 7x7) the dense test "
        "scores (default: what the checkpoint was trained with, 224 or 32)",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-per-class", type=int, default=None, help="evaluate only the first N images per class")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            arch=args.arch,
            depth=args.depth,
            normalize=args.normalize,
            modes=args.modes,
            resize=args.resize,
            crop=args.crop,
            scales=args.scales,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            max_per_class=args.max_per_class,
            val_labels=args.val_labels,
            train_crop=args.train_crop,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError) as exc:
        print(f"eval_cls: error: {exc}", file=sys.stderr)
        return 2
    margs = report["model_args"]
    print(
        f"{report['checkpoint']} ({report['format']}): {margs['arch']} ResNet-{margs['depth']}, "
        f"{margs['num_classes']} classes; {report['num_images']} images in {report['data']}; "
        f"normalize={report['normalize']}; geometry={report['geometry']}"
    )
    if report.get("val_skipped_unknown_class"):
        print(
            f"  skipped {report['val_skipped_unknown_class']} images of {report['val_labels']} whose class "
            f"the model does not have"
        )
    for mode, result in report["results"].items():
        print(
            f"  {mode:>10}: top-1 acc {100 * result['top1_acc']:.2f}% (err {100 * result['top1_err']:.2f}%), "
            f"top-{result['top5_k']} acc {100 * result['top5_acc']:.2f}%"
        )
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
