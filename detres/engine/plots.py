"""Result PNGs: training curves (error vs iterations as in the ResNet paper's Fig. 4, losses) and PR curves."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from detres.data.build import dataset_class_names  # noqa: E402
from detres.evaluation.det_eval import dataset_ground_truth  # noqa: E402
from detres.evaluation.voc import voc_pr_curves  # noqa: E402
from detres.utils.atomic import atomic_write_bytes  # noqa: E402


def plot_curves(
    records: Sequence[dict],
    out_png: str | Path,
    *,
    series: Sequence[tuple[str, str]],
    title: str = "",
    ylabel: str = "",
    percent: bool = False,
) -> None:
    """Plot ``series`` = [(record key, legend label)] against ``iter``; records lacking a key are skipped."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in series:
        points = [(r["iter"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y * 100 if percent else y for y in ys], label=label, marker="." if len(xs) < 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save_figure(fig, out_png)


def _save_figure(fig: Figure, out_png: str | Path) -> None:
    """Render ``fig`` as PNG, close it and write the file atomically."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buffer.getvalue())


def pr_curves_figure(curves: Mapping[str, Mapping[str, Any]], *, title: str = "") -> Figure:
    """One precision-recall line per class, the points exactly as given (rank order), AP in the legend.

    ``curves``: class name -> ``{"recall", "precision", "ap"}`` as from detres.evaluation.voc.voc_pr_curves.
    A class with NaN AP (no positives) is listed in the legend without a line.
    """
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for k, (name, curve) in enumerate(curves.items()):
        ap = float(curve["ap"])
        if math.isnan(ap):
            ax.plot([], [], color="none", label=f"{name} (no positives)")
            continue
        recall, precision = np.asarray(curve["recall"]), np.asarray(curve["precision"])
        ax.plot(
            recall,
            precision,
            color=colors(k % colors.N),
            lw=1.5,
            label=f"{name} (AP {100 * ap:.1f}%)",
            marker="." if len(recall) == 1 else None,
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # beside the axes
    return fig


def plot_pr_curves(curves: Mapping[str, Mapping[str, Any]], out_png: str | Path, *, title: str = "") -> None:
    """Write pr_curves_figure(curves) as a PNG (atomically)."""
    _save_figure(pr_curves_figure(curves, title=title), out_png)


def save_pr_curves(
    dataset: Any,
    detections: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    *,
    iou_thresh: float = 0.5,
    use_07_metric: bool = True,
) -> dict[str, dict[str, Any]]:
    """VOC precision-recall curves of ``detections`` on ``dataset`` (the evaluator's own arrays, same
    ground truth as evaluate_detection_dataset) plotted into ``out_png``; returns the curves."""
    curves = voc_pr_curves(
        detections,
        dataset_ground_truth(dataset),
        dataset_class_names(dataset),
        iou_thresh=iou_thresh,
        use_07_metric=use_07_metric,
    )
    rule = "VOC07 11-point" if use_07_metric else "area under the precision envelope"
    plot_pr_curves(curves, out_png, title=f"VOC precision-recall at IoU {iou_thresh:g} (AP: {rule})")
    return curves
