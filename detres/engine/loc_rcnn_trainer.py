"""The localizer's R-CNN stage, RoI-centric training pieces (Appendix C): cached per-class RPN proposals, region
mini-batches drawn across images, and one SGD step on their warped crops.

Under torchrun the stage is data-parallel: every rank builds the proposals of its shard of the training images
(gathered into one cache, which rank 0 saves), draws the same global region batch from the (seed, iteration)
generator and trains on its slice of it, DDP averaging the gradients; rank 0 alone writes files and tests."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.config.load import Config
from detres.data.bad_samples import BadSamples, write_skipped
from detres.data.datasets.localization import LocRecord
from detres.data.image_io import read_image_rgb
from detres.data.samplers import rank_share
from detres.data.transforms.localization import LocTestTransform
from detres.engine.amp import SCALER_KEY, MixedPrecision, mixed_precision_from_config, scaler_state_into
from detres.engine.checkpoint import CheckpointManager, Diverged, check_finite_payload
from detres.engine.det_trainer import LossWindow, build_step_solver
from detres.engine.distributed import (
    MethodCall,
    all_gather_objects,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
    mean_over_ranks,
    on_main,
    start_distributed_run,
    wrap_ddp,
)
from detres.engine.loc_eval import format_table
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.optimizer import set_lr
from detres.engine.plots import plot_curves
from detres.engine.run_setup import stop_if_signalled
from detres.models.localization.rcnn_localizer import (
    CROP_SOURCES,
    RCNNLocalizer,
    RPNRCNNLocalizer,
    assign_rcnn_targets,
    rcnn_localizer_payload,
    save_rcnn_localizer,
)
from detres.models.localization.rpn_localizer import RPNLocalizer, load_localizer
from detres.utils.atomic import write_json_atomic
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
    "train_rcnn_stage",
]

log = logging.getLogger(__name__)
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


def _crop_image(record: LocRecord, view: LocTestTransform, crop_source: str) -> Tensor | np.ndarray:
    """What the R-CNN crops regions from: the image itself ([H,W,3] uint8) or the RPN's test view ([3,h,w])."""
    image = read_image_rgb(record.path)
    return image if crop_source == "image" else torch.from_numpy(view(image)[0].transpose(2, 0, 1).copy())


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


def train_rcnn_stage(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """The R-CNN stage: proposals of the trained RPN (``model.rcnn.rpn_checkpoint``) on the training images' dense
    test views (shorter side ``test.scale``), cached once in ``proposals.pt``; RoI-centric SGD on their warped crops;
    then the RPN+R-CNN rows of Table 13 on the validation set. Same outputs and resuming as the RPN stage.
    With ``model.rcnn.crop_source: image`` the regions are cropped from each image at its own resolution.
    Data-parallel under torchrun (see the module docstring); ``model.rcnn.regions_per_batch`` is the global batch."""
    from detres.engine.loc_trainer import load_loc_records, test_from_config  # loc_trainer imports this lazily

    rcnn_cfg, solver = cfg.model.rcnn, cfg.solver
    if not rcnn_cfg.rpn_checkpoint:
        raise ValueError("model.rcnn.rpn_checkpoint: the R-CNN stage needs the RPN stage's model_final.pt")
    if rcnn_cfg.crop_source not in CROP_SOURCES:  # before minutes of proposal caching
        raise ValueError(f"model.rcnn.crop_source: must be one of {CROP_SOURCES}, got {rcnn_cfg.crop_source!r}")
    world = get_world_size()
    if int(rcnn_cfg.regions_per_batch) % world:
        raise ValueError(
            f"model.rcnn.regions_per_batch ({rcnn_cfg.regions_per_batch}) must be a multiple of the "
            f"number of processes ({world}): each takes an equal slice of the global region batch"
        )
    bad = BadSamples.from_config(cfg)
    train, val, synsets = load_loc_records(cfg.data, bad_samples=bad)
    rpn, rpn_meta = load_localizer(rcnn_cfg.rpn_checkpoint)
    if list(rpn_meta["synsets"]) != list(synsets):
        raise ValueError(f"{rcnn_cfg.rpn_checkpoint}: its classes differ from data's {len(synsets)} synsets")
    start = start_distributed_run(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
    out, last_path, device, state = start.out, start.last_path, start.device, start.state
    write_skipped(out, bad)  # data.on_bad_sample=skip: the dropped samples, listed in the run folder (rank 0)
    view = LocTestTransform(mode="dense", scale=int(cfg.test.scale))
    cache_path = out / "proposals.pt"
    made_with = {
        "rpn_checkpoint": str(rcnn_cfg.rpn_checkpoint),
        "top_n": int(rcnn_cfg.proposals_per_class),
        "scale": int(cfg.test.scale),
        "nms": float(cfg.test.nms_thresh),
        "fg_iou": float(rcnn_cfg.fg_iou_thresh),
    }
    cache, scales = proposal_cache(
        rpn.to(device), train, view, cache_path, made_with, fg_iou_thresh=float(rcnn_cfg.fg_iou_thresh)
    )
    # resumed: the weights come from the checkpoint (the config's model with --allow-model-change), not model.weights
    model = RCNNLocalizer.from_config(cfg.model, num_classes=len(synsets), load_weights=state is None).to(device)
    if model.crop_source == "image":
        cache = to_image_frame(cache, scales)
    optimizer, schedule, iteration = build_step_solver(model, solver, state, last_path)
    amp = mixed_precision_from_config(solver, device)
    if state is not None:
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
    meta = {"synsets": synsets, "rpn_checkpoint": str(rcnn_cfg.rpn_checkpoint), "test_scale": int(cfg.test.scale)}
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=iteration if state is not None else None)
    started, cpu_started, window = time.time(), time.process_time(), LossWindow()
    train_model = wrap_ddp(MethodCall(model), device)  # torchrun: DDP averages the gradients of model.losses

    def save_last(at: int) -> Path:
        """The stage's one writer of last.pt: kept copies, never a non-finite state; rank 0 alone under torchrun."""
        if not is_main_process():
            return last_path
        payload = rcnn_localizer_payload(model, cfg, meta, iter=at, optimizer=optimizer.state_dict())
        return start.checkpoints.save(scaler_state_into(payload, amp), at)

    with start.checkpoints.stop_on_divergence():  # a NaN / Inf: stop naming the last good checkpoint
        while iteration < solver.max_iter:
            iteration = _rcnn_iteration(
                (model, train_model),
                optimizer,
                schedule,
                amp,
                cache,
                train,
                view,
                iteration,
                window,
                logger,
                cfg,
                started,
                save_last,
                start.checkpoints,
            )
            stop_if_signalled(iteration, lambda: save_last(iteration))  # noqa: B023
    train_cpu = time.process_time() - cpu_started
    if not is_main_process():
        return {}  # rank 0 saves and tests (the ranks' weights are the same)
    check_finite_payload({"model": model.state_dict()}, iteration, out / "model_final.pt")
    save_rcnn_localizer(out / "model_final.pt", model, cfg, meta, iter=iteration)
    plot_curves(
        read_json_lines(out / "metrics.jsonl"),
        out / "loss_curves.png",
        series=[("loss", "total"), ("loss_rcnn_cls", "loss_rcnn_cls"), ("loss_rcnn_box", "loss_rcnn_box")],
        title="R-CNN stage training losses",
        ylabel="loss",
    )
    pair = RPNRCNNLocalizer(rpn, model, score_fusion=cfg.test.rcnn_score_fusion).to(device).eval()
    # the whole Table 13 in one report: the RPN alone (1-crop, dense) and RPN+R-CNN (dense) on the same images
    report = test_from_config(
        pair,
        cfg,
        val,
        synsets,
        out_dir=out / "test",
        modes=("dense",),
        row_prefix="rpn_rcnn",
        rpn_modes=("1crop", "dense"),
    )
    report.update(iterations=iteration, train_cpu_s=round(train_cpu, 1), train_wall_s=round(time.time() - started, 1))
    write_json_atomic(out / "metrics.json", report)
    log.info("localization (%d val images):\n%s", len(val), format_table(report))
    return report


def _rcnn_iteration(
    models: tuple[RCNNLocalizer, Any],
    optimizer: torch.optim.Optimizer,
    schedule,
    amp: MixedPrecision,
    cache: RegionCache,
    train: Sequence[LocRecord],
    view: LocTestTransform,
    iteration: int,
    window: LossWindow,
    logger: JsonLinesLogger,
    cfg: Config,
    started: float,
    save_last,
    checkpoints: CheckpointManager,
) -> int:
    """One RoI-centric SGD step on this rank's slice of the global region batch, then the log line / checkpoint
    due; returns the iteration. ``models``: the plain model and what trains it (its DDP wrapper under torchrun)."""
    model, train_model = models
    solver, rcnn_cfg = cfg.solver, cfg.model.rcnn
    fg_fraction = None if rcnn_cfg.fg_fraction is None else float(rcnn_cfg.fg_fraction)
    # seeded per iteration, so a resumed run draws the batches it would have drawn
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + iteration)
    batch = sample_regions(cache, int(rcnn_cfg.regions_per_batch), generator=gen, fg_fraction=fg_fraction)
    batch = rank_slice(batch)  # the same global batch on every rank; each trains on its slice
    images = {i: _crop_image(train[i], view, model.crop_source) for i in {i for i, _ in batch}}
    lr = schedule.lr_at(iteration)
    set_lr(optimizer, lr)
    try:
        losses = rcnn_train_step(model, optimizer, images, cache, batch, amp=amp, losses_of=train_model)
    except FloatingPointError as exc:
        raise Diverged(f"iteration {iteration}: {exc}", failed_from=iteration) from None
    checkpoints.note_loss(iteration, losses["loss"])
    iteration += 1
    window.add(losses.pop("loss"), {k: torch.tensor(v) for k, v in losses.items()})
    if iteration % solver.log_period == 0 or iteration == solver.max_iter:
        logger.log(iter=iteration, lr=lr, time=time.time() - started, **mean_over_ranks(window.flush()))
    if iteration % solver.checkpoint_period == 0 or iteration == solver.max_iter:
        save_last(iteration)
    return iteration
