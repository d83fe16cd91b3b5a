"""Run a detector over a dataset: batched forward passes, detections mapped back to original pixels."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from detres.data.collate import collate_detection
from detres.data.worker_errors import readable
from detres.inference.box_refinement import detect_with_refinement
from detres.models.postprocess import rescale_detections


def detect_batch(
    model: torch.nn.Module, batch: dict[str, Any], device: torch.device, *, box_refinement: bool = False
) -> list[dict[str, Any]]:
    """Detections of one collated batch, in each image's original pixel coordinates (CPU tensors).

    ``box_refinement``: the Appendix-B second pass on the regressed boxes instead of the model's
    forward (:func:`detres.inference.box_refinement.detect_with_refinement`).
    """
    images = batch["images"].to(device, non_blocking=True)
    with torch.inference_mode():
        if box_refinement:
            outputs = detect_with_refinement(model, images, batch["image_sizes"])
        else:
            outputs = model(images, image_sizes=batch["image_sizes"])
    results = []
    for det, image_id, (sx, sy), orig in zip(outputs, batch["image_ids"], batch["scales_xy"], batch["orig_sizes"]):
        det = {k: v.cpu() for k, v in det.items()}
        det = rescale_detections(det, (sy, sx), orig)
        det["image_id"] = image_id
        results.append(det)
    return results


def run_inference(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    batch_size: int = 2,
    num_workers: int = 0,
    progress: bool = True,
    box_refinement: bool = False,
) -> list[dict[str, Any]]:
    """Per-image ``{"image_id", "boxes", "scores", "labels"}`` for every image of ``dataset`` (eval mode).

    ``box_refinement``: see :func:`detect_batch`.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_detection)
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    try:
        for batch in tqdm(readable(loader), desc="detect", disable=not progress, dynamic_ncols=True, leave=False):
            detections.extend(detect_batch(model, batch, device, box_refinement=box_refinement))
    finally:
        model.train(was_training)
    return detections
