"""Tests for detres.engine.plots' PR curves: plotted points are the evaluator's, their area is the reported AP."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from detres.data.image_io import read_image_rgb
from detres.engine.plots import plot_pr_curves, pr_curves_figure, save_pr_curves
from detres.evaluation.voc import evaluate_voc_detections, voc_ap

NAMES = ["cat", "dog", "owl"]


class TinyDataset:
    """Two images with annotations only (what evaluation and save_pr_curves read)."""

    categories = [{"id": k + 1, "name": name} for k, name in enumerate(NAMES)]
    _anns = [
        {"image_id": 1, "boxes": np.array([[0, 0, 10, 10], [30, 30, 50, 50]], np.float32), "labels": np.array([1, 2])},
        {"image_id": 2, "boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 1])},
    ]

    def __len__(self) -> int:
        return len(self._anns)

    def annotation(self, index: int) -> dict:
        ann = self._anns[index]
        return dict(
            ann, difficult=np.zeros(len(ann["labels"]), bool), orig_size=(100, 100), file_name=f"{ann['image_id']}.png"
        )


DETECTIONS = [
    {
        "image_id": 1,
        "boxes": np.array([[0, 0, 10, 10], [31, 30, 50, 50], [60, 60, 70, 70]], float),
        "scores": np.array([0.9, 0.4, 0.85]),
        "labels": np.array([1, 2, 1]),
    },
    {
        "image_id": 2,
        "boxes": np.array([[1, 0, 10, 10], [40, 40, 45, 45]], float),
        "scores": np.array([0.7, 0.95]),
        "labels": np.array([1, 1]),
    },
]


def _ground_truth() -> dict:
    ds = TinyDataset()
    return {
        a["image_id"]: {k: a[k] for k in ("boxes", "labels", "difficult")}
        for a in (ds.annotation(i) for i in range(len(ds)))
    }


@pytest.mark.filterwarnings("ignore:VOC evaluation. no non-difficult ground truth")
@pytest.mark.parametrize("use_07_metric", [True, False])
def test_plotted_curves_have_the_reported_ap_by_the_evaluator_rule(tmp_path, use_07_metric):
    reported = evaluate_voc_detections(DETECTIONS, _ground_truth(), NAMES, use_07_metric=use_07_metric)["per_class"]
    curves = save_pr_curves(TinyDataset(), DETECTIONS, tmp_path / "pr.png", use_07_metric=use_07_metric)
    fig = pr_curves_figure(curves)
    lines = {line.get_label().split(" (")[0]: line for line in fig.axes[0].get_lines()}
    # By hand. cat: 3 positives; by score FP (0.95: no overlap), TP (0.9), FP (0.85), TP (0.7: IoU 0.9), so
    # precision 1/2 up to recall 2/3 and none beyond: 11-point AP 7 * 0.5 / 11 = 7/22, area AP 2/3 * 0.5 = 1/3.
    # dog: its one detection hits its one object (IoU 0.95). owl: no positives, AP undefined.
    assert reported["cat"] == pytest.approx(7 / 22 if use_07_metric else 1 / 3, abs=1e-12)
    assert reported["dog"] == pytest.approx(1.0) and math.isnan(reported["owl"])
    for name in ("cat", "dog"):
        recall, precision = lines[name].get_xdata(), lines[name].get_ydata()
        assert voc_ap(recall, precision, use_07_metric) == reported[name]
        assert f"AP {100 * reported[name]:.1f}%" in lines[name].get_label()
    assert lines["owl"].get_label() == "owl (no positives)" and len(lines["owl"].get_xdata()) == 0
    # The figure's legend lists every class.
    assert [t.get_text().split(" (")[0] for t in fig.axes[0].get_legend().get_texts()] == NAMES
    plt.close(fig)


def test_pr_png_is_written(tmp_path):
    curves = {"cat": {"recall": np.array([0.5, 1.0]), "precision": np.array([1.0, 0.5]), "ap": 0.75}}
    plot_pr_curves(curves, tmp_path / "sub" / "pr.png", title="t")
    png = read_image_rgb(tmp_path / "sub" / "pr.png")
    assert png.shape == (600, 900, 3)  # a 9 x 6 inch figure at 100 dpi
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["pr.png"]  # atomic write left no debris
