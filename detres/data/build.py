"""Config → detection datasets (COCO JSON or PASCAL VOC folders): training sets with the Faster R-CNN
augmentation, evaluation sets at the images' original size."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from detres.data.bad_samples import BadSamples
from detres.data.datasets.coco import CocoDetection
from detres.data.datasets.voc import VocDetection
from detres.data.transforms.detection import build_det_transforms


def build_detection_dataset(
    cfg: Any, split: str, *, train: bool, class_names: list[str] | None = None, bad_samples: BadSamples | None = None
) -> Dataset:
    """The ``split`` ("train" or "val") set of ``cfg.data``; ``train`` picks augmentation and targets.

    COCO: ``<split>_images`` is the image folder and ``<split>_ann`` the instances JSON.
    VOC: ``<split>_images`` is the dataset root and ``<split>_ann`` the ImageSets/Main list name.
    Training sets leave out crowd boxes (COCO) and difficult objects (VOC, unless
    ``data.use_difficult_in_training``); evaluation sets keep difficult objects flagged and yield the images at
    their original size (the detector resizes them to its test scale itself). Bad samples follow
    ``bad_samples`` (default: the ``data.on_bad_sample`` policy) and stay listed in the dataset's ``bad_samples``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data, inp = cfg.data, cfg.input
    transforms = None
    if train:
        transforms = build_det_transforms(
            train=True,
            min_size=tuple(inp.min_size_train),
            max_size=inp.max_size_train,
            flip_prob=inp.flip_prob,
            seed=cfg.seed,
        )
    images, ann = data[f"{split}_images"], data[f"{split}_ann"]
    bad = bad_samples if bad_samples is not None else BadSamples.from_config(cfg)
    if data.format == "coco":
        return CocoDetection(images, ann, transforms=transforms, skip_crowd=True, bad_samples=bad)
    if data.format == "voc":
        names = class_names or (list(data.class_names) if data.class_names else None)
        keep_difficult = (not train) or data.use_difficult_in_training
        return VocDetection(
            images, ann, class_names=names, transforms=transforms, keep_difficult=keep_difficult, bad_samples=bad
        )
    raise ValueError(f"data.format must be 'coco' or 'voc', got {data.format!r}")


def dataset_class_names(dataset: Any) -> list[str]:
    """Class names in contiguous-label order (label l is names[l - 1])."""
    return [str(c["name"]) for c in dataset.categories]


def dataset_label_to_category_id(dataset: Any) -> dict[int, int]:
    """Contiguous label → the dataset's own category id (COCO ids; VOC uses the label itself)."""
    mapping = getattr(dataset, "label_to_category_id", None)
    if mapping is not None:
        return {int(k): int(v) for k, v in mapping.items()}
    return {int(c["id"]): int(c["id"]) for c in dataset.categories}
