"""Faster R-CNN box regression parameterisation (dx, dy, dw, dh) between boxes and reference boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder", "decode_deltas"]


def _widths_heights_centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Continuous coordinates: width = x2 - x1 (no +1), centre = x1 + w/2.
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return widths, heights, boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights


def decode_deltas(deltas: Tensor, boxes: Tensor, weights: list[float], clip: float) -> Tensor:
    """deltas [N,4C] applied to boxes [N,4] (both in the output dtype) -> [N,C,4] ([N,4] when C == 1), unclipped.
    Plain tensor ops so that TorchScript compiles it (the exported detector decodes with this same function)."""
    num_classes = deltas.shape[1] // 4
    d = deltas.reshape(-1, num_classes, 4)
    widths = (boxes[:, 2] - boxes[:, 0])[:, None]  # continuous coordinates: width = x2 - x1 (no +1)
    heights = (boxes[:, 3] - boxes[:, 1])[:, None]
    cx = boxes[:, 0:1] + 0.5 * widths
    cy = boxes[:, 1:2] + 0.5 * heights
    dx = d[:, :, 0] / weights[0]
    dy = d[:, :, 1] / weights[1]
    dw = (d[:, :, 2] / weights[2]).clamp(max=clip)
    dh = (d[:, :, 3] / weights[3]).clamp(max=clip)
    pred_cx = dx * widths + cx
    pred_cy = dy * heights + cy
    half_w = 0.5 * torch.exp(dw) * widths
    half_h = 0.5 * torch.exp(dh) * heights
    pred = torch.stack((pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h), dim=-1)
    return pred[:, 0] if num_classes == 1 else pred


class BoxCoder:
    """Encode target boxes relative to reference boxes and decode regression outputs back to boxes.

    encode:  dx = wx (gx - px) / pw,  dy = wy (gy - py) / ph,  dw = ww log(gw / pw),  dh = wh log(gh / ph)
    decode:  the inverse, with dw/wd and dh/wh clamped at ``bbox_xform_clip`` so exp() cannot overflow.
    RPN uses weights (1, 1, 1, 1); the R-CNN head uses (10, 10, 5, 5).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(float(w) <= 0 for w in weights):
            raise ValueError(f"BoxCoder weights: expected 4 positive numbers, got {tuple(weights)!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    @staticmethod
    def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
        if a.ndim != 2 or a.shape[1] != 4:
            raise ValueError(f"BoxCoder: {name_a} must have shape [N, 4], got {tuple(a.shape)}")
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"BoxCoder: {name_b} must have shape [N, 4], got {tuple(b.shape)}")
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"BoxCoder: {name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}"
            )

    def encode(self, gt_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Regression targets [N, 4] that move ``proposals[i]`` onto ``gt_boxes[i]``.

        Both boxes must have positive width and height (log and division), as anchors and
        filtered proposals do.
        """
        self._check_pair(gt_boxes, proposals, "gt_boxes", "proposals")
        wx, wy, ww, wh = self.weights
        pw, ph, px, py = _widths_heights_centres(proposals.float())
        gw, gh, gx, gy = _widths_heights_centres(gt_boxes.float())
        dx = wx * (gx - px) / pw
        dy = wy * (gy - py) / ph
        dw = ww * torch.log(gw / pw)
        dh = wh * torch.log(gh / ph)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` to reference ``boxes`` [N, 4].

        deltas [N, 4]      -> boxes [N, 4]
        deltas [N, 4 * C]  -> boxes [N, C, 4]  (class-specific regression, class-major layout) for C > 1.
        Output is float32 (or the input's float dtype if wider) and not clipped to the image.
        """
        if deltas.ndim != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[1] == 0:
            raise ValueError(f"BoxCoder.decode: deltas must have shape [N, 4*C], got {tuple(deltas.shape)}")
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != deltas.shape[0]:
            raise ValueError(f"BoxCoder.decode: boxes must have shape [{deltas.shape[0]}, 4], got {tuple(boxes.shape)}")
        dtype = torch.promote_types(deltas.dtype, torch.float32)
        return decode_deltas(deltas.to(dtype), boxes.to(dtype), list(self.weights), float(self.bbox_xform_clip))
