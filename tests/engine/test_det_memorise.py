"""The default detection path memorises a tiny fixed set.

The detector is built the way ``tools/train_det.py`` builds it: a YAML config, ``load_config``,
``train_detector``. Only sizes and the schedule differ from the defaults; the algorithm is the
paper's: every backbone norm layer a FrozenBatchNorm2d, conv1 and res2 frozen (``freeze_at: 2``),
RoI pooling (``roi_pool``) on the C4 map, conv5 run per region, sibling cls / box layers.

There is no pre-trained backbone here (random He init). Frozen BN then holds its initial
statistics (mean 0, var 1, weight 1, bias 0): an identity, so the backbone is an un-normalised
ResNet. Its C4 activations stay moderate at this depth (std ~4 on random images), and the frozen
identity is the same in train and eval mode, so the trainable layers (res3, res4, conv5, RPN,
predictor) can fit the set. A GroupNorm or trainable-BN stand-in would not test this path.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.ops import box_iou

from detres.config.load import load_config
from detres.data.build import build_detection_dataset
from detres.engine.logging import read_json_lines
from detres.engine.tasks.detection import train_detector
from detres.models.backbones.frozen_bn import FrozenBatchNorm2d
from detres.models.backbones.resnet_c4 import ResNetC5Head
from detres.models.build import load_detector

# Seeds 0-8 all reach AP50 = VOC mAP = 1.0 in 400 iterations (last / first logged loss 0.11-0.16); fixed here.
SEED = 0
MAX_ITER = 400

CLASSES = ("circle", "square", "triangle")  # COCO category ids 1, 2, 3
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230)}  # RGB
# (height, width), objects as (class, left, top, side): 4 images, 1-3 objects of 30..57 px each.
SCENES = (
    ((96, 128), (("circle", 10, 14, 40), ("square", 70, 40, 44))),
    ((128, 96), (("triangle", 20, 60, 52),)),
    ((112, 112), (("square", 8, 8, 30), ("triangle", 56, 20, 40), ("circle", 30, 64, 36))),
    ((128, 128), (("circle", 60, 50, 56), ("triangle", 10, 10, 32))),
)


def _draw_scene(height: int, width: int, objects, rng: np.random.Generator):
    """A noisy grey RGB image with the objects drawn in their colours; boxes are tight around their pixels."""
    image = np.full((height, width, 3), 128, np.int16) + rng.integers(-12, 13, (height, width, 3))
    image = image.astype(np.uint8)
    boxes = []
    for name, x, y, side in objects:
        colour = COLOURS[name]
        if name == "circle":
            cv2.circle(image, (x + side // 2, y + side // 2), side // 2, colour, -1)
        elif name == "square":
            cv2.rectangle(image, (x, y), (x + side - 1, y + side - 1), colour, -1)
        else:
            apex_base = np.array([[x + side // 2, y], [x, y + side - 1], [x + side - 1, y + side - 1]], np.int32)
            cv2.fillPoly(image, [apex_base], colour)
        ys, xs = np.nonzero(np.all(image == colour, axis=2))  # noise is +-12 around grey: never an object colour
        # COCO xywh of the pixels i0..i1, j0..j1: [i0, j0, i1 - i0 + 1, j1 - j0 + 1].
        boxes.append(
            (name, [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)])
        )
    return image, boxes


def write_tiny_set(root: Path) -> tuple[Path, Path]:
    """The 4 images as PNGs under ``root/images`` and their COCO instances JSON; returns both paths."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    for index, ((height, width), objects) in enumerate(SCENES):
        image, boxes = _draw_scene(height, width, objects, rng)
        cv2.imwrite(str(images_dir / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        coco["images"].append({"id": index + 1, "file_name": f"{index}.png", "height": height, "width": width})
        for name, bbox in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index + 1,
                    "category_id": CLASSES.index(name) + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    ann = root / "instances.json"
    ann.write_text(json.dumps(coco))
    return images_dir, ann


def write_config(root: Path, images_dir: Path, ann: Path, *, seed: int) -> Path:
    """A det config that changes sizes and the schedule only (no model option that selects the algorithm)."""
    text = f"""\
task: det
seed: {seed}
output_dir: {root / "run"}
device: cpu
model:
  depth: 18
  base_width: 16          # ResNet-18 layout at a quarter of the width
  anchor_sizes: [16, 32, 64]
  rpn:
    pre_nms_top_n_train: 300
    post_nms_top_n_train: 50
    pre_nms_top_n_test: 300
    post_nms_top_n_test: 50
    batch_size_per_image: 64
  roi_heads:
    pooler_resolution: 8  # 8x8 RoI pool -> 4x4 after conv5's stride 2
    batch_size_per_image: 16
    bg_iou_thresh_lo: 0.0 # as configs/det/shapes_r18.yaml: empty background is sampled too
data:
  format: coco
  train_images: {images_dir}
  train_ann: {ann}
  val_images: {images_dir}
  val_ann: {ann}
  num_workers: 0
input:
  min_size_train: [128]
  max_size_train: 192
  min_size_test: 128
  max_size_test: 192
solver:
  images_per_batch: 2
  base_lr: 0.01
  max_iter: {MAX_ITER}
  steps: [{MAX_ITER * 4 // 5}]
  warmup_iters: 10
  warmup_lr: 0.002
  eval_period: 0
  checkpoint_period: 100000
  log_period: 20
test:
  vis_images: 0
"""
    path = root / "memorise.yaml"
    path.write_text(text)
    return path


def train_tiny_set(root: Path, *, seed: int = SEED) -> tuple[dict, Path, Path]:
    """Train on the 4 images and test on the same 4; returns (metrics, annotation JSON, run folder)."""
    images_dir, ann = write_tiny_set(root / "data")
    cfg = load_config(write_config(root, images_dir, ann, seed=seed))
    return train_detector(cfg), ann, root / "run"


def regression_probe(model, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ground-truth box moved by 15% of its size in the 4 diagonal directions, fed to the
    trained RoI head as proposals: (IoU with the ground truth before, IoU after applying the head's
    box deltas for the true class), one entry per moved box, in test-input pixels.

    Final detections cannot isolate the RoI box regressor on this set: the RPN's proposals already
    overlap the objects well enough for AP50. This probe does.
    """
    dataset = build_detection_dataset(cfg, "val", train=False)
    heads = model.roi_heads
    before, after = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            batch, sizes = model.preprocess([sample["image"]])
            features = model.trunk(batch)
            gt, labels = sample["boxes"].float(), sample["labels"]
            wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
            for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                moved = gt + 0.15 * wh * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
                logits, deltas = heads.predict(heads.region_features(features, [moved], sizes))
                _, boxes = heads.decode_predictions(logits, deltas, [moved])
                rows = torch.arange(len(labels))
                before.append(box_iou(moved, gt).diagonal())
                after.append(box_iou(boxes[0][rows, labels], gt).diagonal())
    return torch.cat(before), torch.cat(after)


def _pycocotools_ap50(ann: Path, results: Path) -> float:
    """AP at IoU 0.5 straight from pycocotools on the raw annotation file and the written results."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        evaluator = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def test_default_frozen_bn_detector_memorises_four_images(tmp_path):
    metrics, ann, run = train_tiny_set(tmp_path)

    # It is the default path: the config selected none of the algorithm's options...
    cfg = load_config(run / "config.yaml")
    assert cfg.model.freeze_at == 2 and cfg.model.roi_heads.pooler_type == "roi_pool"
    assert cfg.model.weights is None
    # ... and the trained model holds frozen BN (still its initial identity after 400 SGD steps),
    # a frozen stem and res2, RoI pooling and the per-region conv5 head.
    model, _ = load_detector(run / "model_final.pt")
    norms = [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d))
    ]
    assert len(norms) == 20 and all(type(m) is FrozenBatchNorm2d for m in norms)  # ResNet-18: 1 + 8x2 + 3 shortcuts
    for bn in norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert model.roi_heads.pooler.pooler_type == "roi_pool"
    assert isinstance(model.roi_heads.box_head.conv5_head, ResNetC5Head)
    trainable = {name.split(".")[0] for name, p in model.trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3"}

    # Training fitted the set ...
    losses = [r["loss"] for r in read_json_lines(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == MAX_ITER // 20 and losses[-1] < 0.3 * losses[0], losses
    # ... and the project's evaluators, run on the same 4 images, find every object: 8 objects of 3
    # classes, so AP50 >= 0.9 allows at most a slightly mis-ranked detection, not a missed or
    # mislabelled object (one miss in a class of 2-3 objects costs that class >= 1/3 of its AP).
    assert metrics["iterations"] == MAX_ITER
    assert metrics["coco"]["summary"]["AP50"] >= 0.9, metrics["coco"]["summary"]
    assert metrics["voc"]["mAP"] >= 0.9, metrics["voc"]["per_class"]
    # The RoI head's box regressor pulls moved ground-truth boxes back. Moving a box by 15% of its
    # width and height gives IoU 0.85^2 / (2 - 0.85^2) = 0.5656 with it; checked with seeds 0-8:
    # 88-97% of the moved boxes gain > 0.02 IoU, mean IoU 0.70-0.76; with the RoI box loss zeroed
    # none does (mean 0.565), while AP50 is still 1.0 (the RPN's proposals are good enough).
    before, after = regression_probe(model, cfg)
    assert len(before) == 4 * 8 and torch.allclose(before, torch.full_like(before, 0.7225 / 1.2775), atol=1e-4)
    assert after.mean() >= 0.65, after
    assert (after > before + 0.02).float().mean() >= 0.75, after
    # The same AP50 from pycocotools on the raw annotation file and the written results file.
    ap50 = _pycocotools_ap50(ann, run / "test" / "coco_results.json")
    assert ap50 == pytest.approx(metrics["coco"]["summary"]["AP50"], abs=1e-9)
