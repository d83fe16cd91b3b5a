"""Table 9 of the ResNet paper: evaluate the Appendix-B test-time extras row by row (accuracy, time, FLOPs)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from detres.config.load import Config
from detres.data.build import build_detection_dataset, dataset_label_to_category_id
from detres.data.datasets.subset import first_images
from detres.evaluation.ablation import ROW_LABELS, cost_ratio, parse_rows
from detres.evaluation.det_eval import evaluate_detection_dataset
from detres.evaluation.results_io import detections_to_coco_results, write_coco_results
from detres.inference.detect import run_inference
from detres.inference.ensemble import load_ensemble
from detres.inference.fast_path import prepare_for_inference
from detres.inference.test_config import TestConfig

__all__ = ["RowPlan", "ladder_options", "plan_rows", "count_gflops", "evaluate_row", "run_ablation"]


@dataclass(frozen=True)
class RowPlan:
    """One row of the table: its name, the checkpoints whose models run (several = ensemble), the options."""

    name: str
    checkpoints: tuple[str, ...]
    options: TestConfig


def ladder_options(cfg: Config) -> dict[str, TestConfig]:
    """Options of each row, each adding to the row above: all off (the checkpoint's post-processing), then
    box refinement + box voting, then multi-scale testing (the config's ``test.multiscale``, forced on).
    Flip is not a row of Table 9 and stays off."""
    test = dict(cfg.test, multiscale=dict(cfg.test.multiscale, enabled=True))
    full = TestConfig.from_config(dict(cfg, test=test))
    plain = dataclasses.replace(full.without_extras(), voting=None)
    refined = dataclasses.replace(plain, box_refinement=True, voting=True)
    multiscale = dataclasses.replace(refined, multiscale=True, pyramid_proposals=full.pyramid_proposals)
    return {
        "baseline": plain,
        "refinement": refined,
        "context": refined,
        "multiscale": multiscale,
        "ensemble": multiscale,
    }


def plan_rows(
    options: dict[str, TestConfig],
    *,
    baseline: str,
    context: str | None = None,
    ensemble: Sequence[str] = (),
    rows: Sequence[str] | str | None = None,
) -> tuple[list[RowPlan], list[str]]:
    """The rows to evaluate and notes on the rows skipped for want of a checkpoint.

    Without ``context`` the context row is skipped and later rows run the baseline model; without
    ``ensemble`` the ensemble row is skipped. Rows named explicitly in ``rows`` must be possible.
    """
    wanted = parse_rows(rows)
    main = context or baseline
    members = {
        "baseline": (baseline,),
        "refinement": (baseline,),
        "context": (context,) if context else (),
        "multiscale": (main,),
        "ensemble": (main, *ensemble) if ensemble else (),
    }
    plans, notes = [], []
    for name in wanted:
        if not members[name]:
            flag = "--context" if name == "context" else "--ensemble"
            if rows is not None:
                raise ValueError(f"--rows {name}: needs {flag}")
            notes.append(f"note: row {ROW_LABELS[name]!r} skipped (no {flag} checkpoint given)")
            continue
        plans.append(RowPlan(name, tuple(str(p) for p in members[name]), options[name]))
    return plans, notes


def count_gflops(
    models: Sequence[torch.nn.Module], dataset: Any, options: TestConfig, *, device: torch.device, images: int = 5
) -> float:
    """GFLOPs per image of detecting the first ``images`` images one at a time (torch's FLOP counter)."""
    subset = first_images(dataset, images)
    with FlopCounterMode(display=False) as counter:
        run_inference(models, subset, device=device, batch_size=1, num_workers=0, progress=False, options=options)
    return counter.get_total_flops() / len(subset) / 1e9


def evaluate_row(
    plan: RowPlan,
    models: Sequence[torch.nn.Module],
    dataset: Any,
    cfg: Config,
    *,
    device: torch.device,
    out_dir: Path | None = None,
    flop_images: int = 5,
) -> dict[str, Any]:
    """Accuracy (COCO AP50 / AP, VOC07 mAP), seconds per image (batch 1, no workers) and GFLOPs per image."""
    gflops = count_gflops(models, dataset, plan.options, device=device, images=flop_images)  # also warms up
    started = time.perf_counter()
    dets = run_inference(
        models, dataset, device=device, batch_size=1, num_workers=0, progress=False, options=plan.options
    )
    seconds = (time.perf_counter() - started) / len(dataset)
    metrics = evaluate_detection_dataset(
        dataset, dets, iou_thresh_voc=cfg.test.iou_thresh_voc, use_07_metric=True, coco_backend=cfg.test.coco_backend
    )
    if out_dir is not None:
        results = detections_to_coco_results(dets, dataset_label_to_category_id(dataset))
        write_coco_results(results, Path(out_dir) / f"{plan.name}_coco_results.json")
    summary = metrics["coco"]["summary"]
    return {
        "row": plan.name,
        "label": ROW_LABELS[plan.name],
        "mAP50": summary["AP50"],
        "mAP": summary["AP"],
        "voc07_mAP": metrics["voc"]["mAP"],
        "sec_per_img": seconds,
        "gflops_per_img": gflops,
        "images": len(dataset),
        "checkpoints": list(plan.checkpoints),
        "options": dataclasses.asdict(plan.options),
    }


def _val_set(cfg: Config, class_names: list[str], source: str, max_images: int | None) -> Any:
    dataset = build_detection_dataset(cfg, "val", train=False, class_names=class_names)
    names = [c["name"] for c in dataset.categories]
    if names != class_names:
        raise ValueError(f"{source} was trained on classes {class_names}, the val set has {names}")
    return first_images(dataset, max_images)


def run_ablation(
    cfg: Config,
    *,
    baseline: str | Path,
    context: str | Path | None = None,
    ensemble: Sequence[str | Path] = (),
    rows: Sequence[str] | str | None = None,
    max_images: int | None = None,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the rows of Table 9 on ``data.val_*`` (its first ``max_images`` images); one dict per row.

    ``cost_ratio`` is relative to the first row evaluated (the baseline unless ``rows`` leaves it out).
    Every checkpoint is loaded up front: a missing file or a different class list fails before any row runs.
    """
    log = log or (lambda line: None)
    plans, notes = plan_rows(
        ladder_options(cfg),
        baseline=str(baseline),
        context=None if context is None else str(context),
        ensemble=[str(p) for p in ensemble],
        rows=rows,
    )
    for note in notes:
        log(note)
    device = torch.device(device)
    paths = list(dict.fromkeys(p for plan in plans for p in plan.checkpoints))
    loaded, meta = load_ensemble(paths, device=device)
    # Frozen BN folded into the convs for every row alike: the same detections up to fp32 rounding, and the
    # trunk-heavy rows (multi-scale) then run at the speed their FLOPs predict (docs/appendix_b.md).
    loaded = [prepare_for_inference(m) for m in loaded]
    by_path = dict(zip(paths, loaded))
    dataset = _val_set(cfg, meta["class_names"], paths[0], max_images)
    results: list[dict[str, Any]] = []
    for plan in plans:
        log(f"row {ROW_LABELS[plan.name]!r}: {len(plan.checkpoints)} model(s), {len(dataset)} images")
        row = evaluate_row(
            plan,
            [by_path[p] for p in plan.checkpoints],
            dataset,
            cfg,
            device=device,
            out_dir=None if out_dir is None else Path(out_dir),
        )
        first = results[0] if results else row
        row["cost_ratio"] = cost_ratio(
            row["sec_per_img"], row["gflops_per_img"], first["sec_per_img"], first["gflops_per_img"]
        )
        results.append(row)
    return results
