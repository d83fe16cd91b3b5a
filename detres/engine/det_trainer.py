"""Faster R-CNN training (approximate joint or 4-step alternating training, Appendix A) and dataset-level testing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from detres.config.load import Config
from detres.data.build import build_detection_dataset, dataset_class_names, dataset_label_to_category_id
from detres.data.collate import collate_detection
from detres.data.samplers import AspectRatioGroupedBatchSampler, InfiniteSampler, compute_aspect_ratio_groups
from detres.data.validate import check_detection_sets
from detres.data.worker_errors import readable, readable_worker_errors
from detres.engine.amp import SCALER_KEY, check_amp_dtype, mixed_precision_from_config, scaler_state_into
from detres.engine.checkpoint import CheckpointManager, Diverged, check_finite_payload
from detres.engine.distributed import (
    distributed_run_guard,
    is_main_process,
    mean_over_ranks,
    shard_batches,
    start_distributed_run,
    wrap_ddp,
)
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.lr_schedule import LRSchedule
from detres.engine.optimizer import build_detection_optimizer, set_lr
from detres.engine.plots import plot_curves
from detres.engine.run_setup import load_model_state, stop_if_signalled
from detres.engine.seeded_data import IterationKeyedBatches, IterationSeededDataset
from detres.evaluation.coco_backend import coco_classes
from detres.evaluation.det_eval import evaluate_detection_dataset
from detres.evaluation.results_io import detections_to_coco_results, write_coco_results, write_voc_results
from detres.inference.detect import run_inference
from detres.inference.test_config import TestConfig
from detres.inference.visualize import save_detection_pngs
from detres.models.build import build_detector
from detres.utils.atomic import write_json_atomic
from detres.utils.dist import finite_on_all_ranks
from detres.utils.torch_files import save_checkpoint

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg")
TRAINING_SCHEMES = ("joint", "alternating")


def _train_loader(
    dataset, cfg: Config, start_iter: int, *, images_per_batch: int | None = None, seed: int | None = None
) -> DataLoader:
    """An endless, seeded stream of batches that resumes at batch ``start_iter`` exactly.

    ``images_per_batch`` / ``seed`` default to ``solver.images_per_batch`` / ``cfg.seed`` (the
    alternating scheme gives each step its own batch size and stream).
    """
    batch = int(cfg.solver.images_per_batch if images_per_batch is None else images_per_batch)
    seed = int(cfg.seed if seed is None else seed)
    if cfg.solver.aspect_ratio_grouping:
        batches = AspectRatioGroupedBatchSampler(
            InfiniteSampler(len(dataset), seed=seed),
            compute_aspect_ratio_groups(dataset),
            batch,
            start_batch=start_iter,
        )
    else:
        batches = BatchSampler(
            InfiniteSampler(len(dataset), seed=seed, start=start_iter * batch), batch, drop_last=True
        )
    # Every draw (scale, flip, RPN / RoI sampling) of image i at iteration t is seeded by (seed, t, i).
    return DataLoader(
        IterationSeededDataset(dataset, seed=seed),
        batch_sampler=IterationKeyedBatches(shard_batches(batches), start_iter=start_iter),
        collate_fn=collate_detection,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def _check_same_classes(train_set, val_set) -> None:
    if dataset_class_names(train_set) != dataset_class_names(val_set):
        raise ValueError(
            f"the training and validation sets list different classes: "
            f"{dataset_class_names(train_set)} vs {dataset_class_names(val_set)}"
        )


def detector_metadata(dataset, cfg: Config) -> dict[str, Any]:
    """What inference needs besides weights: class names, category ids and the test input size."""
    return {
        "class_names": dataset_class_names(dataset),
        "label_to_category_id": dataset_label_to_category_id(dataset),
        "min_size_test": int(cfg.input.min_size_test),
        "max_size_test": int(cfg.input.max_size_test),
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: Path) -> None:
    """Restore SGD state (momentum buffers, group LRs) from a checkpoint, with a clear error when the
    parameter groups differ (e.g. a checkpoint from before weights and biases were separate groups)."""
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        groups = [len(g["params"]) for g in state.get("param_groups", [])]
        ours = [len(g["params"]) for g in optimizer.param_groups]
        raise ValueError(
            f"{source}: its optimizer state has parameter groups of sizes {groups}, this run's has "
            f"{ours} (solver options or trainable layers changed?); cannot resume: {exc}"
        ) from None


def build_step_solver(
    model: torch.nn.Module, solver: Any, state: dict | None, source: Path
) -> tuple[torch.optim.Optimizer, LRSchedule, int]:
    """SGD with the detection parameter groups and the step schedule of ``solver``; with a checkpoint ``state``
    (read from ``source``) the model weights, momentum buffers and iteration are restored.
    Returns (optimizer, schedule, start iteration)."""
    optimizer = build_detection_optimizer(model, solver)
    schedule = LRSchedule(
        optimizer,
        base_lr=solver.base_lr,
        mode="step",
        steps=solver.steps,
        gamma=solver.gamma,
        warmup_iters=solver.warmup_iters,
        warmup_lr=solver.warmup_lr,
    )
    if state is None:
        return optimizer, schedule, 0
    load_model_state(model, state["model"], source)
    load_optimizer_state(optimizer, state["optimizer"], source)
    return optimizer, schedule, int(state["iter"])


class DetRun:
    """What one training run shares between its loop(s): config, output paths, data, logging, checkpoints.

    The loops themselves (:func:`_train_joint`, :func:`detres.engine.alternating.train_alternating`)
    own the model, the optimizer and the iteration count.
    """

    def __init__(
        self,
        cfg: Config,
        out: Path,
        last_path: Path,
        device: torch.device,
        train_set,
        val_set,
        meta: dict[str, Any],
        logger: JsonLinesLogger,
        *,
        checkpoints: CheckpointManager | None = None,
        model_changed: bool = False,
    ) -> None:
        self.cfg, self.out, self.last_path, self.device = cfg, out, last_path, device
        self.train_set, self.val_set, self.meta, self.logger = train_set, val_set, meta, logger
        # writes last.pt (+ the kept copies), knows the last good one
        self.checkpoints = checkpoints or CheckpointManager(out, keep=cfg.solver.get("keep_checkpoints", 3))
        self.model_changed = model_changed  # resumed with --allow-model-change: build the model from the config
        self.amp = mixed_precision_from_config(cfg.solver, device)  # one per run: warns once, one scaler
        self.started = time.time()

    def loader(self, start_iter: int, *, images_per_batch: int | None = None, seed: int | None = None) -> DataLoader:
        return _train_loader(self.train_set, self.cfg, start_iter, images_per_batch=images_per_batch, seed=seed)

    def save(
        self,
        path: Path,
        model: torch.nn.Module,
        iteration: int,
        optimizer: torch.optim.Optimizer | None = None,
        **extra: Any,
    ) -> Path:
        """A train_det checkpoint: model weights, the config tree it is rebuilt from, metadata, iteration.
        The one place a detection run writes checkpoints; a non-finite state is refused (Diverged).
        Only rank 0 of a distributed run writes (the others' weights are the same)."""
        if not is_main_process():
            return Path(path)
        payload = {
            "model": model.state_dict(),
            "meta": self.meta,
            "iter": iteration,
            "config": self.cfg.to_dict(),
            "scheme": self.cfg.solver.training_scheme,
            **extra,
        }
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
            scaler_state_into(payload, self.amp)
        if Path(path) == self.last_path:
            return self.checkpoints.save(payload, iteration)
        check_finite_payload(payload, iteration, Path(path))
        save_checkpoint(path, payload)
        return Path(path)

    def evaluate(self, model: torch.nn.Module, iteration: int) -> dict[str, Any]:
        cfg = self.cfg
        with readable_worker_errors():  # a bad val image: one line naming it, not a worker traceback
            dets = run_inference(
                model,
                self.val_set,
                device=self.device,
                batch_size=cfg.solver.images_per_batch,
                num_workers=cfg.data.num_workers,
                amp=cfg.test.amp,
            )
        if not is_main_process():
            return {}  # every rank detected on its shard; rank 0 scores the gathered detections
        result = evaluate_detection_dataset(
            self.val_set,
            dets,
            iou_thresh_voc=cfg.test.iou_thresh_voc,
            use_07_metric=cfg.test.use_07_metric,
            coco_backend=cfg.test.coco_backend,
        )
        self.logger.log(
            iter=iteration,
            AP=result["coco"]["summary"]["AP"],
            AP50=result["coco"]["summary"]["AP50"],
            voc_mAP=result["voc"]["mAP"],
        )
        return result

    def sgd_step(self, optimizer: torch.optim.Optimizer, losses: dict[str, torch.Tensor], iteration: int) -> float:
        """Sum the losses, refuse a non-finite total, backward, step (scaled under float16 AMP); returns the total."""
        total = sum(losses.values())
        if not finite_on_all_ranks(total.item()):
            raise Diverged(
                f"iteration {iteration}: loss is {total.item()} "
                f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); lower solver.base_lr",
                failed_from=iteration,
            )
        self.checkpoints.note_loss(iteration, total.item())
        optimizer.zero_grad(set_to_none=True)
        self.amp.backward_and_step(total, optimizer)
        return total.item()


class LossWindow:
    """Losses of the iterations since the last log line, averaged into one record."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, total: float, losses: dict[str, torch.Tensor]) -> None:
        self.values.setdefault("loss", []).append(total)
        for key, value in losses.items():
            self.values.setdefault(key, []).append(value.item())

    def flush(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.values.items() if v}
        self.values = {}
        return means


def train_detector(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """:func:`_train_detector` holding ``output_dir``'s run lock, with SIGINT / SIGTERM saving ``last.pt`` and
    stopping (TrainingInterrupted). ``resume``: False, True or "auto" (continue last.pt if any, else start);
    ``resume_from``: an older kept checkpoint; see :func:`detres.engine.run_setup.start_run`."""
    with distributed_run_guard(cfg):  # torchrun: rank 0 holds the lock
        return _train_detector(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)


def _train_detector(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """Train on ``data.train_*``, evaluate periodically and at the end on ``data.val_*``; returns metrics.

    Writes ``config.yaml``, ``metrics.jsonl`` (losses every ``log_period``, AP at each evaluation),
    ``last.pt`` (every ``checkpoint_period``), ``model_final.pt``, ``metrics.json``, the curve PNGs
    and ``test/`` (see :func:`test_detector`) under ``cfg.output_dir``. An existing ``last.pt`` is
    never overwritten unless ``resume``.

    ``solver.training_scheme``: "joint" (default; approximate joint training, one loss over RPN and
    Fast R-CNN) or "alternating" (Ren et al.'s 4-step training, :mod:`detres.engine.alternating`,
    which also writes ``step1_rpn.pt`` .. ``step4_fast_rcnn.pt``). SGD uses the weight / bias
    parameter groups of :mod:`detres.engine.optimizer`; the LR schedule scales every group's LR.

    Resuming restores the weights, the optimizer state (momentum buffers) and the iteration from
    ``last.pt``; the LR schedule is a function of the iteration, and the batch stream is seeded and
    skips to the same batch, and every random draw (scale choice, flip, RPN / RoI sampling) of an image
    is seeded by (seed, iteration, image), so on one device and thread count a resumed run repeats the
    uninterrupted run's losses bit for bit. A checkpoint of the other training scheme is refused.
    """
    scheme = cfg.solver.training_scheme
    if scheme not in TRAINING_SCHEMES:
        raise ValueError(f"solver.training_scheme must be one of {list(TRAINING_SCHEMES)}, got {scheme!r}")
    check_amp_dtype(cfg.solver.amp_dtype)  # before any output is written
    if scheme == "alternating":
        from detres.engine.alternating import alternating_plan

        alternating_plan(cfg.solver)  # bad per-step options fail before any work
    coco_classes(cfg.test.coco_backend)  # an unknown or uninstalled COCO backend fails now, not at the first evaluation
    start = start_distributed_run(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
    out, last_path, device, state = start.out, start.last_path, start.device, start.state

    train_set = build_detection_dataset(cfg, "train", train=True)
    val_set = build_detection_dataset(cfg, "val", train=False, class_names=dataset_class_names(train_set))
    _check_same_classes(train_set, val_set)
    check_detection_sets(train_set, val_set, cfg, out)  # image files, boxes, unseen classes; skipped_samples.json
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.train_ann}: the training set has no images")
    if state is not None and state.get("scheme", "joint") != scheme:
        raise ValueError(
            f"{last_path} was written by solver.training_scheme={state.get('scheme', 'joint')!r}; "
            f"the config asks for {scheme!r}"
        )
    meta = detector_metadata(train_set, cfg)
    start_iter = int(state["iter"]) if state is not None else 0
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    run = DetRun(
        cfg,
        out,
        last_path,
        device,
        train_set,
        val_set,
        meta,
        logger,
        checkpoints=start.checkpoints,
        model_changed=start.model_changed,
    )
    if state is not None:
        run.amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler

    with run.checkpoints.stop_on_divergence():  # a NaN / Inf: stop naming the last good checkpoint
        if scheme == "joint":
            model, iteration = _train_joint(run, state)
        else:
            from detres.engine.alternating import train_alternating

            model, iteration = train_alternating(run, state)
    train_time = time.time() - run.started
    run.save(out / "model_final.pt", model, iteration)
    metrics = test_detector(model, val_set, meta, cfg, out_dir=out / "test", device=device)
    if not is_main_process():
        return metrics  # the other ranks only helped with the sharded test pass
    metrics.update(iterations=iteration, train_time_s=round(train_time, 1))
    logger.log(
        iter=iteration,
        AP=metrics["coco"]["summary"]["AP"],
        AP50=metrics["coco"]["summary"]["AP50"],
        voc_mAP=metrics["voc"]["mAP"],
    )
    write_json_atomic(out / "metrics.json", metrics)
    records = read_json_lines(out / "metrics.jsonl")
    plot_curves(
        records,
        out / "loss_curves.png",
        series=[("loss", "total"), *((k, k) for k in LOSS_KEYS)],
        title="Faster R-CNN training losses",
        ylabel="loss",
    )
    plot_curves(
        records,
        out / "val_curves.png",
        series=[("AP", "COCO AP"), ("AP50", "COCO AP50"), ("voc_mAP", "VOC mAP")],
        title="validation",
        ylabel="AP",
        percent=True,
    )
    return metrics


def _train_joint(run: DetRun, state: dict | None) -> tuple[torch.nn.Module, int]:
    """Approximate joint training (py-faster-rcnn end2end): one SGD step on the sum of the 4 losses."""
    cfg, device = run.cfg, run.device
    # resumed: weights come from the checkpoint (the config's model with --allow-model-change), not model.weights
    model = build_detector(cfg.model, num_classes=len(run.meta["class_names"]), load_weights=state is None).to(device)

    solver = cfg.solver
    optimizer, schedule, start_iter = build_step_solver(model, solver, state, run.last_path)

    iteration = start_iter
    window = LossWindow()
    model.train()
    progress = tqdm(
        total=solver.max_iter, initial=start_iter, desc="train_det", dynamic_ncols=True, disable=not is_main_process()
    )
    train_model = wrap_ddp(model, device)  # torchrun: DDP averages the gradients; `model` stays the plain module
    # Created only when there is training left, and read one batch per step: never a batch past max_iter.
    batches = readable(run.loader(start_iter)) if start_iter < solver.max_iter else iter(())
    while iteration < solver.max_iter:
        iteration = _joint_step(
            run,
            model,
            optimizer,
            schedule,
            next(batches),
            iteration,
            window,
            progress,
            train_model=train_model,
        )
        stop_if_signalled(iteration, lambda: run.save(run.last_path, model, iteration, optimizer))  # noqa: B023
    progress.close()
    return model, iteration


def _joint_step(
    run: DetRun,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    batch: dict[str, Any],
    iteration: int,
    window: LossWindow,
    progress: tqdm,
    train_model: torch.nn.Module | None = None,
) -> int:
    """One joint SGD step on ``batch``, then the log line / checkpoint / evaluation due; returns the iteration.
    ``train_model``: what runs the training forward pass (``model`` in its DDP wrapper under torchrun)."""
    solver, device = run.cfg.solver, run.device
    lr = schedule.lr_at(iteration)
    set_lr(optimizer, lr)  # each group: lr x its lr_factor (biases: bias_lr_factor)
    with run.amp.autocast():
        losses = (train_model or model)(batch["images"].to(device), batch["targets"], image_sizes=batch["image_sizes"])
    total = run.sgd_step(optimizer, losses, iteration)
    iteration += 1
    progress.update(1)
    window.add(total, losses)
    if iteration % solver.log_period == 0 or iteration == solver.max_iter:
        means = mean_over_ranks(window.flush())  # the global batch's losses (collective: every rank logs here)
        run.logger.log(iter=iteration, lr=lr, time=time.time() - run.started, **means)
        progress.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2g}")
    if iteration % solver.checkpoint_period == 0 or iteration == solver.max_iter:
        run.save(run.last_path, model, iteration, optimizer)
    if solver.eval_period > 0 and iteration % solver.eval_period == 0 and iteration < solver.max_iter:
        run.evaluate(model, iteration)
        model.train()
    return iteration


def test_detector(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    dataset,
    meta: dict[str, Any],
    cfg: Config,
    *,
    out_dir: Path,
    device,
    options: TestConfig | None = None,
) -> dict[str, Any]:
    """Detect on ``dataset``; write COCO results JSON and the COCO ground truth they were scored against,
    VOC devkit files, per-class precision-recall curves, metrics and example PNGs.

    ``model``: one detector or the members of an ensemble; ``options``: the Appendix-B test-time extras
    (None = ``TestConfig.from_config(cfg)``).

    ``coco_gt.json`` is the ground truth ``metrics.json``'s COCO AP was computed on (the boxes as the
    dataset loaded them, crowd / difficult regions as ``iscrowd``), so
    ``tools/eval_det.py coco --gt coco_gt.json --results coco_results.json`` reproduces it exactly.
    """
    from detres.engine.plots import save_pr_curves
    from detres.evaluation.det_eval import dataset_to_coco_gt

    out_dir = Path(out_dir)
    dets = run_inference(
        model,
        dataset,
        device=device,
        batch_size=cfg.solver.images_per_batch,
        num_workers=cfg.data.num_workers,
        amp=cfg.test.amp,
        options=TestConfig.from_config(cfg) if options is None else options,
    )
    if not is_main_process():
        return {}  # sharded detection done; rank 0 scores the gathered detections and writes the files
    metrics = evaluate_detection_dataset(
        dataset,
        dets,
        iou_thresh_voc=cfg.test.iou_thresh_voc,
        use_07_metric=cfg.test.use_07_metric,
        coco_backend=cfg.test.coco_backend,
    )
    write_coco_results(detections_to_coco_results(dets, meta["label_to_category_id"]), out_dir / "coco_results.json")
    write_json_atomic(out_dir / "coco_gt.json", dataset_to_coco_gt(dataset), indent=None)
    # VOC datasets name images by string ids; COCO ones by their numeric id.
    write_voc_results(
        dets,
        meta["class_names"],
        getattr(dataset, "image_ids", None),
        str(out_dir / "voc" / "comp4_det_test_{cls}.txt"),
    )
    save_pr_curves(
        dataset,
        dets,
        out_dir / "pr_curves.png",
        iou_thresh=cfg.test.iou_thresh_voc,
        use_07_metric=cfg.test.use_07_metric,
    )
    save_detection_pngs(
        dataset,
        dets,
        meta["class_names"],
        out_dir / "vis",
        count=cfg.test.vis_images,
        score_thresh=cfg.test.vis_score_thresh,
    )
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
