"""The README's main job on built-in data: shapes world → train_cls → precise BN → train_det → metrics → Table 9 rows
→ the localizer's RPN stage (Appendix C)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from detres.config.load import load_config
from detres.data.shapes.world import generate_shapes_world
from detres.engine.ablation import run_ablation
from detres.engine.run.setup import resolve_device
from detres.engine.tasks.classification import train_classifier
from detres.engine.tasks.detection import train_detector
from detres.engine.tasks.localization import train_localizer
from detres.utils.atomic import write_json_atomic

CLS_CONFIG = "configs/cls/shapes_r18.yaml"
DET_CONFIG = "configs/det/shapes_r18.yaml"
LOC_CONFIG = "configs/loc/shapes_r18.yaml"
ABLATION_ROWS = ("baseline", "refinement", "multiscale")  # Table 9's rows that one detector allows
ABLATION_KEYS = ("row", "mAP50", "mAP", "voc07_mAP", "sec_per_img", "gflops_per_img", "cost_ratio")  # in summary


def run_demo(
    out: str | Path,
    *,
    data_root: str | Path = "data_toy",
    repo_root: str | Path = ".",
    overwrite: bool = False,
    seed: int = 0,
    ablation: bool = True,
    localization: bool = True,
) -> dict[str, Any]:
    """Generate the data, pre-train ResNet-18, recompute BN, train and evaluate the detector; then (``ablation``)
    the Table-9 rows baseline / +box refinement / +multi-scale on its val set, written to ``ablation.json``;
    then (``localization``) the per-class RPN localizer on the same backbone, tested with Table 13's rows."""
    out, data_root, repo_root = Path(out), Path(data_root), Path(repo_root)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace this demo run")
        shutil.rmtree(out)
    started = time.time()
    paths = generate_shapes_world(data_root, seed=seed)
    cls_cfg = load_config(
        repo_root / CLS_CONFIG,
        [
            f"output_dir={out / 'cls'}",
            f"data.train_dir={paths['cls_train']}",
            f"data.val_dir={paths['cls_val']}",
            f"seed={seed}",
        ],
    )
    cls_metrics = train_classifier(cls_cfg)
    det_cfg = load_config(
        repo_root / DET_CONFIG,
        [
            f"output_dir={out / 'det'}",
            f"model.weights={out / 'cls' / 'model_final.pt'}",
            f"data.train_images={paths['det_images']}",
            f"data.train_ann={paths['det_coco_train']}",
            f"data.val_images={paths['det_images']}",
            f"data.val_ann={paths['det_coco_val']}",
            f"seed={seed}",
        ],
    )
    det_metrics = train_detector(det_cfg)
    pr_png = out / "det" / "test" / "pr_curves.png"  # written by test_detector with the metrics
    rows = demo_ablation(det_cfg, out) if ablation else None
    loc = demo_localization(repo_root, out, paths["loc_root"], seed) if localization else None
    summary = {
        "classification": {
            "val_errors_after_bn_recompute": cls_metrics.get("after_bn_recompute"),
            "train_time_s": cls_metrics["train_time_s"],
        },
        "detection": {
            "coco": det_metrics["coco"]["summary"],
            "voc07_mAP": det_metrics["voc"]["mAP"],
            "voc_per_class": det_metrics["voc"]["per_class"],
            "train_time_s": det_metrics["train_time_s"],
        },
        "ablation": None
        if rows is None
        else {"rows": [{k: r[k] for k in ABLATION_KEYS} for r in rows], "json": str(out / "ablation.json")},
        "localization": loc,
        "total_time_s": round(time.time() - started, 1),
        "outputs": {
            "cls": str(out / "cls"),
            "det": str(out / "det"),
            "detection_pngs": str(out / "det" / "test" / "vis"),
            "pr_curves": str(pr_png),
        },
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def demo_ablation(det_cfg: Any, out: Path) -> list[dict[str, Any]]:
    """Table 9's single-detector rows on the demo detector and its val set; writes ``out/ablation.json``."""
    rows = run_ablation(
        det_cfg, baseline=out / "det" / "model_final.pt", rows=ABLATION_ROWS, device=resolve_device(det_cfg.device)
    )
    write_json_atomic(out / "ablation.json", rows)
    return rows


def demo_localization(repo_root: Path, out: Path, loc_root: Path, seed: int) -> dict[str, Any]:
    """The RPN stage of the localizer on the shapes world's LOC split, from the demo's classifier; returns the
    Table-13 rows (LOC error fractions) and the whole-image-box baseline."""
    cfg = load_config(
        repo_root / LOC_CONFIG,
        [
            f"output_dir={out / 'loc'}",
            f"model.weights={out / 'cls' / 'model_final.pt'}",
            f"data.root={loc_root}",
            f"test.classifier={out / 'cls' / 'model_final.pt'}",
            f"seed={seed}",
        ],
    )
    report = train_localizer(cfg)
    errors = ("gt_known_loc_err", "top1_loc_err", "top5_loc_err")
    return {
        "rows": {name: {k: row[k] for k in errors if k in row} for name, row in report["rows"].items()},
        "box_baseline": report["box_baseline"],
        "report": str(out / "loc" / "metrics.json"),
    }
