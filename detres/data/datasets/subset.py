"""The first images of a detection dataset as a dataset the detection evaluation accepts (Subset + metadata)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Subset

__all__ = ["DetectionSubset", "first_images"]

# Per-image methods of the detection datasets that take an index (forwarded with the index mapped).
_INDEXED = ("annotation", "evaluation_ground_truth", "image_hw", "image_path")


class DetectionSubset(Subset):
    """``torch.utils.data.Subset`` that also forwards what evaluation reads: ``categories``,
    ``label_to_category_id``, ``image_ids`` and the per-image methods (``annotation``, ...) with the index
    mapped, so scoring a subset uses the ground truth of exactly its images."""

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.dataset, name)  # categories, label_to_category_id, image_ids (VOC ids by index)
        if name not in _INDEXED:
            return attr
        return lambda index: attr(self.indices[index])


def first_images(dataset: Any, count: int | None) -> Any:
    """``dataset`` itself, or a :class:`DetectionSubset` of its first ``count`` images when that is fewer."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise ValueError(f"the number of images must be >= 1, got {count}")
    return DetectionSubset(dataset, range(count))
