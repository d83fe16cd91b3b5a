"""Testing the RPN-stage localizer (Appendix C, Table 13): per-class best boxes, 1-crop / dense, GT or predicted
classes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detres.config.load import Config
from detres.data.datasets.localization import LocRecord, devkit_ground_truth
from detres.data.image_io import read_image_rgb
from detres.data.transforms.classification import center_crop, resize_shorter_side
from detres.data.transforms.localization import LocTestTransform
from detres.engine.loc_data import synset_words
from detres.evaluation.classification import dense_probs, feature_window
from detres.evaluation.localization import devkit_box, evaluate_localization, write_loc_predictions
from detres.utils.atomic import write_json_atomic

__all__ = [
    "BOX_MODES",
    "classifier_label_map",
    "format_table",
    "localize",
    "predict_classes",
    "test_from_config",
    "test_localizer",
]

BOX_MODES = ("best", "average")
Found = dict[str, dict[int, tuple[np.ndarray, float]]]  # image id -> class -> (original-pixel box, score)


def _pick_box(boxes: torch.Tensor, scores: torch.Tensor, box_mode: str, average_top: int) -> tuple[np.ndarray, float]:
    """The class's answer: its best box, or the score-weighted mean of its ``average_top`` best boxes."""
    if box_mode == "best" or boxes.shape[0] == 1:
        return boxes[0].numpy().astype(np.float64), float(scores[0])
    w = scores[: int(average_top)].double()
    return ((boxes[: int(average_top)].double() * w[:, None]).sum(0) / w.sum()).numpy(), float(scores[0])


def localize(
    model: torch.nn.Module,
    records: Sequence[LocRecord],
    classes: Mapping[str, Sequence[int]],
    *,
    mode: str,
    scales: Sequence[int],
    crop: int,
    top_n: int = 200,
    nms_thresh: float = 0.7,
    box_mode: str = "best",
    average_top: int = 10,
) -> Found:
    """For each image and each of its ``classes``: the box (original pixels, 0-based xyxy) and its score.

    ``mode`` "dense": the whole image at every shorter side of ``scales``, the best-scoring box over scales;
    "1crop": the centre ``crop``² of the image at ``scales[0]``. ``box_mode`` "average" averages the class's
    ``average_top`` highest-scoring regressed anchors (without NMS), weighted by score.
    """
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}")
    views = [LocTestTransform(mode=mode, scale=s, crop=crop) for s in (scales if mode == "dense" else scales[:1])]
    device = next(model.parameters()).device
    nms = 1.0 if box_mode == "average" else nms_thresh  # averaging wants the raw ranking, not NMS survivors
    found: Found = {}
    for record in records:
        image = read_image_rgb(record.path)
        h, w = image.shape[:2]
        best: dict[int, tuple[np.ndarray, float]] = {}
        for transform in views:
            pixels, view = transform(image)
            tensor = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(device)
            # an R-CNN stage crops its regions from the image at its own resolution, not from the view
            source = {"source": (image, view)} if getattr(model, "wants_source_image", False) else {}
            for c, (boxes, scores) in model.class_boxes(
                tensor, classes[record.image_id], top_n=top_n, nms_thresh=nms, **source
            ).items():
                box, score = _pick_box(boxes.cpu(), scores.cpu(), box_mode, average_top)
                if c not in best or score > best[c][1]:
                    best[c] = (view.to_original(box[None], w, h)[0], score)
        found[record.image_id] = best
    return found


def _guess_box(box: np.ndarray) -> tuple[float, float, float, float]:
    """0-based continuous box -> devkit box, at least one pixel wide and high (the metric refuses xmax < xmin)."""
    x0, y0, x1, y1 = devkit_box(box)
    return round(x0, 2), round(y0, 2), round(max(x1, x0), 2), round(max(y1, y0), 2)


def _guesses(found: Found, classes: Mapping[str, Sequence[int]]) -> dict[str, list[tuple[int, tuple]]]:
    return {i: [(int(c), _guess_box(found[i][c][0])) for c in classes[i]] for i in found}


def classifier_label_map(class_names: Sequence[str], synsets: Sequence[str], words: Mapping[str, str]) -> list[int]:
    """Classifier output k -> synset label (1..K): its class name is a wnid, or the wnid's words (first one)."""
    by_name = {w: k for k, w in enumerate(synsets, start=1)}
    for wnid, text in words.items():
        if wnid in by_name:
            by_name.setdefault(text, by_name[wnid])
            by_name.setdefault(text.split(",")[0].strip(), by_name[wnid])
    unknown = [n for n in class_names if n not in by_name]
    if unknown:
        raise ValueError(f"classifier classes {unknown[:5]} are neither wnids nor names of the synset list")
    return [by_name[n] for n in class_names]


@torch.no_grad()
def predict_classes(
    loaded: Any, records: Sequence[LocRecord], label_map: Sequence[int], *, mode: str = "1crop", top_k: int = 5
) -> dict[str, list[int]]:
    """Top-k synset labels per image from a train_cls classifier (a ``LoadedClassifier``): its 1-crop test
    (per-pixel mean) or its dense multi-scale test (average of the softmax over windows and scales)."""
    from detres.engine.cls_eval import build_normalize, default_geometry

    geometry = default_geometry(loaded)
    model = loaded.model.eval()
    normalize = build_normalize(loaded, "auto", dense=mode == "dense")
    window = feature_window(model, geometry["train_crop"]) if mode == "dense" else None
    out: dict[str, list[int]] = {}
    for record in records:
        image = read_image_rgb(record.path)
        if mode == "dense":
            probs = sum(
                dense_probs(model, _chw(normalize(resize_shorter_side(image, s).astype(np.float32))), window)
                for s in geometry["scales"]
            )
        else:
            view = center_crop(resize_shorter_side(image, geometry["resize"]), geometry["crop"]).astype(np.float32)
            probs = model(_chw(normalize(view))).softmax(1)
        top = probs[0].topk(min(top_k, probs.shape[1])).indices.tolist()
        out[record.image_id] = [label_map[k] for k in top]
    return out


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def test_localizer(
    model: torch.nn.Module,
    records: Sequence[LocRecord],
    *,
    crop: int,
    scale: int,
    scales: Sequence[int] = (),
    modes: Sequence[str] = ("1crop", "dense"),
    predicted: Mapping[str, Sequence[int]] | None = None,
    out_dir: str | Path | None = None,
    row_prefix: str = "rpn",
    **box_options: Any,
) -> dict[str, Any]:
    """Table 13's RPN rows: LOC error on the ground-truth class for each of ``modes`` and, with ``predicted``
    (image id -> top-5 labels), top-1/top-5 LOC error of dense testing on the predicted classes.

    Writes ``<out_dir>/<row>.txt`` (devkit prediction files, image order of ``records``) and ``loc_test.json``.
    ``row_prefix`` names the rows ("rpn_rcnn" when ``model`` is the RPN + R-CNN pair).
    """
    model.eval()
    gt = devkit_ground_truth(list(records))
    ids = [r.image_id for r in records]
    gt_classes = {r.image_id: list(dict.fromkeys(r.labels)) for r in records}
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        wanted = gt_classes
        if mode == "dense" and predicted is not None:
            wanted = {i: list(dict.fromkeys([*gt_classes[i], *predicted[i]])) for i in ids}
        started = time.process_time()
        # 1-crop is the centre crop of the image at ``scale``; dense may use several scales
        views = (list(scales) or [scale]) if mode == "dense" else [scale]
        found = localize(model, records, wanted, mode=mode, scales=views, crop=crop, **box_options)
        seconds = round(time.process_time() - started, 1)
        guesses = _guesses(found, gt_classes)
        rows[f"{row_prefix}_{mode}_gt_class"] = dict(
            evaluate_localization(gt, guesses, image_ids=ids), cpu_s=seconds, predictions=guesses
        )
        if mode == "dense" and predicted is not None:
            top5 = {i: list(predicted[i])[:5] for i in ids}
            guesses = _guesses(found, top5)
            rows[f"{row_prefix}_dense_predicted"] = dict(
                evaluate_localization(gt, guesses, image_ids=ids), cpu_s=seconds, predictions=guesses
            )
    if out_dir is not None:
        out = Path(out_dir)
        for name, row in rows.items():
            row["predictions_file"] = str(write_loc_predictions(out / f"{name}.txt", ids, row["predictions"]))
    for row in rows.values():
        row.pop("predictions")
    report = {"rows": rows, "num_images": len(ids), "box_baseline": whole_image_baseline(records)}
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "loc_test.json", report)
    return report


def whole_image_baseline(records: Sequence[LocRecord]) -> float:
    """GT-class LOC error of answering the whole image as the box (what a localizer must beat)."""
    gt = devkit_ground_truth(list(records))
    guesses = {}
    for r in records:
        h, w = read_image_rgb(r.path).shape[:2]
        guesses[r.image_id] = [(int(c), (1.0, 1.0, float(w), float(h))) for c in dict.fromkeys(r.labels)]
    return float(evaluate_localization(gt, guesses)["gt_known_loc_err"])


ROW_TITLES = {
    "rpn_1crop_gt_class": "RPN 1-crop, ground-truth class",
    "rpn_dense_gt_class": "RPN dense, ground-truth class",
    "rpn_dense_predicted": "RPN dense, predicted classes",
    "rpn_rcnn_1crop_gt_class": "RPN+R-CNN 1-crop, GT class",
    "rpn_rcnn_dense_gt_class": "RPN+R-CNN dense, GT class",
    "rpn_rcnn_dense_predicted": "RPN+R-CNN dense, predicted classes",
}


def format_table(report: Mapping[str, Any]) -> str:
    """Table-13-style text: per row the GT-class LOC error, top-1 and top-5 LOC error (percent) and the row's test CPU
    seconds; then the whole-image-box baseline and the classifier's own errors (when classes were predicted)."""
    lines = [f"{'method':34s} {'GT-class LOC err':>16s} {'top-1 LOC err':>14s} {'top-5 LOC err':>14s} {'CPU s':>8s}"]
    classifier = None
    for name, row in report["rows"].items():
        predicted = name.endswith("predicted")
        classifier = row if predicted else classifier
        cells = [
            "-" if predicted else f"{100 * row['gt_known_loc_err']:.2f}",
            f"{100 * row['top1_loc_err']:.2f}" if predicted else "-",
            f"{100 * row['top5_loc_err']:.2f}" if predicted else "-",
            f"{row.get('cpu_s', float('nan')):.1f}",
        ]
        lines.append(f"{ROW_TITLES.get(name, name):34s} {cells[0]:>16s} {cells[1]:>14s} {cells[2]:>14s} {cells[3]:>8s}")
    lines.append(
        f"{'whole-image box, ground-truth class':34s} {100 * report['box_baseline']:>16.2f} "
        f"{'-':>14s} {'-':>14s}   ({report['num_images']} images)"
    )
    if classifier is not None:
        lines.append(
            f"classifier: top-1 / top-5 classification error {100 * classifier['top1_cls_err']:.2f} / "
            f"{100 * classifier['top5_cls_err']:.2f} %"
        )
    return "\n".join(lines)


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
