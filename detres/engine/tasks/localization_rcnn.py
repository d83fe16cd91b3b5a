"""The localizer's R-CNN stage (Appendix C) as a task of the training loop: RoI-centric SGD on warped crops of the
trained RPN's cached proposals (:mod:`detres.engine.tasks.rcnn_regions`), then the RPN+R-CNN rows of Table 13.
Data-parallel under torchrun: the proposals are sharded, every rank trains on its slice of the global region
batch."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from itertools import count
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.config.load import Config
from detres.data.bad_samples import BadSamples, write_skipped
from detres.data.datasets.localization import LocRecord
from detres.data.image_io import read_image_rgb
from detres.data.transforms.localization import LocTestTransform
from detres.engine.amp import SCALER_KEY, MixedPrecision, mixed_precision_from_config, scaler_state_into
from detres.engine.distributed import MethodCall, get_world_size, is_main_process, start_distributed_run
from detres.engine.hooks import default_hooks, progress_bar
from detres.engine.loc_data import load_loc_records
from detres.engine.loc_eval import format_table, test_from_config
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.optimizer import build_step_solver
from detres.engine.plots import plot_curves
from detres.engine.run.checkpoint import Diverged, check_finite_payload
from detres.engine.tasks.rcnn_regions import (
    RegionCache,
    proposal_cache,
    rank_slice,
    rcnn_train_step,
    sample_regions,
    to_image_frame,
)
from detres.engine.train_loop import Trainer, TrainTask
from detres.models.localization.rcnn_localizer import (
    CROP_SOURCES,
    RCNNLocalizer,
    RPNRCNNLocalizer,
    rcnn_localizer_payload,
    save_rcnn_localizer,
)
from detres.models.localization.rpn_localizer import load_localizer
from detres.utils.atomic import write_json_atomic

__all__ = ["RCNNStageTask", "train_rcnn_stage"]

log = logging.getLogger(__name__)


def _crop_image(record: LocRecord, view: LocTestTransform, crop_source: str) -> Tensor | np.ndarray:
    """What the R-CNN crops regions from: the image itself ([H,W,3] uint8) or the RPN's test view ([3,h,w])."""
    image = read_image_rgb(record.path)
    return image if crop_source == "image" else torch.from_numpy(view(image)[0].transpose(2, 0, 1).copy())


class RCNNStageTask(TrainTask):
    """One RoI-centric SGD step per iteration on this rank's slice of a global region batch, drawn from the
    (seed, iteration) generator so that a resumed run draws the batches it would have drawn."""

    def __init__(
        self,
        model: RCNNLocalizer,
        optimizer: torch.optim.Optimizer,
        amp: MixedPrecision,
        *,
        cfg: Config,
        cache: RegionCache,
        train: Sequence[LocRecord],
        view: LocTestTransform,
        meta: dict[str, Any],
    ) -> None:
        self.model, self.optimizer, self.amp = model, optimizer, amp
        self.cfg, self.cache, self.train, self.view = cfg, cache, train, view
        self.meta = meta

    def batches(self, start_iter: int) -> Iterator[Any]:
        rcnn_cfg = self.cfg.model.rcnn
        fg_fraction = None if rcnn_cfg.fg_fraction is None else float(rcnn_cfg.fg_fraction)
        for iteration in count(start_iter):
            gen = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + iteration)
            batch = sample_regions(self.cache, int(rcnn_cfg.regions_per_batch), generator=gen, fg_fraction=fg_fraction)
            batch = rank_slice(batch)  # the same global batch on every rank; each trains on its slice
            crop_source = self.model.crop_source
            yield batch, {i: _crop_image(self.train[i], self.view, crop_source) for i in {i for i, _ in batch}}

    def step(self, trainer: Trainer, batch: Any) -> dict[str, float]:
        regions, images = batch
        try:
            return rcnn_train_step(
                self.model, self.optimizer, images, self.cache, regions, amp=self.amp, losses_of=trainer.train_model
            )
        except FloatingPointError as exc:
            raise Diverged(f"iteration {trainer.global_iter}: {exc}", failed_from=trainer.global_iter) from None

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        payload = rcnn_localizer_payload(
            self.model, self.cfg, self.meta, iter=trainer.global_iter, optimizer=self.optimizer.state_dict()
        )
        return scaler_state_into(payload, self.amp)


def _check_options(cfg: Config) -> None:
    rcnn_cfg = cfg.model.rcnn
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


def train_rcnn_stage(cfg: Config, **resume: Any) -> dict[str, Any]:
    """The R-CNN stage: proposals of the trained RPN (``model.rcnn.rpn_checkpoint``) on the training images' dense
    test views (shorter side ``test.scale``), cached once in ``proposals.pt``; RoI-centric SGD on their warped crops;
    then the RPN+R-CNN rows of Table 13 on the validation set. Same outputs and resuming as the RPN stage.
    With ``model.rcnn.crop_source: image`` the regions are cropped from each image at its own resolution.
    ``model.rcnn.regions_per_batch`` is the global batch. Call it inside the run guard
    (:func:`detres.engine.tasks.localization.train_localizer`)."""
    _check_options(cfg)
    rcnn_cfg, solver = cfg.model.rcnn, cfg.solver
    bad = BadSamples.from_config(cfg)
    train, val, synsets = load_loc_records(cfg.data, bad_samples=bad)
    rpn, rpn_meta = load_localizer(rcnn_cfg.rpn_checkpoint)
    if list(rpn_meta["synsets"]) != list(synsets):
        raise ValueError(f"{rcnn_cfg.rpn_checkpoint}: its classes differ from data's {len(synsets)} synsets")
    start = start_distributed_run(cfg, **resume)
    out, last_path, device, state = start.out, start.last_path, start.device, start.state
    write_skipped(out, bad)  # data.on_bad_sample=skip: the dropped samples, listed in the run folder (rank 0)
    view = LocTestTransform(mode="dense", scale=int(cfg.test.scale))
    made_with = {
        "rpn_checkpoint": str(rcnn_cfg.rpn_checkpoint),
        "top_n": int(rcnn_cfg.proposals_per_class),
        "scale": int(cfg.test.scale),
        "nms": float(cfg.test.nms_thresh),
        "fg_iou": float(rcnn_cfg.fg_iou_thresh),
    }
    cache, scales = proposal_cache(
        rpn.to(device), train, view, out / "proposals.pt", made_with, fg_iou_thresh=float(rcnn_cfg.fg_iou_thresh)
    )
    # resumed: the weights come from the checkpoint, not from the classifier file model.weights names
    model = RCNNLocalizer.from_config(cfg.model, num_classes=len(synsets), load_weights=state is None).to(device)
    if model.crop_source == "image":
        cache = to_image_frame(cache, scales)
    optimizer, schedule, start_iter = build_step_solver(model, solver, state, last_path)
    amp = mixed_precision_from_config(solver, device)
    if state is not None:
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
    meta = {"synsets": synsets, "rpn_checkpoint": str(rcnn_cfg.rpn_checkpoint), "test_scale": int(cfg.test.scale)}
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    task = RCNNStageTask(model, optimizer, amp, cfg=cfg, cache=cache, train=train, view=view, meta=meta)
    started, cpu_started = time.time(), time.process_time()
    with progress_bar("train_loc (rcnn)", total=solver.max_iter, initial=start_iter) as progress:
        trainer = Trainer(
            task,
            max_iter=solver.max_iter,
            start_iter=start_iter,
            checkpoints=start.checkpoints,
            device=device,
            started=started,
            train_module=MethodCall(model),  # torchrun: DDP averages the gradients of model.losses
            hooks=default_hooks(
                schedule,
                optimizer,
                logger,
                log_period=solver.log_period,
                checkpoint_period=solver.checkpoint_period,
                progress=progress,
            ),
        )
        iteration = trainer.run()
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
