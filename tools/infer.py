#!/usr/bin/env python
"""Run a trained detector on images: tools/infer.py --checkpoint M.pt [M2.pt ...] --input IMG_OR_FOLDER [--out DIR].

Writes DIR/detections.json (per image: file, size, boxes as xyxy in original pixels, scores,
labels, class names; plus the checkpoints and the test-time options used) and DIR/<image stem>.png
with the boxes, class names and scores drawn. Several checkpoints act as one ensemble (Appendix B);
the Appendix-B extras (--box-refinement, --multiscale, --flip, ...) are off unless given.
Bad input (missing or foreign checkpoint, unreadable image, empty folder) exits with status 2
and a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

try:
    import detres  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.data.image_io import read_image_rgb  # noqa: E402
from detres.engine.run.setup import resolve_device  # noqa: E402
from detres.inference.ensemble import load_ensemble  # noqa: E402
from detres.inference.predictor import Predictor  # noqa: E402
from detres.inference.test_config import TestConfig, add_test_arguments  # noqa: E402
from detres.inference.visualize import draw_detections, write_png  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402
from detres.utils.atomic import write_json_atomic  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(source: Path) -> list[Path]:
    """``source`` itself if it is a file, else the image files directly inside the folder (sorted)."""
    if source.is_file():
        return [source]
    if not source.exists():
        raise FileNotFoundError(f"input '{source}' does not exist")
    if not source.is_dir():
        raise ValueError(f"input '{source}' is neither a file nor a folder")
    images = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"input folder '{source}' has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


def output_png_paths(images: list[Path], out_dir: Path) -> list[Path]:
    """One PNG per input, named by its stem; the full file name where two inputs share a stem."""
    stems = [p.stem for p in images]
    paths = [out_dir / (f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png") for p in images]
    inputs = {p.resolve() for p in images}
    clash = [str(p) for p in paths if p.resolve() in inputs]
    if clash:
        raise ValueError(f"--out '{out_dir}' would overwrite input images {clash}; choose another folder")
    return paths


def run(
    checkpoints: Path | list[Path],
    source: Path,
    out_dir: Path,
    *,
    score_thresh: float,
    device: str,
    args: argparse.Namespace | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Detect on every input image, write the drawn PNGs and detections.json; returns the JSON content.

    ``checkpoints``: one train_det checkpoint or the members of an ensemble. ``args``: parsed test-time flags
    (``add_test_arguments``) over the first checkpoint's test configuration with every extra off and its own
    post-processing. ``amp``: float16 CUDA autocast (ignored on CPU, which stays fp32).
    """
    checkpoints = [checkpoints] if isinstance(checkpoints, Path) else list(checkpoints)
    images = list_images(source)
    pngs = output_png_paths(images, out_dir)
    try:
        torch_device = resolve_device(device)
    except RuntimeError as exc:  # torch's message for an unknown device string
        raise ValueError(f"--device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    models, meta = load_ensemble(checkpoints, device=torch_device)
    predictor = Predictor.from_model(models[0], meta, device=torch_device, amp=amp)
    predictor.ensemble = models[1:]
    base = TestConfig.from_config(meta["config"]).without_extras()
    predictor.options = base if args is None else base.with_flags(args)
    records = []
    for path, png in zip(images, pngs):
        image = read_image_rgb(path)
        det = predictor.predict(image, score_thresh=score_thresh)
        write_png(
            png,
            draw_detections(
                image, det["boxes"], det["labels"], det["scores"], predictor.class_names, score_thresh=score_thresh
            ),
        )
        records.append(
            {
                "file": str(path),
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
                "visualization": str(png),
                "boxes": [[float(v) for v in box] for box in det["boxes"]],
                "scores": [float(s) for s in det["scores"]],
                "labels": [int(label) for label in det["labels"]],
                "class_names": det["class_names"],
            }
        )
        print(f"{path}: {len(det['scores'])} detections >= {score_thresh}")
    result = {
        "checkpoint": str(checkpoints[0]),
        "checkpoints": [str(p) for p in checkpoints],
        "options": dataclasses.asdict(predictor.options),
        "score_thresh": score_thresh,
        "class_names": predictor.class_names,
        "box_format": "xyxy, 0-based continuous pixels of the original image",
        "images": records,
    }
    write_json_atomic(out_dir / "detections.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        nargs="+",
        help="train_det checkpoint(s) (model_final.pt); several = an ensemble",
    )
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("runs/infer"), help="output folder (default runs/infer)")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep and draw detections scoring >= this")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="float16 autocast forward passes on CUDA (CPU stays fp32)")
    add_test_arguments(parser, defaults="all off")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    try:
        result = run(
            args.checkpoint,
            args.input,
            args.out,
            score_thresh=args.score_thresh,
            device=args.device,
            args=args,
            amp=args.amp,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"infer: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result['images'])} images -> {args.out / 'detections.json'}")
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        sys.exit(main())
