"""The localizer's R-CNN stage, RoI-centric training pieces (Appendix C): cached per-class RPN proposals, region
mini-batches drawn across images, and one SGD step on their warped crops.

Under torchrun the stage is data-parallel: every rank builds the proposals of its shard of the training images
(gathered into one cache, which rank 0 saves), draws the same global region batch from the (seed, iteration)
generator and trains on its slice of it, DDP averaging the gradients; rank 0 alone writes files and tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.data.datasets.localization import LocRecord
from detres.data.image_io import read_image_rgb
from detres.data.samplers import rank_share
from detres.data.transforms.localization import LocTestTransform
from detres.engine.amp import MixedPrecision
from detres.engine.distributed import (
    all_gather_objects,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
    on_main,
)
from detres.models.localization.rcnn_localizer import RCNNLocalizer, assign_rcnn_targets
from detres.models.localization.rpn_localizer import RPNLocalizer
from detres.utils.dist import finite_on_all_ranks, shard_indices, unshard
from detres.utils.torch_files import load_checkpoint, save_checkpoint

__all__ = [
    "RegionCache",
    "cache_proposals",
    "proposal_cache",
    "rank_slice",
    "rcnn_train_step",
    "sample_regions",
    "to_image_frame",
]
# Per training image: rois [n,4], their proposal classes [n] (1..K), R-CNN labels [n] (0..K), matched gt boxes [n,4].
RegionCache = list[dict[str, Tensor]]


@torch.no_grad()
def cache_proposals(
    rpn: RPNLocalizer,
    samples: Iterable[tuple[Tensor, Tensor, Tensor]],
    *,
    top_n: int = 200,
    nms_thresh: float | None = None,
    fg_iou_thresh: float = 0.5,
) -> RegionCache:
    """Run the trained per-class RPN once per training image (``samples``: image [3,H,W] 0..255, gt boxes [G,4] in
    its pixels, gt labels [G] in 1..K) and keep, for each ground-truth class, its ``top_n`` best boxes (the paper's
    200) with their R-CNN targets. Computed once: the RPN is fixed during the R-CNN stage."""
    rpn.eval()
    cache: RegionCache = []
    for image, gt_boxes, gt_labels in samples:
        classes = sorted({int(c) for c in gt_labels.tolist()})
        per_class = rpn.class_boxes(image, classes, top_n=top_n, nms_thresh=nms_thresh) if classes else {}
        rois = [per_class[c][0].cpu().float() for c in classes]
        owners = [torch.full((r.shape[0],), c, dtype=torch.long) for r, c in zip(rois, classes)]
        rois_t = torch.cat(rois) if rois else torch.zeros(0, 4)
        owners_t = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
        keep = (rois_t[:, 2] > rois_t[:, 0]) & (rois_t[:, 3] > rois_t[:, 1])  # a clipped box can be empty
        rois_t, owners_t = rois_t[keep], owners_t[keep]
        labels, matched = assign_rcnn_targets(
            rois_t, owners_t, gt_boxes.cpu(), gt_labels.cpu(), fg_iou_thresh=fg_iou_thresh
        )
        cache.append({"rois": rois_t, "classes": owners_t, "labels": labels, "matched": matched})
    return cache


def sample_regions(
    cache: RegionCache,
    batch_size: int = 256,
    *,
    generator: torch.Generator | None = None,
    fg_fraction: float | None = None,
) -> list[tuple[int, int]]:
    """One RoI-centric mini-batch: ``batch_size`` (image, region) pairs drawn from all cached regions of all images.

    ``fg_fraction`` None draws uniformly (the paper gives no ratio); a number caps the foreground share at that
    fraction as R-CNN's 32 + 96 windows did, filling the rest with background. Draws without replacement when the
    pool is large enough, with replacement otherwise.
    """
    pairs = [(i, j) for i, entry in enumerate(cache) for j in range(entry["rois"].shape[0])]
    if not pairs or batch_size < 1:
        return []
    if fg_fraction is None:
        return [pairs[k] for k in _draw(len(pairs), batch_size, generator)]
    fg = [p for p in pairs if int(cache[p[0]]["labels"][p[1]]) > 0]
    bg = [p for p in pairs if int(cache[p[0]]["labels"][p[1]]) == 0]
    num_fg = min(len(fg), int(round(batch_size * float(fg_fraction)))) if bg else batch_size
    chosen = [fg[k] for k in _draw(len(fg), num_fg, generator)] if fg else []
    return chosen + [bg[k] for k in _draw(len(bg), batch_size - len(chosen), generator)]


def _draw(population: int, count: int, generator: torch.Generator | None) -> list[int]:
    if population == 0 or count <= 0:
        return []
    if count <= population:
        return torch.randperm(population, generator=generator)[:count].tolist()
    return torch.randint(population, (count,), generator=generator).tolist()


def rcnn_train_step(
    model: RCNNLocalizer,
    optimizer: torch.optim.Optimizer,
    images: Mapping[int, Tensor] | Sequence[Tensor],
    cache: RegionCache,
    batch: Sequence[tuple[int, int]],
    *,
    amp: MixedPrecision | None = None,
    losses_of: Callable[..., Any] | None = None,
) -> dict[str, float]:
    """One SGD step on a region mini-batch (from :func:`sample_regions`): crop and warp each region from its image
    (``images[i]`` is the image the cache's boxes of entry i refer to), then the cls + reg losses; returns them.
    ``amp``: the losses under its CUDA autocast and a scaled step (None = fp32, as on CPU). ``losses_of``: what
    computes the losses, called as ``losses_of("losses", crops, rois, labels, matched)`` (under torchrun the DDP
    wrapper of :class:`~detres.engine.distributed.MethodCall` ``(model)``, whose backward averages the gradients);
    None calls ``model.losses``. A non-finite loss on any rank raises on every rank."""
    if not batch:
        raise ValueError("rcnn_train_step: empty region batch")
    by_image: dict[int, list[int]] = defaultdict(list)
    for i, j in batch:
        by_image[i].append(j)
    crops, rois, labels, matched = [], [], [], []
    for i, rows in by_image.items():  # one crop_and_warp per image: all its regions in one roi_align call
        index = torch.tensor(rows, dtype=torch.long)
        entry = cache[i]
        crops.append(model.warp(images[i], entry["rois"][index]))
        rois.append(entry["rois"][index])
        labels.append(entry["labels"][index])
        matched.append(entry["matched"][index])
    model.train()
    amp = amp or MixedPrecision(enabled=False, device="cpu")
    inputs = (torch.cat(crops), torch.cat(rois), torch.cat(labels), torch.cat(matched))
    with amp.autocast():  # the warped crops are made in fp32 above; the network runs under autocast
        losses = model.losses(*inputs) if losses_of is None else losses_of("losses", *inputs)
    total = sum(losses.values())
    if not finite_on_all_ranks(total.item()):  # collective: no rank waits alone in the gradient all-reduce
        raise FloatingPointError(f"R-CNN stage: loss is {total.item()}; lower solver.base_lr")
    optimizer.zero_grad(set_to_none=True)
    amp.backward_and_step(total, optimizer)
    return {"loss": total.item(), **{key: value.item() for key, value in losses.items()}}


def _view_samples(
    records: Sequence[LocRecord], view: LocTestTransform, scales: list[tuple[float, float]]
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(dense test view [3,h,w] 0..255, gt boxes in its pixels, gt labels) per record: the RPN's test view. Appends
    each view's (sx, sy) (view pixels per image pixel) to ``scales``."""
    for record in records:
        image = read_image_rgb(record.path)
        pixels, where = view(image)
        scales.append((where.sx, where.sy))
        boxes = np.asarray(record.boxes, np.float64).reshape(-1, 4) * [where.sx, where.sy, where.sx, where.sy]
        yield (
            torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
            torch.from_numpy(boxes).float(),
            torch.as_tensor(record.labels, dtype=torch.long),
        )


def to_image_frame(cache: RegionCache, scales: Sequence[tuple[float, float]]) -> RegionCache:
    """The cache's boxes (RPN test-view pixels) in each image's own pixels: divided by the view's (sx, sy). Labels
    are unchanged: IoU is invariant under per-axis scaling."""
    out = []
    for entry, (sx, sy) in zip(cache, scales, strict=True):
        factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        out.append(dict(entry, rois=entry["rois"] / factor, matched=entry["matched"] / factor))
    return out


def _saved_cache(path: Path, made_with: dict[str, Any]) -> tuple[RegionCache, list[tuple[float, float]]] | None:
    """The regions and view scales of ``path`` if it was made with ``made_with`` (else None: e.g. another RPN)."""
    saved = load_checkpoint(path) if path.exists() else {}
    if saved.get("made_with") != made_with or "view_scales" not in saved:
        return None
    return saved["regions"], [tuple(s) for s in saved["view_scales"]]


def proposal_cache(
    rpn: RPNLocalizer,
    train: Sequence[LocRecord],
    view: LocTestTransform,
    path: Path,
    made_with: dict[str, Any],
    *,
    fg_iou_thresh: float,
) -> tuple[RegionCache, list[tuple[float, float]]]:
    """(:func:`cache_proposals` of every training image, each dense view's (sx, sy)): read from ``path`` when it was
    made with ``made_with``, else computed and saved there. Under torchrun rank 0 reads the file and sends it to
    the others; a computation is split over the ranks (strided shards) and gathered in image order everywhere."""
    saved = broadcast_object(on_main(_saved_cache, path, made_with))
    if saved is not None:
        return saved
    mine = shard_indices(len(train))
    scales: list[tuple[float, float]] = []
    part = cache_proposals(
        rpn,
        _view_samples([train[i] for i in mine], view, scales),
        top_n=made_with["top_n"],
        nms_thresh=made_with["nms"],
        fg_iou_thresh=fg_iou_thresh,
    )
    parts = all_gather_objects((part, scales))
    cache, scales = unshard([p[0] for p in parts]), unshard([p[1] for p in parts])
    if is_main_process():
        save_checkpoint(path, {"regions": cache, "made_with": made_with, "view_scales": scales})
    return cache, scales


def rank_slice(batch: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """This rank's consecutive share of a global region batch (the whole batch in a single process)."""
    return rank_share(batch, get_rank(), get_world_size())
