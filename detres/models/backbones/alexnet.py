"""AlexNet (Krizhevsky et al. 2012, Sec. 3): 5 conv + 3 fc layers, ReLU, LRN, overlapping max-pooling, dropout.

The paper's net in its single-GPU form: conv1 96 11x11/4, conv2 256 5x5, conv3 384 3x3, conv4 384 3x3,
conv5 256 3x3, each followed by ReLU; local response normalisation (Sec. 3.3) after the ReLUs of conv1
and conv2; overlapping 3x3 max-pools of stride 2 (Sec. 3.4) after both normalisations and after conv5;
fc6/fc7 of 4096 with dropout 0.5 (Sec. 4.2) and fc8. ``groups=2`` restores the paper's two-GPU
connectivity (Sec. 3.2, Fig. 2): conv2, conv4 and conv5 see only the kernel maps of their own GPU.

Geometry: conv1 pads 2 pixels, so a 224 input gives the paper's 55x55 conv1 map (and its stated 224
input agrees with its 55 map); the 227 input of the Caffe reproductions gives 56, and both end in the
paper's 6x6x256 conv5 map. An adaptive average pool to 6x6 precedes fc6 (as in torchvision), so
inputs of :data:`ALEXNET_MIN_INPUT` pixels and more all give logits.

``channels=(64, 192, 384, 256, 256), lrn=False`` has the layers and parameter count of torchvision's
``alexnet`` (the "one weird trick" variant; 61,100,840 parameters), which drops the *inputs* of fc6/fc7
rather than their outputs, so its ``classifier.N`` indices differ from these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detres.models.backbones.vgg import check_min_input, dense_head

PAPER_CHANNELS = (96, 256, 384, 384, 256)
TORCHVISION_CHANNELS = (64, 192, 384, 256, 256)
HEAD_GRID = 6  # fc6 sees a 6x6x256 map
# conv1 (11/4, pad 2) then three 3x3/2 pools (conv2-5 keep the size): the last pool needs a 3x3 input,
# so pool2 needs 7, pool1 15, conv1 output 15 -> floor((s + 4 - 11) / 4) + 1 >= 15 -> s >= 63.
ALEXNET_MIN_INPUT = 63

# Sec. 3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75 in b = a / (k + alpha * sum_j a_j^2)^beta.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75


def paper_lrn(
    size: int = LRN_N, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K
) -> nn.LocalResponseNorm:
    """The paper's response normalisation as ``nn.LocalResponseNorm``.

    PyTorch divides its ``alpha`` by ``size`` (b = a / (k + alpha/n * sum a^2)^beta), the paper does
    not, so the paper's alpha is passed multiplied by n.
    """
    return nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)


class AlexNet(nn.Module):
    """AlexNet classifier from explicit arguments.

    Args:
        num_classes: fc8 output size.
        dropout: dropout probability on the outputs of fc6 and fc7 (Sec. 4.2: "dropout in the first two
            fully-connected layers"; torchvision instead drops the inputs of fc6 and fc7).
        groups: 1 = single-GPU form with full connectivity; 2 = the paper's two-GPU connectivity
            (grouped conv2, conv4, conv5).
        lrn: local response normalisation after conv1 and conv2 (the paper); False for torchvision's net.
        channels: output channels of conv1..conv5.
        hidden: width of fc6 and fc7.
        init: "paper" = weights N(0, 0.01), biases 1 in conv2, conv4, conv5 and fc6/fc7, else 0 (Sec. 5);
            "kaiming" = He (fan_in) convs with zero biases, fc as "paper" with zero biases.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        dropout: float = 0.5,
        groups: int = 1,
        lrn: bool = True,
        channels: Sequence[int] = PAPER_CHANNELS,
        hidden: int = 4096,
        init: str = "paper",
    ) -> None:
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 (single GPU) or 2 (the paper's two GPUs), got {groups!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if init not in ("paper", "kaiming"):
            raise ValueError(f"init must be 'paper' or 'kaiming', got {init!r}")
        c1, c2, c3, c4, c5 = (int(c) for c in channels)
        if groups > 1 and any(c % groups for c in (c1, c2, c3, c4, c5)):
            raise ValueError(f"groups={groups} needs channels divisible by it, got {tuple(channels)}")

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2)  # overlapping pooling, Sec. 3.4

        layers: list[nn.Module] = [nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True)]
        layers += [paper_lrn()] if lrn else []
        layers += [pool(), nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=groups), nn.ReLU(inplace=True)]
        layers += [paper_lrn()] if lrn else []
        layers += [
            pool(),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),  # conv3 sees both GPUs
            nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            pool(),
        ]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((HEAD_GRID, HEAD_GRID))
        self.classifier = nn.Sequential(
            nn.Linear(c5 * HEAD_GRID * HEAD_GRID, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # fc6
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # fc7
            nn.Linear(hidden, num_classes),  # fc8
        )
        self.groups = groups
        self.min_input = ALEXNET_MIN_INPUT
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        one_bias = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
        for m in convs + linears:
            if init == "kaiming" and isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.constant_(m.bias, 1.0 if init == "paper" and id(m) in one_bias else 0.0)

    @property
    def fc(self) -> nn.Linear:
        """fc8, the last classifier layer (what the dense multi-scale test applies as a 1x1 conv)."""
        return self.classifier[6]

    def forward_features(self, x: Tensor) -> Tensor:
        """fc7 activations of every 224-px window, fully convolutional: [B, 4096, h, w] (1x1 at 224)."""
        check_min_input(x, self.min_input, "AlexNet")
        return dense_head(
            self.features(x),
            HEAD_GRID,
            [self.classifier[0], self.classifier[3]],
            [self.classifier[2], self.classifier[5]],
        )

    def forward(self, x: Tensor) -> Tensor:
        check_min_input(x, self.min_input, "AlexNet")
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(
    *, num_classes: int = 1000, dropout: float = 0.5, groups: int = 1, lrn: bool = True, init: str = "paper"
) -> AlexNet:
    """The paper's AlexNet: 62,378,344 parameters at 1000 classes (groups=1), 60,965,224 with groups=2."""
    return AlexNet(num_classes=num_classes, dropout=dropout, groups=groups, lrn=lrn, channels=PAPER_CHANNELS, init=init)
