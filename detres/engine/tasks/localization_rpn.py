"""The localizer's RPN stage (Appendix C) as a task of the training loop: the per-class RPN trained on
scale-augmented crops, then its Table-13 test."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

from detres.config.load import Config
from detres.data.bad_samples import BadSamples, write_skipped
from detres.data.datasets.localization import LocDataset, collate_loc
from detres.data.samplers import InfiniteSampler
from detres.data.transforms.localization import LocTrainTransform
from detres.engine.amp import SCALER_KEY, MixedPrecision, mixed_precision_from_config, scaler_state_into
from detres.engine.distributed import is_main_process, shard_batches, start_distributed_run
from detres.engine.hooks import default_hooks, progress_bar
from detres.engine.loc_data import load_loc_records
from detres.engine.loc_eval import format_table, test_from_config
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.optimizer import build_step_solver
from detres.engine.plots import plot_curves
from detres.engine.run.checkpoint import check_finite_payload
from detres.engine.seeded_data import IterationKeyedBatches, IterationSeededDataset
from detres.engine.train_loop import Trainer, TrainTask, sgd_update_on_losses
from detres.models.localization.rpn_localizer import RPNLocalizer
from detres.utils.atomic import write_json_atomic
from detres.utils.torch_files import save_checkpoint

__all__ = ["RPNStageTask", "localization_train_loader", "train_rpn_stage"]

log = logging.getLogger(__name__)


def localization_train_loader(dataset: LocDataset, cfg: Config, start_iter: int) -> DataLoader:
    """Endless seeded batches of crops that resume at batch ``start_iter`` exactly.

    Every draw of image i at iteration t (scale, crop window, flip, and the RPN's anchor sampling through the
    ``seed`` its target carries) is seeded by (seed, t, i): a resumed run and a torchrun run (each rank taking its
    slice of the global batch) draw what one uninterrupted process draws."""
    batch = int(cfg.solver.images_per_batch)
    sampler = BatchSampler(
        InfiniteSampler(len(dataset), seed=int(cfg.seed), start=start_iter * batch), batch, drop_last=True
    )
    return DataLoader(
        IterationSeededDataset(dataset, seed=int(cfg.seed)),
        batch_sampler=IterationKeyedBatches(shard_batches(sampler), start_iter=start_iter),
        collate_fn=collate_loc,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


class RPNStageTask(TrainTask):
    """SGD on the per-class RPN's losses over batches of scale-augmented crops."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        amp: MixedPrecision,
        *,
        cfg: Config,
        train_set: LocDataset,
        meta: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.model, self.optimizer, self.amp = model, optimizer, amp
        self.cfg, self.train_set, self.meta, self.device = cfg, train_set, meta, device

    def batches(self, start_iter: int) -> Iterator[Any]:
        return iter(localization_train_loader(self.train_set, self.cfg, start_iter))

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, float]:
        with self.amp.autocast():
            losses = trainer.train_model(batch["images"].to(self.device), batch["targets"])
        return sgd_update_on_losses(losses, self.optimizer, self.amp, iteration=trainer.global_iter)

    def payload(self, iteration: int) -> dict[str, Any]:
        """The RPN stage's checkpoint (``model_final.pt``; ``last.pt`` adds the optimizer)."""
        return {
            "model": self.model.state_dict(),
            "meta": self.meta,
            "iter": iteration,
            "stage": "rpn",
            "config": self.cfg.to_dict(),
        }

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        payload = self.payload(trainer.global_iter)
        payload["optimizer"] = self.optimizer.state_dict()
        return scaler_state_into(payload, self.amp)


def train_rpn_stage(cfg: Config, **resume: Any) -> dict[str, Any]:
    """The RPN stage of :func:`detres.engine.tasks.localization.train_localizer` (call it inside the run guard)."""
    if cfg.input.scale_min < cfg.input.crop:
        raise ValueError(f"input.scale_min ({cfg.input.scale_min}) must be >= input.crop ({cfg.input.crop})")
    bad = BadSamples.from_config(cfg)
    train, val, synsets = load_loc_records(cfg.data, bad_samples=bad)
    start = start_distributed_run(cfg, **resume)
    out, last_path, device, state = start.out, start.last_path, start.device, start.state
    write_skipped(out, bad)  # data.on_bad_sample=skip: the dropped samples, listed in the run folder (rank 0)
    transform = LocTrainTransform(
        scale_min=cfg.input.scale_min,
        scale_max=cfg.input.scale_max,
        crop=cfg.input.crop,
        hflip_prob=cfg.input.flip_prob,
        seed=cfg.seed,
    )
    train_set = LocDataset(train, synsets, transform=transform)
    # resumed: the weights come from the checkpoint, not from the backbone file model.weights names
    model = RPNLocalizer.from_config(cfg.model, num_classes=len(synsets), load_weights=state is None).to(device)
    meta = {"synsets": synsets, "crop": int(cfg.input.crop), "test_scale": int(cfg.test.scale)}
    solver = cfg.solver
    optimizer, schedule, start_iter = build_step_solver(model, solver, state, last_path)
    amp = mixed_precision_from_config(solver, device)
    if state is not None:
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    task = RPNStageTask(model, optimizer, amp, cfg=cfg, train_set=train_set, meta=meta, device=device)
    started, cpu_started = time.time(), time.process_time()
    with progress_bar("train_loc", total=solver.max_iter, initial=start_iter) as progress:
        trainer = Trainer(
            task,
            max_iter=solver.max_iter,
            start_iter=start_iter,
            checkpoints=start.checkpoints,
            device=device,
            started=started,
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
        return {}  # rank 0 tests and writes (the ranks' weights are the same)
    final = task.payload(iteration)
    check_finite_payload(final, iteration, out / "model_final.pt")
    save_checkpoint(out / "model_final.pt", final)
    plot_curves(
        read_json_lines(out / "metrics.jsonl"),
        out / "loss_curves.png",
        series=[("loss", "total"), ("loss_rpn_cls", "loss_rpn_cls"), ("loss_rpn_box", "loss_rpn_box")],
        title="per-class RPN training losses",
        ylabel="loss",
    )
    report = test_from_config(model, cfg, val, synsets, out_dir=out / "test")
    report.update(iterations=iteration, train_cpu_s=round(train_cpu, 1), train_wall_s=round(time.time() - started, 1))
    write_json_atomic(out / "metrics.json", report)
    log.info("localization (%d val images):\n%s", len(val), format_table(report))
    return report
