"""Classification input pipeline vs the model: images/s of the training data path and of a training step, CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cls_pipeline.py [--config configs/cls/resnet50_imagenet.yaml]
        [--images 40] [--batch 8] [--steps 3]

The data path is what one DataLoader worker runs per image for ``train_cls``: JPEG decode (``read_image_rgb``),
scale augmentation (shorter side drawn from [augment.scale_min, scale_max]), the ``augment.crop`` crop, flip, PCA
colour noise, per-pixel mean, tensor. Images: BCCD's 640x480 photos from ``../shared/data/bccd`` (ImageNet-sized
JPEGs), or synthetic 500x375 JPEGs when it is absent. Both rates are per core (process CPU time, 1 thread), so
with N loader workers and T training threads the pipeline keeps up while N x data rate > model rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detres.config.load import load_config  # noqa: E402
from detres.data.cls_pipeline import build_train_transform, compute_data_stats  # noqa: E402
from detres.data.image_io import read_image_rgb  # noqa: E402
from detres.models.backbones.resnet import build_resnet  # noqa: E402

BCCD_IMAGES = ROOT / ".." / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"


def image_files(count: int, folder: Path) -> tuple[list[str], str]:
    if BCCD_IMAGES.is_dir():
        files = sorted(str(p) for p in BCCD_IMAGES.glob("*.jpg"))[:count]
        if files:
            return files, f"BCCD JPEGs ({BCCD_IMAGES.resolve()})"
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
        files.append(str(path))
    return files, "synthetic 500x375 JPEGs"


def data_images_per_s(files: list[str], transform, rounds: int = 2) -> float:
    start = time.process_time()
    for _ in range(rounds):
        for path in files:
            transform(read_image_rgb(path))
    return rounds * len(files) / (time.process_time() - start)


def train_images_per_s(depth: int, num_classes: int, crop: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_resnet(depth, num_classes=num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images, labels = torch.randn(batch, 3, crop, crop), torch.randint(0, num_classes, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.process_time()
    for _ in range(steps):
        step()
    return steps * batch / (time.process_time() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cls" / "resnet50_imagenet.yaml"))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        files, source = image_files(args.images, Path(tmp))
        stats = compute_data_stats(files, cfg)
        transform = build_train_transform(cfg, stats)
        data_rate = data_images_per_s(files, transform)
    print(
        f"{args.config}: crop {cfg.augment.crop}, scale [{cfg.augment.scale_min}, {cfg.augment.scale_max}], "
        f"PCA colour noise {cfg.augment.color_pca}; {len(files)} {source}"
    )
    print(f"data pipeline (1 core):          {data_rate:8.1f} images/s")
    for depth in sorted({18, int(cfg.model.depth)}):
        rate = train_images_per_s(depth, 1000, cfg.augment.crop, args.batch, args.steps)  # ImageNet-1k head
        print(
            f"ResNet-{depth} training step (1 thread, batch {args.batch}): {rate:6.2f} images/s  "
            f"(data / model = {data_rate / rate:.0f}x)"
        )


if __name__ == "__main__":
    main()
