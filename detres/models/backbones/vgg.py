"""VGG-16 (Simonyan & Zisserman 2015, configuration D) with torchvision's layout and parameter names.

13 conv 3x3 (pad 1) + ReLU in five blocks of 64/128/256/512/512 channels, each block closed by a 2x2
max-pool of stride 2, then fc6/fc7 (4096, ReLU, dropout) and fc8. Names match
``torchvision.models.vgg16`` (``features.N``, ``classifier.0/3/6``) so its state_dict loads key for key;
with ``batch_norm=True`` the layout and names are those of ``torchvision.models.vgg16_bn``. ``width`` (conv1
channels, default 64) scales all five blocks and ``hidden`` (default 4096) sets fc6/fc7: same 16 layers, less
compute (CPU-sized runs).

Input-size-agnostic head (kept, as torchvision does): the conv5 map is adaptive-average-pooled to 7x7
before fc6, so any input of at least :data:`VGG_MIN_INPUT` pixels gives logits; at 224 the map is
already 7x7 and the pool is the identity. The dense (fully-convolutional) form of the VGG paper's
Sec. 3.2 is :meth:`VGG.forward_features`: fc6 slides over the conv5 map as a 7x7 convolution and fc7
as a 1x1 convolution, leaving fc8 as :attr:`VGG.fc` for the dense multi-scale test of
``detres.evaluation.classification``; at the training size it equals the 1-crop network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Configuration D: channels of each conv, "M" = 2x2 max-pool of stride 2.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
VGG_MIN_INPUT = 32  # five halvings (floor) must leave at least one cell: 32 -> 16 -> 8 -> 4 -> 2 -> 1
HEAD_GRID = 7  # fc6 sees a 7x7x512 map (224 / 2**5)
FC_INIT_STD = 0.01  # torchvision's N(0, 0.01) fc init of VGG-16
VGG16_FC_FAN_IN = (512 * HEAD_GRID * HEAD_GRID, 4096, 4096)  # fc6, fc7, fc8 of the full-size VGG-16


def check_min_input(x: Tensor, minimum: int, name: str) -> None:
    """Raise a ValueError naming the minimum input size when ``x`` is smaller along either side."""
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < minimum or w < minimum:
        raise ValueError(f"{name} needs inputs of at least {minimum}x{minimum} pixels, got {h}x{w}")


def dense_head(features: Tensor, grid: int, linears: Sequence[nn.Linear], dropouts: Sequence[nn.Module]) -> Tensor:
    """The fc layers over a conv map as convolutions: the first one a grid x grid kernel, the rest 1x1.

    A map smaller than ``grid`` along a side is first adaptive-average-pooled up to ``grid`` on that
    side (what the flattening head's adaptive pool does), so at or below the training size the result
    equals the flattening head's features.
    """
    h, w = features.shape[-2:]
    if h < grid or w < grid:
        features = F.adaptive_avg_pool2d(features, (max(h, grid), max(w, grid)))
    first, *rest = linears
    x = F.conv2d(features, first.weight.view(first.out_features, -1, grid, grid), first.bias)
    x = dropouts[0](F.relu(x))
    for linear, dropout in zip(rest, dropouts[1:]):
        x = dropout(F.relu(F.conv2d(x, linear.weight[:, :, None, None], linear.bias)))
    return x


def check_width(width: int, hidden: int) -> None:
    """Raise a ValueError unless the conv1 width and the fc6/fc7 size are positive integers."""
    for name, value in (("width", width), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"VGG: {name} must be a positive integer, got {value!r}")


def scaled_channels(channels: int, width: int) -> int:
    """A configuration-D channel count (64 .. 512) for a net whose conv1 has ``width`` channels."""
    return max(1, channels * width // VGG16_CFG[0])


def fc_init_std(fan_in: int, reference_fan_in: int) -> float:
    """Std of an fc layer's N(0, std) init: 0.01 at VGG-16's fan-in, scaled to keep its output/input std ratio
    (sqrt(fan_in) * std) when the layer is narrower; never below 0.01."""
    return FC_INIT_STD * math.sqrt(max(1.0, reference_fan_in / fan_in))


class VGG(nn.Module):
    """VGG classifier: conv layers from ``cfg``, adaptive 7x7 pool, fc6/fc7 with dropout, fc8.

    Args:
        cfg: conv channels per layer and "M" for a max-pool (default: VGG-16, configuration D).
        num_classes: fc8 output size.
        dropout: dropout probability after fc6 and fc7 (paper: 0.5).
        batch_norm: BatchNorm after every conv (not in the paper; torchvision's ``vgg16_bn`` layout).
        hidden: width of fc6 and fc7 (paper: 4096).
        width: conv1 channels; every conv of ``cfg`` is scaled by ``width / 64`` (paper: 64, i.e. ``cfg``
            as given; 16 = the same 16 layers at a quarter of the channels, for CPU runs).
    """

    def __init__(
        self,
        *,
        cfg: Sequence[int | str] = VGG16_CFG,
        num_classes: int = 1000,
        dropout: float = 0.5,
        batch_norm: bool = False,
        hidden: int = 4096,
        width: int = 64,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        check_width(width, hidden)
        layers: list[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = scaled_channels(int(v), width)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((HEAD_GRID, HEAD_GRID))
        self.classifier = nn.Sequential(
            nn.Linear(channels * HEAD_GRID * HEAD_GRID, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # fc6
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # fc7
            nn.Linear(hidden, num_classes),  # fc8
        )
        self.min_input = VGG_MIN_INPUT
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's init: He (fan_out) convs, N(0, 0.01) fc weights, zero biases.

        The paper initialises deep nets from its trained 11-layer net A (or with Glorot init, its
        footnote); He init trains VGG-16 from scratch directly. An fc layer narrower than VGG-16's
        (``width``/``hidden`` below 64/4096) gets its std scaled by sqrt(VGG-16 fan-in / fan-in) so that
        it scales its input as the full-size layer does (:func:`fc_init_std`); full size: exactly 0.01.
        """
        reference = iter(VGG16_FC_FAN_IN)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, fc_init_std(m.in_features, next(reference)))
                nn.init.zeros_(m.bias)

    @property
    def fc(self) -> nn.Linear:
        """fc8, the last classifier layer (what the dense multi-scale test applies as a 1x1 conv)."""
        return self.classifier[6]

    def forward_features(self, x: Tensor) -> Tensor:
        """fc7 activations of every 224-px window, fully convolutional: [B, 4096, h, w] (1x1 at 224)."""
        check_min_input(x, self.min_input, "VGG")
        return dense_head(
            self.features(x),
            HEAD_GRID,
            [self.classifier[0], self.classifier[3]],
            [self.classifier[2], self.classifier[5]],
        )

    def forward(self, x: Tensor) -> Tensor:
        check_min_input(x, self.min_input, "VGG")
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(
    *, num_classes: int = 1000, dropout: float = 0.5, batch_norm: bool = False, width: int = 64, hidden: int = 4096
) -> VGG:
    """VGG-16 (configuration D): 138,357,544 parameters at 1000 classes and the defaults, as torchvision's
    ``vgg16``; ``width`` (conv1 channels, 64) and ``hidden`` (fc6/fc7 size, 4096) give narrower copies."""
    return VGG(
        cfg=VGG16_CFG, num_classes=num_classes, dropout=dropout, batch_norm=batch_norm, width=width, hidden=hidden
    )
