"""The RPN's layers (Ren et al. 2015): a 3x3 conv, then sibling 1x1 convs scoring and regressing every anchor."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RPNHead"]


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 convs: objectness logits and box deltas for every anchor.

    With ``num_classes`` = 1 (Faster R-CNN) the cls layer has A outputs (sigmoid) and the reg layer 4A.
    With ``num_classes`` = K (the per-class RPN of the ResNet paper's Appendix C) both are in per-class
    form: A*K binary logistic outputs and A*K*4 deltas. Channels are anchor-major, then class, then
    coordinate: cls channel a*K + k, reg channel (a*K + k)*4 + j (j = dx, dy, dw, dh); with K = 1 this
    is Ren et al.'s layout, so K = 1 checkpoints are unchanged.

    forward(x [B, C, H, W]) -> (logits [B, A*K, H, W], deltas [B, 4*A*K, H, W]); :meth:`flatten` turns
    them into per-anchor rows.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, conv_channels: int | None = None, *, num_classes: int = 1
    ) -> None:
        super().__init__()
        if int(in_channels) <= 0 or int(num_anchors) <= 0 or int(num_classes) <= 0:
            raise ValueError(
                f"RPNHead: in_channels, num_anchors and num_classes must be positive, got {in_channels}, "
                f"{num_anchors} and {num_classes}"
            )
        conv_channels = int(in_channels) if conv_channels is None else int(conv_channels)
        self.num_anchors = int(num_anchors)
        self.num_classes = int(num_classes)
        outputs = self.num_anchors * self.num_classes
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(conv_channels, outputs, kernel_size=1)
        self.bbox_pred = nn.Conv2d(conv_channels, 4 * outputs, kernel_size=1)
        # Ren et al.: new layers drawn from N(0, 0.01^2), zero bias.
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.relu(self.conv(x))
        return self.cls_logits(hidden), self.bbox_pred(hidden)

    def flatten(self, logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
        """([B, A*K, h, w], [B, 4*A*K, h, w]) -> (logits [B, N, K], deltas [B, N, K, 4]), N = h*w*A in
        (y, x, anchor) order, matching ``AnchorGenerator``."""
        batch, _, height, width = logits.shape
        a, k = self.num_anchors, self.num_classes
        flat_logits = logits.view(batch, a, k, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, k)
        flat_deltas = deltas.view(batch, a, k, 4, height, width).permute(0, 4, 5, 1, 2, 3).reshape(batch, -1, k, 4)
        return flat_logits, flat_deltas
