"""Training the localizer's RPN stage (Appendix C): per-class RPN on scale-augmented crops, then its Table-13 test."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from detres.config.load import Config
from detres.data.bad_samples import BadSamples, write_skipped
from detres.data.datasets.localization import (
    LocDataset,
    LocRecord,
    collate_loc,
    read_ilsvrc_loc,
    read_tiny_imagenet_train,
    read_tiny_imagenet_val_records,
    tiny_imagenet_synsets,
)
from detres.data.samplers import InfiniteSampler
from detres.data.transforms.localization import LocTrainTransform
from detres.data.validate import check_loc_sets
from detres.engine.amp import (
    SCALER_KEY,
    MixedPrecision,
    check_amp_dtype,
    mixed_precision_from_config,
    scaler_state_into,
)
from detres.engine.checkpoint import CheckpointManager, Diverged, check_finite_payload
from detres.engine.det_trainer import LossWindow, build_step_solver
from detres.engine.distributed import (
    distributed_run_guard,
    is_main_process,
    mean_over_ranks,
    shard_batches,
    start_distributed_run,
    wrap_ddp,
)
from detres.engine.loc_eval import classifier_label_map, format_table, predict_classes, test_localizer
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.optimizer import set_lr
from detres.engine.plots import plot_curves
from detres.engine.run_setup import stop_if_signalled
from detres.engine.seeded_data import IterationKeyedBatches, IterationSeededDataset
from detres.models.localization.rpn_localizer import RPNLocalizer
from detres.utils.atomic import write_json_atomic
from detres.utils.dist import finite_on_all_ranks
from detres.utils.torch_files import save_checkpoint

__all__ = ["STAGES", "load_loc_records", "synset_words", "test_from_config", "train_localizer"]

log = logging.getLogger(__name__)
STAGES = ("rpn", "rcnn")
DATA_FORMATS = ("ilsvrc", "tiny_imagenet")


def load_loc_records(
    data_cfg: Any, *, bad_samples: BadSamples | None = None
) -> tuple[list[LocRecord], list[LocRecord], list[str]]:
    """(training records, validation records, synsets) of ``data.format`` under ``data.root``.

    ``bad_samples`` collects what ``data.on_bad_sample=skip`` drops (a fresh collector by default), for the
    trainers to list in their run folder (:func:`detres.data.bad_samples.write_skipped`)."""
    fmt, root = data_cfg["format"], Path(data_cfg["root"])
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {DATA_FORMATS}, got {fmt!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: folder not found: {root}")
    bad = bad_samples if bad_samples is not None else BadSamples(data_cfg.get("on_bad_sample", "error"))
    if fmt == "ilsvrc":
        train, synsets = read_ilsvrc_loc(
            root, data_cfg["train_split"], synsets_file=data_cfg["synsets"], bad_samples=bad
        )
        val, _ = read_ilsvrc_loc(root, data_cfg["val_split"], synsets, bad_samples=bad)
    else:
        synsets = tiny_imagenet_synsets(root)
        train = read_tiny_imagenet_train(root, synsets, bad_samples=bad)
        val = read_tiny_imagenet_val_records(root, synsets)
    if data_cfg["max_val_images"] is not None:
        val = val[: int(data_cfg["max_val_images"])]
    train, val = check_loc_sets(train, val, bad)
    return train, val, synsets


def synset_words(data_cfg: Any) -> dict[str, str]:
    """wnid -> words (``LOC_synset_mapping.txt`` / ``words.txt``), to match a classifier's class names."""
    root = Path(data_cfg["root"])
    path = root / ("LOC_synset_mapping.txt" if data_cfg["format"] == "ilsvrc" else "words.txt")
    if data_cfg["format"] == "ilsvrc" and data_cfg["synsets"]:
        path = Path(data_cfg["synsets"])
    if not path.is_file():
        return {}
    pairs = (line.split(None, 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def _loader(dataset: LocDataset, cfg: Config, start_iter: int) -> DataLoader:
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


def _save(
    path: Path,
    model: torch.nn.Module,
    meta: dict,
    iteration: int,
    cfg: Config,
    optimizer: torch.optim.Optimizer | None = None,
    amp: MixedPrecision | None = None,
    *,
    checkpoints: CheckpointManager | None = None,
) -> Path:
    """The RPN stage's one checkpoint writer: ``last.pt`` through ``checkpoints`` (kept copies, finite check);
    rank 0 alone writes under torchrun."""
    if not is_main_process():
        return path
    payload = {
        "model": model.state_dict(),
        "meta": meta,
        "iter": iteration,
        "stage": "rpn",
        "config": cfg.to_dict(),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        scaler_state_into(payload, amp)
    if checkpoints is not None and path == checkpoints.last_path:
        return checkpoints.save(payload, iteration)
    check_finite_payload(payload, iteration, path)
    save_checkpoint(path, payload)
    return path


def train_localizer(
    cfg: Config,
    *,
    resume: bool | str = False,
    stage: str = "rpn",
    resume_from: str | Path | None = None,
    allow_model_change: bool = False,
) -> dict[str, Any]:
    """Train the per-class RPN on ``data`` and test it on the validation set; returns the test report.

    Writes ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every ``checkpoint_period``, atomic),
    ``model_final.pt``, ``loss_curves.png`` and ``test/`` (devkit prediction files, ``loc_test.json``) under
    ``output_dir``; ``resume`` continues ``last.pt`` (weights, momentum, iteration, the same batch stream).
    ``stage="rcnn"``: the R-CNN on a trained RPN's proposals (:func:`detres.engine.loc_rcnn_trainer.train_rcnn_stage`).
    Holds ``output_dir``'s run lock; ``resume`` / ``resume_from`` / ``allow_model_change`` and the stop signals:
    :func:`detres.engine.run_setup.start_run`, :func:`detres.engine.run_setup.run_guard`.
    """
    with distributed_run_guard(cfg):  # torchrun: rank 0 holds the lock
        return _train_localizer(
            cfg, resume=resume, stage=stage, resume_from=resume_from, allow_model_change=allow_model_change
        )


def _train_localizer(
    cfg: Config, *, resume: bool | str, stage: str, resume_from: str | Path | None, allow_model_change: bool
) -> dict[str, Any]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_amp_dtype(cfg.solver.amp_dtype)  # before any output is written
    if stage == "rcnn":  # data-parallel under torchrun too: proposals sharded, region batches sliced
        from detres.engine.loc_rcnn_trainer import train_rcnn_stage  # it reuses this module's helpers

        return train_rcnn_stage(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
    if cfg.input.scale_min < cfg.input.crop:
        raise ValueError(f"input.scale_min ({cfg.input.scale_min}) must be >= input.crop ({cfg.input.crop})")
    bad = BadSamples.from_config(cfg)
    train, val, synsets = load_loc_records(cfg.data, bad_samples=bad)
    start = start_distributed_run(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
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
    # resumed: the weights come from the checkpoint (the config's model with --allow-model-change), not model.weights
    model = RPNLocalizer.from_config(cfg.model, num_classes=len(synsets), load_weights=state is None).to(device)
    meta = {"synsets": synsets, "crop": int(cfg.input.crop), "test_scale": int(cfg.test.scale)}
    solver = cfg.solver
    optimizer, schedule, start_iter = build_step_solver(model, solver, state, last_path)
    amp = mixed_precision_from_config(solver, device)
    if state is not None:
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    started, cpu_started = time.time(), time.process_time()
    iteration, window = start_iter, LossWindow()
    model.train()
    progress = tqdm(
        total=solver.max_iter, initial=start_iter, desc="train_loc", dynamic_ncols=True, disable=not is_main_process()
    )
    train_model = wrap_ddp(model, device)  # torchrun: DDP averages the gradients; `model` stays the plain module

    def save_last(at: int) -> Path:
        return _save(last_path, model, meta, at, cfg, optimizer, amp, checkpoints=start.checkpoints)

    # Created only when there is training left, read one batch per step: never a batch past max_iter.
    batches = iter(_loader(train_set, cfg, start_iter)) if start_iter < solver.max_iter else iter(())
    with start.checkpoints.stop_on_divergence():  # a NaN / Inf: stop naming the last good checkpoint
        while iteration < solver.max_iter:
            iteration = _rpn_step(
                train_model,
                optimizer,
                schedule,
                amp,
                next(batches),
                iteration,
                window,
                logger,
                progress,
                cfg,
                started,
                save_last,
                start.checkpoints,
            )
            stop_if_signalled(iteration, lambda: save_last(iteration))  # noqa: B023
    progress.close()
    train_cpu = time.process_time() - cpu_started
    if not is_main_process():
        return {}  # rank 0 tests and writes (the ranks' weights are the same)
    _save(out / "model_final.pt", model, meta, iteration, cfg)
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


def _rpn_step(
    model,
    optimizer,
    schedule,
    amp: MixedPrecision,
    batch: dict[str, Any],
    iteration: int,
    window: LossWindow,
    logger: JsonLinesLogger,
    progress: tqdm,
    cfg: Config,
    started: float,
    save_last,
    checkpoints: CheckpointManager,
) -> int:
    """One SGD step of the per-class RPN, then the log line / checkpoint due; returns the iteration."""
    solver, device = cfg.solver, next(model.parameters()).device
    lr = schedule.lr_at(iteration)
    set_lr(optimizer, lr)
    with amp.autocast():
        losses = model(batch["images"].to(device), batch["targets"])
    total = sum(losses.values())
    if not finite_on_all_ranks(total.item()):
        raise Diverged(f"iteration {iteration}: loss is {total.item()}; lower solver.base_lr", failed_from=iteration)
    checkpoints.note_loss(iteration, total.item())
    optimizer.zero_grad(set_to_none=True)
    amp.backward_and_step(total, optimizer)
    iteration += 1
    progress.update(1)
    window.add(total.item(), losses)
    if iteration % solver.log_period == 0 or iteration == solver.max_iter:
        means = mean_over_ranks(window.flush())  # the global batch's losses (collective)
        logger.log(iter=iteration, lr=lr, time=time.time() - started, **means)
        progress.set_postfix(loss=f"{means['loss']:.3f}")
    if iteration % solver.checkpoint_period == 0 or iteration == solver.max_iter:
        save_last(iteration)
    return iteration


def test_from_config(
    model: torch.nn.Module,
    cfg: Config,
    val: list[LocRecord],
    synsets: list[str],
    *,
    out_dir: Path | None,
    modes: tuple[str, ...] = ("1crop", "dense"),
    classifier: str | None = None,
    classifier_mode: str | None = None,
    row_prefix: str = "rpn",
    rpn_modes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Table 13's rows on ``val`` with the ``test`` options; predicted classes need a classifier checkpoint.

    For an RPN + R-CNN pair (``model.rpn``), ``rpn_modes`` adds the rows of its RPN alone, tested on the same
    images and predicted classes, so that one report holds the whole table.
    """
    predicted = None
    classifier = classifier or cfg.test.classifier
    if classifier:
        from detres.engine.cls_eval import load_classifier

        loaded = load_classifier(classifier)
        names = loaded.class_names or []
        label_map = classifier_label_map(names, synsets, synset_words(cfg.data))
        predicted = predict_classes(loaded, val, label_map, mode=classifier_mode or cfg.test.classifier_mode)
    options = {
        "crop": int(cfg.input.crop),
        "scale": int(cfg.test.scale),
        "scales": list(cfg.test.scales),
        "predicted": predicted,
        "out_dir": out_dir,
        "top_n": int(cfg.test.top_n),
        "nms_thresh": float(cfg.test.nms_thresh),
        "box_mode": cfg.test.box_mode,
        "average_top": int(cfg.test.average_top),
    }
    rows: dict[str, Any] = {}
    if rpn_modes:
        rows.update(test_localizer(model.rpn, val, modes=rpn_modes, row_prefix="rpn", **options)["rows"])
    report = test_localizer(model, val, modes=modes, row_prefix=row_prefix, **options)
    report["rows"] = {**rows, **report["rows"]}
    if out_dir is not None and rpn_modes:
        write_json_atomic(Path(out_dir) / "loc_test.json", report)
    return report
