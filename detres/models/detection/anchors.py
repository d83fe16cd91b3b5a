"""Translation-invariant anchor boxes on one stride-16 feature map (the C4 map of Faster R-CNN)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from detres.structures.boxes import check_image_hw

__all__ = ["AnchorGenerator"]


class AnchorGenerator(nn.Module):
    """Anchors of every (aspect ratio, size) pair at every feature-map cell.

    Conventions (torchvision's, so results match ``torchvision.models.detection.AnchorGenerator``):
    * aspect ratio = height / width; an anchor of size s and ratio r has h = s*sqrt(r), w = s/sqrt(r),
      so its area is s**2 up to the rounding below;
    * cell anchors are centred at (0, 0) with corners rounded to whole pixels; the anchor of cell
      (y, x) is shifted by ((x + offset) * stride, (y + offset) * stride). ``offset=0`` is torchvision's
      convention; ``offset=0.5`` puts centres at stride/2 + k*stride, the centre (7.5 in 1-based
      inclusive pixels = 8.0 continuous) of Ren et al.'s original generate_anchors for stride 16;
    * order of the cell anchors: ratio-major, then size (torchvision's);
    * order of the output: (y, x, anchor), i.e. row k = (y * W + x) * A + a, which is what
      ``RPNHead`` outputs give after permuting [B, A, H, W] -> [B, H, W, A].
    """

    def __init__(
        self,
        sizes: Sequence[float],
        aspect_ratios: Sequence[float],
        stride: int,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if len(sizes) == 0 or any(float(s) <= 0 for s in sizes):
            raise ValueError(f"AnchorGenerator: sizes must be a non-empty list of positive numbers, got {sizes!r}")
        if len(aspect_ratios) == 0 or any(float(r) <= 0 for r in aspect_ratios):
            raise ValueError(
                f"AnchorGenerator: aspect_ratios must be a non-empty list of positive numbers, got {aspect_ratios!r}"
            )
        if int(stride) <= 0:
            raise ValueError(f"AnchorGenerator: stride must be a positive integer, got {stride!r}")
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.stride = int(stride)
        self.offset = float(offset)
        # A buffer follows the module across .to(device); not persistent, since it is derived from kwargs.
        self.register_buffer("_cell_anchors", self._make_cell_anchors(), persistent=False)

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], *, stride: int) -> AnchorGenerator:
        """Anchors of a ``model`` config tree (``anchor_sizes``, ``aspect_ratios``) on a map of ``stride``."""
        return cls(
            sizes=[float(s) for s in model_cfg["anchor_sizes"]],
            aspect_ratios=[float(r) for r in model_cfg["aspect_ratios"]],
            stride=int(stride),
        )

    def _make_cell_anchors(self) -> Tensor:
        rows = []
        for ratio in self.aspect_ratios:
            for size in self.sizes:
                h = size * math.sqrt(ratio)
                w = size / math.sqrt(ratio)
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=torch.float32).round()

    def num_anchors_per_location(self) -> int:
        """A = len(sizes) * len(aspect_ratios)."""
        return len(self.sizes) * len(self.aspect_ratios)

    def cell_anchors(self) -> Tensor:
        """[A, 4] anchors of one cell, centred at (0, 0)."""
        return self._cell_anchors

    def forward(
        self,
        feature_hw: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors [H * W * A, 4] (xyxy, input-image pixels) for a feature map of size ``feature_hw``.

        ``device`` defaults to the device of this module's buffers.
        """
        height, width = check_image_hw(feature_hw, "AnchorGenerator: feature_hw")  # traced sizes stay traced
        device = self._cell_anchors.device if device is None else torch.device(device)
        cell = self._cell_anchors.to(device=device, dtype=dtype)
        shift_x = (torch.arange(width, device=device, dtype=dtype) + self.offset) * self.stride
        shift_y = (torch.arange(height, device=device, dtype=dtype) + self.offset) * self.stride
        grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + cell[None]).reshape(-1, 4)
