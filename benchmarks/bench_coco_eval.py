"""Time detres.evaluation.coco.evaluate_coco with each COCO backend (pycocotools, faster_coco_eval), synthetic set."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detres.evaluation.coco import SUMMARY_KEYS, evaluate_coco  # noqa: E402
from detres.evaluation.coco_backend import BACKENDS  # noqa: E402
from detres.utils.atomic import write_json_atomic  # noqa: E402

IMAGE_W, IMAGE_H = 640, 480


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4] xywh boxes inside the image, sides log-uniform in 6..320 px (small, medium and large objects)."""
    w = np.exp(rng.uniform(np.log(6), np.log(320), n))
    h = np.clip(w * np.exp(rng.normal(0.0, 0.4, n)), 4, IMAGE_H - 1)
    x = rng.uniform(0, IMAGE_W - w)
    y = rng.uniform(0, IMAGE_H - h)
    return np.stack([x, y, w, h], axis=1)


def synthetic_coco(
    images: int, dets_per_image: int, seed: int, num_categories: int = 10
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground truth (1-8 objects per image, ~3 % crowd regions, some images without objects) and
    ``images * dets_per_image`` detections: jittered ground-truth boxes (sometimes of the wrong category)
    and random false positives, with scores higher on average for the better boxes."""
    rng = np.random.default_rng(seed)
    gt: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1, "name": f"cat{c + 1}"} for c in range(num_categories)],
    }
    results: list[dict[str, Any]] = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": IMAGE_W, "height": IMAGE_H, "file_name": f"{image_id:06d}.jpg"})
        n_obj = int(rng.integers(0, 9)) if image_id % 25 else 0
        boxes, cats = _random_boxes(rng, n_obj), rng.integers(1, num_categories + 1, n_obj)
        for box, cat in zip(boxes, cats):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(rng.random() < 0.03),
                }
            )
        n_tp = min(n_obj, int(rng.integers(0, dets_per_image + 1)))
        det_boxes = _random_boxes(rng, dets_per_image)
        det_cats = rng.integers(1, num_categories + 1, dets_per_image)
        scores = rng.uniform(0.05, 0.7, dets_per_image)
        for k in range(n_tp):  # the first n_tp detections follow a ground-truth box, jittered
            jitter = rng.normal(0.0, 0.08, 4) * np.array([boxes[k, 2], boxes[k, 3], boxes[k, 2], boxes[k, 3]])
            det_boxes[k] = boxes[k] + jitter
            det_boxes[k, 2:] = np.maximum(det_boxes[k, 2:], 1.0)
            det_cats[k] = cats[k] if rng.random() < 0.85 else det_cats[k]
            scores[k] = rng.uniform(0.3, 1.0)
        for box, cat, score in zip(det_boxes, det_cats, scores):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [round(float(v), 2) for v in box],
                    "score": round(float(score), 4),
                }
            )
    return gt, results


def time_backend(gt: dict[str, Any], results: list[dict[str, Any]], backend: str, repeats: int) -> tuple[float, dict]:
    """Best wall-clock seconds of ``repeats`` evaluate_coco calls, and the last result."""
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = evaluate_coco(gt, results, backend=backend)
        best = min(best, time.perf_counter() - start)
    return best, result


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per backend; the best is reported")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--json-out", help="write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.backends[0] != "pycocotools":
        parser.error("--backends must start with pycocotools, the reference the others are compared with")

    gt, results = synthetic_coco(args.images, args.dets_per_image, args.seed)
    print(
        f"synthetic set: {len(gt['images'])} images, {len(gt['annotations'])} ground-truth boxes, "
        f"{len(results)} detections (seed {args.seed}); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    warm_gt, warm_results = synthetic_coco(20, args.dets_per_image, args.seed + 1)
    for backend in args.backends:  # warm-up: imports, first-call costs
        evaluate_coco(warm_gt, warm_results, backend=backend)

    rows = []
    for backend in args.backends:
        seconds, result = time_backend(gt, results, backend, args.repeats)
        rows.append(
            {
                "backend": backend,
                "seconds": seconds,
                "summary": result["summary"],
                "per_category_AP": [c["AP"] for c in result["per_category"]],
            }
        )
    reference = rows[0]
    worst = 0.0
    for row in rows:
        row["speedup"] = reference["seconds"] / row["seconds"]
        diffs = [abs(row["summary"][k] - reference["summary"][k]) for k in SUMMARY_KEYS]
        diffs += [abs(a - b) for a, b in zip(row["per_category_AP"], reference["per_category_AP"])]
        row["max_abs_diff_vs_pycocotools"] = max(diffs)
        worst = max(worst, row["max_abs_diff_vs_pycocotools"])

    print(f"\n{'backend':<18} {'seconds':>8} {'AP':>8} {'AP50':>8} {'speed-up':>9} {'max |diff|':>11}")
    for row in rows:
        print(
            f"{row['backend']:<18} {row['seconds']:8.2f} {row['summary']['AP']:8.4f} {row['summary']['AP50']:8.4f} "
            f"{row['speedup']:8.2f}x {row['max_abs_diff_vs_pycocotools']:11.1e}"
        )
    agree = worst <= 1e-6
    print(f"\nall 12 summary numbers and per-category AP agree within 1e-6: {agree}")

    if args.json_out:
        write_json_atomic(
            args.json_out,
            {
                "args": vars(args),
                "num_images": len(gt["images"]),
                "num_gt": len(gt["annotations"]),
                "num_detections": len(results),
                "rows": rows,
                "agree_within_1e-6": agree,
                "machine": {
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "cpu_count": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "pycocotools": _version("pycocotools"),
                    "faster-coco-eval": _version("faster-coco-eval"),
                },
            },
        )
        print(f"written to {args.json_out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
