"""Peer comparison: torchvision's FasterRCNN built from detres's ResNet-C4 pieces, trained and scored like detres's demo
detector."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import MultiScaleRoIAlign

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detres.config.load import Config, load_config  # noqa: E402
from detres.data.build import build_detection_dataset, dataset_class_names  # noqa: E402
from detres.data.collate import collate_detection  # noqa: E402
from detres.data.samplers import AspectRatioGroupedBatchSampler, InfiniteSampler, compute_aspect_ratio_groups  # noqa: E402
from detres.engine.lr_schedule import LRSchedule  # noqa: E402
from detres.engine.optimizer import build_detection_optimizer, set_lr  # noqa: E402
from detres.evaluation.det_eval import evaluate_detection_dataset  # noqa: E402
from detres.models.build import build_detector  # noqa: E402

Batch = dict[str, Any]


def detres_parts(cfg: Config, num_classes: int) -> tuple[nn.Module, nn.Module, int, list[float], list[float]]:
    """detres's trunk (conv1..conv4) and conv5 head (layer4 + GAP + flatten), loaded and frozen as detres does,
    with the head's vector size and the pixel mean/std (0..255 scale) detres normalises with."""
    detector = build_detector(cfg.model, input_cfg=cfg.input, num_classes=num_classes)
    trunk = detector.trunk  # has .out_channels, which torchvision's FasterRCNN requires
    head = detector.roi_heads.box_head.conv5_head  # ResNetC5Head: layer4 -> avgpool -> flatten
    return (
        trunk,
        head,
        int(head.out_channels),
        detector.transform.pixel_mean.flatten().tolist(),
        detector.transform.pixel_std.flatten().tolist(),
    )


def build_peer(cfg: Config, num_classes: int) -> FasterRCNN:
    """torchvision FasterRCNN with detres's trunk/head and the config's RPN / RoI / input settings."""
    trunk, head, head_dim, mean, std = detres_parts(cfg, num_classes)
    m, rpn, roi, inp = cfg.model, cfg.model.rpn, cfg.model.roi_heads, cfg.input
    anchors = AnchorGenerator(
        sizes=(tuple(int(s) for s in m.anchor_sizes),), aspect_ratios=(tuple(float(r) for r in m.aspect_ratios),)
    )
    return FasterRCNN(
        trunk,
        min_size=tuple(int(s) for s in inp.min_size_train),
        max_size=int(inp.max_size_train),
        image_mean=mean,
        image_std=std,  # images are fed on the 0..255 scale, as detres feeds them
        size_divisible=16,  # detres pads to the trunk stride
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=roi.pooler_resolution, sampling_ratio=roi.sampling_ratio),
        box_head=head,
        box_predictor=FastRCNNPredictor(head_dim, num_classes + 1),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh_hi,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        bbox_reg_weights=tuple(float(w) for w in roi.bbox_reg_weights),
    )


def train_loader(dataset: Any, cfg: Config) -> DataLoader:
    """detres's training stream: seeded, endless, aspect-ratio grouped batches (as the detection task builds it)."""
    batch = int(cfg.solver.images_per_batch)
    sampler = AspectRatioGroupedBatchSampler(
        InfiniteSampler(len(dataset), seed=int(cfg.seed)), compute_aspect_ratio_groups(dataset), batch, start_batch=0
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def to_torchvision(batch: Batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A detres padded batch -> torchvision's list of unpadded 0..255 images and boxes/labels targets."""
    images = [img[:, :h, :w] for img, (h, w) in zip(batch["images"], batch["image_sizes"])]
    targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in batch["targets"]]
    return images, targets


def train(model: FasterRCNN, dataset: Any, cfg: Config, iters: int) -> float:
    """detres's solver (SGD, weight/bias groups, warm-up + step schedule) on the summed torchvision losses;
    returns the wall time in seconds."""
    solver = cfg.solver
    optimizer = build_detection_optimizer(model, solver)  # weights: lr, wd 5e-4; biases: 2x lr, no wd
    schedule = LRSchedule(
        optimizer,
        base_lr=solver.base_lr,
        mode="step",
        steps=solver.steps,
        gamma=solver.gamma,
        warmup_iters=solver.warmup_iters,
        warmup_lr=solver.warmup_lr,
    )
    model.train()
    started = time.time()
    for it, batch in enumerate(train_loader(dataset, cfg)):
        if it >= iters:
            break
        lr = schedule.lr_at(it)
        set_lr(optimizer, lr)
        losses = model(*to_torchvision(batch))
        total = sum(losses.values())
        if not math.isfinite(total.item()):
            raise FloatingPointError(f"iteration {it}: non-finite loss {total.item()}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if (it + 1) % solver.log_period == 0 or it + 1 == iters:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(
                f"iter {it + 1}/{iters} lr={lr:.4g} loss={total.item():.3f} {parts} t={time.time() - started:.0f}s",
                flush=True,
            )
    return time.time() - started


@torch.inference_mode()
def detect(model: FasterRCNN, dataset: Any, cfg: Config) -> list[dict[str, Any]]:
    """Per-image detections in original pixels (the evaluation set's images are original-size; torchvision's
    transform maps its boxes back to them)."""
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.solver.images_per_batch),
        shuffle=False,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_detection,
    )
    results = []
    for batch in loader:
        images, _ = to_torchvision(batch)
        for det, image_id in zip(model(images), batch["image_ids"]):
            det = {k: v.cpu() for k, v in det.items()}
            det["image_id"] = image_id
            results.append(det)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True, help="train_cls checkpoint (configs/cls/shapes_r18.yaml)")
    parser.add_argument("--config", default="configs/det/shapes_r18.yaml")
    parser.add_argument("--iters", type=int, default=None, help="default: solver.max_iter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    cfg = load_config(args.config, [f"model.weights={args.backbone}", f"seed={args.seed}"])
    iters = int(args.iters if args.iters is not None else cfg.solver.max_iter)
    torch.manual_seed(args.seed)
    train_set = build_detection_dataset(cfg, "train", train=True)
    val_set = build_detection_dataset(cfg, "val", train=False, class_names=dataset_class_names(train_set))
    model = build_peer(cfg, len(train_set.categories))
    print(
        f"torchvision FasterRCNN on detres parts; {len(train_set)} train / {len(val_set)} val images, "
        f"{iters} iterations, threads={torch.get_num_threads()}",
        flush=True,
    )
    train_time = train(model, train_set, cfg, iters)
    metrics = evaluate_detection_dataset(
        val_set,
        detect(model, val_set, cfg),
        iou_thresh_voc=cfg.test.iou_thresh_voc,
        use_07_metric=cfg.test.use_07_metric,
    )
    coco = metrics["coco"]["summary"]
    result = {
        "voc07_mAP": metrics["voc"]["mAP"],
        "coco_AP": coco["AP"],
        "coco_AP50": coco["AP50"],
        "coco_AP75": coco["AP75"],
        "train_time_s": round(train_time, 1),
        "iters": iters,
        "seed": args.seed,
        "backbone": args.backbone,
        "config": args.config,
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
