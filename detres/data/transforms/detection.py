"""Detection data transforms: Faster R-CNN shorter-side resize and horizontal flip (albumentations).

A detection transform is a callable ``sample -> sample`` working on the *numpy* form of a sample
that the detection datasets build before converting to tensors::

    {"image": uint8 [H, W, 3] RGB, "boxes": float32 [N, 4] xyxy, "labels": int64 [N],
     "difficult": bool [N], "crowd_boxes": float32 [C, 4] xyxy (optional), "scale": float,
     "scale_xy": (sx, sy), ...other keys passed through}

``crowd_boxes`` are regions (COCO ``iscrowd``) that are not targets but whose anchors and proposals
training ignores; they are resized and flipped exactly like ``boxes``.

``scale`` is the resize factor the image went through (resized / original, 1.0 when untouched).
Because the resized height and width are rounded to whole pixels, the factor that really maps
x (or y) coordinates is ``scale_xy = (W_new / W, H_new / H)``; it differs from ``scale`` by less
than half a pixel over the image, so ``boxes / scale`` is a close inverse and
``boxes / [sx, sy, sx, sy]`` the exact one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from detres.data.image_io import read_image_rgb

__all__ = [
    "faster_rcnn_scale",
    "FasterRCNNResize",
    "DetectionTransform",
    "build_det_transforms",
    "sample_to_tensors",
    "finalize_sample",
    "load_sample",
]


def _as_size_tuple(min_size: int | Sequence[int], name: str = "min_size") -> tuple[int, ...]:
    sizes = (min_size,) if isinstance(min_size, (int, np.integer)) else tuple(min_size)
    if len(sizes) == 0 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in sizes):
        raise ValueError(f"{name}: expected a positive int or a non-empty sequence of positive ints, got {min_size!r}")
    return tuple(int(s) for s in sizes)


def faster_rcnn_scale(height: int, width: int, min_size: float, max_size: float | None) -> float:
    """Scale that makes the shorter side ``min_size`` unless the longer side would exceed ``max_size`` (the one
    resize rule of the data pipeline and the detector's test scale; TorchScript-compatible)."""
    scale = min_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


class FasterRCNNResize(A.SmallestMaxSize):
    """Resize so the shorter side is ``min_size`` (one drawn at random if several) with the longer side
    capped at ``max_size``, keeping the aspect ratio (the Faster R-CNN / ResNet-paper test scale rule).

    A subclass of ``A.SmallestMaxSize`` so albumentations does the image resize (cv2, rounded sizes) and
    the box bookkeeping; only the choice of scale differs. The random draw uses the transform's own
    albumentations RNG, so ``A.Compose(seed=...)`` makes it reproducible.
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 600,
        max_size: int | None = 1000,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ):
        sizes = _as_size_tuple(min_size)
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size: expected a positive int or None, got {max_size!r}")
        # The parent's max_size means "shorter side"; it is only stored there, our override decides.
        super().__init__(max_size=list(sizes), interpolation=interpolation, p=p)
        self.min_sizes = sizes
        self.longer_side_max = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.min_sizes[0] if len(self.min_sizes) == 1 else self.py_random.choice(self.min_sizes)
        return {"scale": faster_rcnn_scale(height, width, short, self.longer_side_max)}


def _check_boxes_np(boxes: np.ndarray, hw: tuple[int, int], where: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN or inf: {boxes[~np.isfinite(boxes).all(axis=1)].tolist()}")
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        raise ValueError(
            f"{where}: boxes with zero or negative width/height (datasets drop these): {boxes[bad].tolist()}"
        )
    h, w = hw
    # Datasets clip to the image; allow float32 rounding slack, then clip exactly.
    slack = 1e-3 * max(h, w)
    outside = (boxes[:, 0] < -slack) | (boxes[:, 1] < -slack) | (boxes[:, 2] > w + slack) | (boxes[:, 3] > h + slack)
    if outside.any():
        raise ValueError(f"{where}: boxes outside the {w}x{h} image: {boxes[outside].tolist()}")
    return np.clip(boxes, 0.0, np.array([w, h, w, h], dtype=np.float32))


class DetectionTransform:
    """Resize (Faster R-CNN rule) + optional horizontal flip of a numpy detection sample.

    Args:
        min_size: target shorter side; a tuple means one is drawn per image (multi-scale training).
        max_size: cap on the longer side after resizing (None = no cap).
        flip_prob: probability of a horizontal flip (x1' = W - x2, x2' = W - x1).
        seed: seed of the albumentations RNG (None = random). Inside a DataLoader worker the RNG is
            reseeded from the worker's torch seed, so workers do not repeat each other's augmentations.
        interpolation: cv2 interpolation flag for the image resize.
    """

    def __init__(
        self,
        *,
        min_size: int | Sequence[int] = 600,
        max_size: int | None = 1000,
        flip_prob: float = 0.0,
        seed: int | None = None,
        interpolation: int = cv2.INTER_LINEAR,
    ):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob: expected a probability in [0, 1], got {flip_prob!r}")
        self.min_size = _as_size_tuple(min_size)
        self.max_size = max_size
        self.flip_prob = float(flip_prob)
        self.seed = seed
        ops: list[A.BasicTransform] = [FasterRCNNResize(self.min_size, max_size, interpolation=interpolation)]
        if flip_prob > 0:
            ops.append(A.HorizontalFlip(p=flip_prob))
        # "pascal_voc" is albumentations' name for absolute xyxy; "box_index" rides along so labels,
        # difficult flags and any other per-box field stay aligned even if a box were filtered out.
        self._compose = A.Compose(
            ops,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_index"], clip=True),
            save_applied_params=True,
            seed=seed,
        )
        self._worker_seeded: tuple[int, int] | None = None
        self._seeded_per_sample = False

    def set_random_seed(self, seed: int) -> None:
        """Reseed the draws (scale choice, flip) for the next sample; from then on the caller seeds every
        sample (e.g. from (run seed, iteration, image)) and the per-worker reseeding is off."""
        self._compose.set_random_seed(int(seed) % 2**32)
        self._seeded_per_sample = True

    def _reseed_for_worker(self) -> None:
        info = get_worker_info()
        if info is None or self._seeded_per_sample:
            return
        key = (info.id, info.seed)
        if key != self._worker_seeded:
            self._compose.set_random_seed((info.seed + (self.seed or 0)) % 2**32)
            self._worker_seeded = key

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        where = f"sample '{sample.get('file_name', '?')}'"
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(
                f"{where}: 'image' must be a numpy HxWx3 array (transform before tensor conversion), got {got}"
            )
        h0, w0 = image.shape[:2]
        boxes = _check_boxes_np(sample["boxes"], (h0, w0), where)
        has_crowd = sample.get("crowd_boxes") is not None
        crowd = _check_boxes_np(sample["crowd_boxes"], (h0, w0), f"{where} (crowd_boxes)") if has_crowd else None
        n = len(boxes)
        # Crowd boxes go through the same ops after the gt boxes; box_index >= n marks them.
        all_boxes = np.concatenate([boxes, crowd]) if has_crowd else boxes
        self._reseed_for_worker()
        out = self._compose(image=image, bboxes=all_boxes, box_index=np.arange(len(all_boxes)))

        new_img = out["image"]
        h1, w1 = new_img.shape[:2]
        index = np.asarray(out["box_index"], dtype=np.int64).reshape(-1)
        all_new = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        all_new = np.clip(all_new, 0.0, np.array([w1, h1, w1, h1], dtype=np.float32))
        is_gt = index < n
        keep = index[is_gt]
        new_boxes = all_new[is_gt]
        scale = next(p["scale"] for name, p in out["applied_transforms"] if name == FasterRCNNResize.__name__)

        result = dict(sample)
        result["image"] = new_img
        result["boxes"] = new_boxes
        if has_crowd:
            result["crowd_boxes"] = all_new[~is_gt]
        for key in ("labels", "difficult"):
            if key in sample:
                result[key] = np.asarray(sample[key])[keep]
        result["scale"] = float(sample.get("scale", 1.0)) * float(scale)
        sx, sy = sample.get("scale_xy", (1.0, 1.0))
        result["scale_xy"] = (float(sx) * w1 / w0, float(sy) * h1 / h0)
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size}, "
            f"flip_prob={self.flip_prob}, seed={self.seed})"
        )


def build_det_transforms(
    *,
    train: bool,
    min_size: int | Sequence[int] = 600,
    max_size: int | None = 1000,
    flip_prob: float = 0.5,
    seed: int | None = None,
) -> DetectionTransform:
    """The detection pipeline: shorter side ``min_size`` (capped by ``max_size``), flip when training.

    Several ``min_size`` values are a per-image random choice and only make sense for training;
    testing at several scales is the job of the multi-scale inference code, so ``train=False`` with
    more than one size raises ValueError.
    """
    sizes = _as_size_tuple(min_size)
    if not train and len(sizes) > 1:
        raise ValueError(f"min_size: test-time transforms take one size, got {tuple(sizes)}")
    return DetectionTransform(min_size=sizes, max_size=max_size, flip_prob=flip_prob if train else 0.0, seed=seed)


def sample_to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Convert a numpy sample to the contract's tensors: image float32 [3, H, W] in 0..255,
    boxes float32 [N, 4], labels int64 [N], difficult bool [N], crowd_boxes float32 [C, 4] ([0, 4] when
    the sample has none, e.g. VOC). Tensor inputs are accepted as they are."""
    out = dict(sample)
    image = sample["image"]
    where = f"sample '{sample.get('file_name', '?')}'"
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: image must be HxWx3, got shape {image.shape}")
        out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32)
    elif isinstance(image, torch.Tensor):
        out["image"] = image.to(torch.float32)
    else:
        raise ValueError(f"{where}: image must be a numpy array or tensor, got {type(image).__name__}")
    out["boxes"] = torch.as_tensor(np.asarray(sample["boxes"], dtype=np.float32)).reshape(-1, 4)
    n = out["boxes"].shape[0]
    out["labels"] = torch.as_tensor(np.asarray(sample["labels"], dtype=np.int64)).reshape(n)
    difficult = sample.get("difficult")
    difficult = np.zeros(n, dtype=bool) if difficult is None else np.asarray(difficult, dtype=bool)
    out["difficult"] = torch.as_tensor(difficult).reshape(n)
    crowd = sample.get("crowd_boxes")
    crowd = np.zeros((0, 4), dtype=np.float32) if crowd is None else np.asarray(crowd, dtype=np.float32)
    out["crowd_boxes"] = torch.as_tensor(crowd).reshape(-1, 4)
    out["scale"] = float(sample.get("scale", 1.0))
    sx, sy = sample.get("scale_xy", (out["scale"], out["scale"]))
    out["scale_xy"] = (float(sx), float(sy))
    return out


def load_sample(sample: dict[str, Any], transforms: Any | None, *, annotation_source: Any) -> dict[str, Any]:
    """Read the image of an annotation-only sample, check its size against ``annotation_source``'s
    record of it, then transform and convert to tensors (the shared tail of every detection dataset)."""
    image = read_image_rgb(sample["file_name"])
    if image.shape[:2] != tuple(sample["orig_size"]):
        h, w = sample["orig_size"]
        raise ValueError(
            f"image '{sample['file_name']}' is {image.shape[1]}x{image.shape[0]} but '{annotation_source}' says {w}x{h}"
        )
    sample.update(image=image, scale=1.0, scale_xy=(1.0, 1.0))
    return finalize_sample(sample, transforms)


def finalize_sample(sample: dict[str, Any], transforms: Any | None) -> dict[str, Any]:
    """Apply ``transforms`` (if any) to a numpy sample, then convert it to the contract's tensors."""
    if transforms is not None:
        sample = transforms(sample)
        if not isinstance(sample, dict):
            raise TypeError(f"transforms must return the sample dict, got {type(sample).__name__} from {transforms!r}")
    return sample_to_tensors(sample)
