"""Residual building blocks of He et al. 2016: BasicBlock, Bottleneck, shortcut options A/B/C and stages."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from detres.models.backbones.conv_norm import apply_conv_norm, apply_shortcut

NormLayer = Callable[[int], nn.Module]

SHORTCUT_OPTIONS = ("A", "B", "C")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BN follows every conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: parameter-free identity, strided subsampling plus zero channels.

    Spatial subsampling takes every ``stride``-th pixel (``x[:, :, ::s, ::s]``), which has the
    same output size as a stride-s conv with "same" padding. The ``out_channels - in_channels``
    extra channels are zeros, split evenly before and after the input channels (for a doubling of
    width this is ``planes // 4`` on each side, the layout of the public CIFAR checkpoints).
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            before = extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, extra - before))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 5 left); the stride sits in the first conv."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        del stride_in_1x1  # only meaningful for the bottleneck; accepted for a uniform signature
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.residual = residual
        self.stride = stride

    def last_norm(self) -> nn.Module:
        """The norm layer that ends the residual branch (target of zero-init)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(apply_conv_norm(self.conv1, self.bn1, x))
        out = apply_conv_norm(self.conv2, self.bn2, out)
        if self.residual:
            out += apply_shortcut(self.downsample, x)  # in place: no extra tensor
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right), output width 4 * planes.

    ``stride_in_1x1=True`` puts the stride on the first 1x1 conv as in the original MSRA Caffe
    models (the Table 1 FLOP counts); False puts it on the 3x3 conv as torchvision does.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual
        self.stride = stride

    def last_norm(self) -> nn.Module:
        """The norm layer that ends the residual branch (target of zero-init)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(apply_conv_norm(self.conv1, self.bn1, x))
        out = self.relu(apply_conv_norm(self.conv2, self.bn2, out))
        out = apply_conv_norm(self.conv3, self.bn3, out)
        if self.residual:
            out += apply_shortcut(self.downsample, x)  # in place: no extra tensor
        return self.relu(out)


BLOCK_TYPES: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def resolve_block(block: type[nn.Module] | str) -> type[nn.Module]:
    """The block class named by ``block`` ("basic" / "bottleneck") or ``block`` itself, validated."""
    if isinstance(block, str):
        if block not in BLOCK_TYPES:
            raise ValueError(f"block: unknown block type {block!r}; expected one of {sorted(BLOCK_TYPES)}")
        return BLOCK_TYPES[block]
    if block not in (BasicBlock, Bottleneck):
        raise ValueError(f"block: expected BasicBlock, Bottleneck, 'basic' or 'bottleneck', got {block!r}")
    return block


def _make_shortcut(
    *, shortcut: str, plain: bool, inplanes: int, outplanes: int, stride: int, norm_layer: NormLayer
) -> nn.Module | None:
    """Module for the block's ``downsample`` slot, or None for a plain identity/no shortcut."""
    if plain:
        return None
    shape_changes = stride != 1 or inplanes != outplanes
    if shortcut == "C" or (shortcut == "B" and shape_changes):
        # Eqn. (2): W_s x, a 1x1 projection (+BN, as after every conv); torchvision's key layout.
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))
    if shortcut == "A" and shape_changes:
        return ZeroPadShortcut(in_channels=inplanes, out_channels=outplanes, stride=stride)
    return None


def check_shortcut(shortcut: str) -> str:
    """``shortcut`` if it is one of SHORTCUT_OPTIONS, else ValueError."""
    if shortcut not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut: expected one of {SHORTCUT_OPTIONS}, got {shortcut!r}")
    return shortcut


def make_stage(
    block: type[nn.Module],
    *,
    inplanes: int,
    planes: int,
    num_blocks: int,
    stride: int,
    shortcut: str,
    plain: bool,
    stride_in_1x1: bool,
    norm_layer: NormLayer,
) -> tuple[nn.Sequential, int]:
    """One stage (conv{k}_x): the first block may change stride/width. Returns (stage, out width)."""
    blocks = []
    outplanes = planes * block.expansion
    for i in range(num_blocks):
        block_stride = stride if i == 0 else 1
        downsample = _make_shortcut(
            shortcut=shortcut,
            plain=plain,
            inplanes=inplanes,
            outplanes=outplanes,
            stride=block_stride,
            norm_layer=norm_layer,
        )
        blocks.append(
            block(
                inplanes,
                planes,
                block_stride,
                downsample,
                residual=not plain,
                norm_layer=norm_layer,
                stride_in_1x1=stride_in_1x1,
            )
        )
        inplanes = outplanes
    return nn.Sequential(*blocks), outplanes
