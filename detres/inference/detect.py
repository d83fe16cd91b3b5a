"""Run a detector over a dataset: batched forward passes on the original images (the detector resizes them and
answers in their pixels), and the images split over the ranks of a distributed run (results gathered back in
dataset order)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from detres.data.collate import collate_detection
from detres.data.worker_errors import readable
from detres.inference.test_config import TestConfig
from detres.inference.test_time import TestTimeAugmentation
from detres.utils.dist import all_gather_objects, is_distributed, is_main_process, shard_indices, unshard


def inference_autocast(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager:
    """float16 CUDA autocast when ``amp`` and ``device`` is CUDA; otherwise nothing changes (CPU stays fp32:
    bf16 matmuls crash some CPUs and CPU autocast would change the detections)."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def detect_batch(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    batch: dict[str, Any],
    device: torch.device,
    *,
    options: TestConfig | None = None,
    amp: bool = False,
) -> list[dict[str, Any]]:
    """Detections of one collated batch of original-size images, in their pixel coordinates (CPU tensors).

    ``model``: one detector or the members of an ensemble. ``options``: the test configuration
    (:class:`TestTimeAugmentation` runs it); None = the model's own forward. ``amp``: forward passes under
    float16 CUDA autocast (ignored off CUDA); the detections come back as float32 either way.
    """
    resized = [i for i, scale in enumerate(batch["scales_xy"]) if tuple(scale) != (1.0, 1.0)]
    if resized:
        names = [batch["file_names"][i] for i in resized]
        raise ValueError(
            f"detect_batch: images {names} were resized by their dataset's transforms; the detector takes the "
            "original images and resizes them to its test scale itself (build evaluation sets without transforms)"
        )
    images = batch["images"].to(device, non_blocking=True)
    plain = isinstance(model, torch.nn.Module) and (options is None or options.plain)
    detector = model if plain else TestTimeAugmentation(model, options)
    with torch.inference_mode(), inference_autocast(device, amp):
        outputs = detector(images, image_sizes=batch["image_sizes"])
    results = []
    for det, image_id in zip(outputs, batch["image_ids"]):
        # under autocast scores can be float16: back to float32 for the evaluation
        det = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in det.items()}
        det["image_id"] = image_id
        results.append(det)
    return results


def run_inference(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    dataset: Any,
    *,
    device: torch.device,
    batch_size: int = 2,
    num_workers: int = 0,
    progress: bool = True,
    options: TestConfig | None = None,
    amp: bool = False,
    shard: bool | None = None,
) -> list[dict[str, Any]]:
    """Per-image ``{"image_id", "boxes", "scores", "labels"}`` for every image of ``dataset`` (eval mode).

    ``model`` / ``options`` / ``amp``: see :func:`detect_batch`. ``shard`` (None = whenever a distributed
    process group of more than one rank is up): each rank detects on every ``world_size``-th image and the
    results are gathered, so every rank returns all detections in dataset order; all ranks must call it.
    (Batches then group other images than in one process; images of different sizes are padded
    differently, which moves border features and scores slightly.)
    """
    shard = is_distributed() if shard is None else (shard and is_distributed())
    if shard:
        dataset = Subset(dataset, shard_indices(len(dataset)))
    progress = progress and is_main_process()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_detection
    )
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    detections: list[dict[str, Any]] = []
    try:
        for batch in tqdm(readable(loader), desc="detect", disable=not progress, dynamic_ncols=True, leave=False):
            detections.extend(detect_batch(models, batch, device, options=options, amp=amp))
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    if shard:
        detections = unshard(all_gather_objects(detections))
    return detections
