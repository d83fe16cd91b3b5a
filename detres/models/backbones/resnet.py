"""ImageNet and CIFAR residual/plain nets of He et al. 2016 (Sec. 3.3, 4.2, Table 1) with shortcut options A/B/C.

The blocks, shortcuts and stage builder live in ``detres.models.backbones.resnet_blocks`` and are re-exported
here, so ``from detres.models.backbones.resnet import BasicBlock, conv1x1, ...`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detres.models.backbones.conv_norm import apply_conv_norm
from detres.models.backbones.resnet_blocks import (
    BLOCK_TYPES,
    SHORTCUT_OPTIONS,
    BasicBlock,
    Bottleneck,
    NormLayer,
    ZeroPadShortcut,
    check_shortcut,
    conv1x1,
    conv3x3,
    make_stage,
    resolve_block,
)

__all__ = [
    "BLOCK_TYPES",
    "CIFAR_DEPTHS",
    "IMAGENET_DEPTHS",
    "SHORTCUT_OPTIONS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "NormLayer",
    "ResNet",
    "ZeroPadShortcut",
    "build_cifar_resnet",
    "build_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet1202",
    "conv1x1",
    "conv3x3",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

# Table 1: depth -> (block type, blocks per stage conv2_x..conv5_x).
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

# Sec. 4.2: depth 6n+2; the paper reports n = 3, 5, 7, 9, 18, 200.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _init_weights(model: nn.Module, *, zero_init_residual: bool) -> None:
    """He init [13] for convs (normal, fan_out, ReLU gain); norm layers weight 1, bias 0.

    nn.Linear keeps PyTorch's default init, as torchvision's ResNet does.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each residual branch starts as zero, so every block starts as the identity.
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                norm = m.last_norm()
                weight = getattr(norm, "weight", None)
                if isinstance(weight, Tensor):
                    with torch.no_grad():
                        weight.zero_()


class ResNet(nn.Module):
    """ImageNet ResNet / plain net of Table 1 with torchvision attribute names.

    Args:
        block: BasicBlock or Bottleneck (or "basic" / "bottleneck").
        layers: number of blocks in conv2_x..conv5_x.
        num_classes: fc output size.
        shortcut: "A" zero-padding identity, "B" projections only where the shape changes
            (torchvision layout), "C" projections everywhere. Ignored when ``plain``.
        plain: build the plain counterpart (no shortcut connections at all).
        stride_in_1x1: bottleneck stride on the first 1x1 conv (MSRA Caffe) instead of the 3x3.
        norm_layer: callable ``num_features -> module`` (nn.BatchNorm2d, FrozenBatchNorm2d, ...).
        zero_init_residual: zero the last norm weight of every residual branch.
        base_width: channels of conv1 and conv2_x (64 in Table 1); conv3_x..conv5_x use 2x, 4x, 8x.
            Smaller values give the same architecture at a fraction of the cost, for CPU-sized runs;
            torchvision weights exist only for 64.
    """

    def __init__(
        self,
        block: type[nn.Module] | str = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        num_classes: int = 1000,
        shortcut: str = "B",
        plain: bool = False,
        stride_in_1x1: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        block = resolve_block(block)
        if int(base_width) < 1:
            raise ValueError(f"base_width: expected a positive channel count, got {base_width}")
        check_shortcut(shortcut)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers: expected 4 positive block counts, got {tuple(layers)}")
        if plain and zero_init_residual:
            raise ValueError("zero_init_residual=True has no residual branch to zero in a plain net")
        self.block = block
        self.layers_cfg = tuple(int(n) for n in layers)
        self.shortcut = shortcut
        self.plain = plain
        self.stride_in_1x1 = stride_in_1x1

        self.base_width = int(base_width)
        self.conv1 = nn.Conv2d(3, self.base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = self.base_width
        widths = tuple(self.base_width * m for m in (1, 2, 4, 8))
        # conv2_x..conv5_x of Table 1; conv3_x..conv5_x halve the resolution in their first block.
        for index, (planes, num_blocks) in enumerate(zip(widths, self.layers_cfg)):
            stage, inplanes = make_stage(
                block,
                inplanes=inplanes,
                planes=planes,
                num_blocks=num_blocks,
                stride=1 if index == 0 else 2,
                shortcut=shortcut,
                plain=plain,
                stride_in_1x1=stride_in_1x1,
                norm_layer=norm_layer,
            )
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.out_channels = inplanes
        _init_weights(self, zero_init_residual=zero_init_residual)

    def stage_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """Feature maps of conv1 (stride 2) and conv2_x..conv5_x (strides 4, 8, 16, 32).

        conv2_x includes the 3x3 max pool, as in Table 1.
        """
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(c1))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"conv1": c1, "conv2": c2, "conv3": c3, "conv4": c4, "conv5": c5}

    def forward_features(self, x: Tensor) -> Tensor:
        """conv5_x feature map [B, C, H/32, W/32], before global pooling."""
        x = self.maxpool(self.relu(apply_conv_norm(self.conv1, self.bn1, x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


class CifarResNet(nn.Module):
    """CIFAR-10 net of Sec. 4.2: 3x3 conv(16), 3 stages of n blocks (16/32/64), avg pool, fc.

    Depth is 6n+2. Defaults to option A (all shortcuts parameter-free), as in the paper.
    ``stage_outputs`` keys are "conv1".."conv4" with strides 1, 1, 2, 4: conv1 is the first
    3x3 conv and conv2..conv4 are the three stages (32, 32, 16 and 8 pixels for a 32x32 input).
    """

    def __init__(
        self,
        num_blocks: int = 3,
        *,
        num_classes: int = 10,
        shortcut: str = "A",
        plain: bool = False,
        widths: Sequence[int] = (16, 32, 64),
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_shortcut(shortcut)
        if int(num_blocks) < 1:
            raise ValueError(f"num_blocks: expected n >= 1 (depth 6n+2), got {num_blocks}")
        if len(widths) != 3:
            raise ValueError(f"widths: expected 3 stage widths, got {tuple(widths)}")
        if plain and zero_init_residual:
            raise ValueError("zero_init_residual=True has no residual branch to zero in a plain net")
        self.num_blocks = int(num_blocks)
        self.depth = 6 * self.num_blocks + 2
        self.shortcut = shortcut
        self.plain = plain

        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        # Feature maps 32, 16, 8: the second and third stages subsample in their first conv.
        for index, planes in enumerate(widths):
            stage, inplanes = make_stage(
                BasicBlock,
                inplanes=inplanes,
                planes=int(planes),
                num_blocks=self.num_blocks,
                stride=1 if index == 0 else 2,
                shortcut=shortcut,
                plain=plain,
                stride_in_1x1=False,
                norm_layer=norm_layer,
            )
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.out_channels = inplanes
        _init_weights(self, zero_init_residual=zero_init_residual)

    def stage_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """conv1 (stride 1) and the three stages conv2..conv4 (strides 1, 2, 4)."""
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(c1)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return {"conv1": c1, "conv2": c2, "conv3": c3, "conv4": c4}

    def forward_features(self, x: Tensor) -> Tensor:
        """Last stage map [B, 64, H/4, W/4], before global pooling."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def build_resnet(depth: int, **kwargs) -> ResNet:
    """ImageNet ResNet (or plain net with ``plain=True``) of a Table 1 depth; kwargs go to ResNet."""
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(
            f"depth: ImageNet ResNets exist for depths {sorted(IMAGENET_DEPTHS)}, got {depth}"
            " (CIFAR 6n+2 nets are built by build_cifar_resnet)"
        )
    for key in ("block", "layers"):
        if key in kwargs:
            raise ValueError(f"{key}: fixed by depth={depth}; use ResNet(...) directly for custom layouts")
    block, layers = IMAGENET_DEPTHS[depth]
    return ResNet(block, layers, **kwargs)


def build_cifar_resnet(depth: int, **kwargs) -> CifarResNet:
    """CIFAR ResNet / plain net of depth 6n+2 (20, 32, 44, 56, 110, 1202, ...); kwargs go to CifarResNet."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth: CIFAR ResNets have depth 6n+2 with n >= 1, got {depth}")
    if "num_blocks" in kwargs:
        raise ValueError(f"num_blocks: fixed by depth={depth}")
    return CifarResNet((depth - 2) // 6, **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return build_resnet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return build_resnet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return build_resnet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3)."""
    return build_resnet(101, **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3)."""
    return build_resnet(152, **kwargs)


def cifar_resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (n=3)."""
    return build_cifar_resnet(20, **kwargs)


def cifar_resnet32(**kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (n=5)."""
    return build_cifar_resnet(32, **kwargs)


def cifar_resnet44(**kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (n=7)."""
    return build_cifar_resnet(44, **kwargs)


def cifar_resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (n=9)."""
    return build_cifar_resnet(56, **kwargs)


def cifar_resnet110(**kwargs) -> CifarResNet:
    """CIFAR ResNet-110 (n=18)."""
    return build_cifar_resnet(110, **kwargs)


def cifar_resnet1202(**kwargs) -> CifarResNet:
    """CIFAR ResNet-1202 (n=200)."""
    return build_cifar_resnet(1202, **kwargs)
