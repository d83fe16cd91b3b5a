"""ResNet-C4 split for Faster R-CNN (ResNet paper, Appendix A): shared trunk conv1..conv4_x, per-region conv5_x head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from detres.models.backbones.conv_norm import apply_conv_norm
from detres.models.backbones.cpu_execution import trunk_input_layout, trunk_output_layout
from detres.models.backbones.frozen_bn import convert_frozen_batchnorm

__all__ = ["ResNetC4Trunk", "ResNetC5Head", "build_resnet_c4", "stage_out_channels"]

_REQUIRED_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def stage_out_channels(stage: nn.Module) -> int:
    """Output channels of a residual stage: the last main-path conv of its last block.

    Shortcut/downsample convs are skipped; only the final block matters because every block of
    a stage ends with the same width.
    """
    last_block = list(stage.children())[-1] if len(list(stage.children())) else stage
    convs = [
        m
        for name, m in last_block.named_modules()
        if isinstance(m, nn.Conv2d) and "downsample" not in name and "shortcut" not in name
    ]
    if not convs:
        raise ValueError(f"stage_out_channels: no Conv2d found in stage {type(stage).__name__}")
    return int(convs[-1].out_channels)


def _check_attrs(resnet: nn.Module, names: tuple[str, ...], who: str) -> None:
    missing = [n for n in names if not hasattr(resnet, n)]
    if missing:
        raise ValueError(
            f"{who}: resnet module {type(resnet).__name__} lacks attributes {missing}; "
            "expected an ImageNet ResNet with torchvision attribute names"
        )


class ResNetC4Trunk(nn.Module):
    """conv1 .. conv4_x of an ImageNet ResNet (total stride 16), shared by the RPN and the RoI heads.

    Args:
        resnet: ImageNet ResNet with attributes conv1, bn1, relu, maxpool, layer1..layer3
            (its modules are reused, not copied).
        freeze_at: 0 = train everything, 1 = freeze the stem (conv1), 2 = freeze conv1 and
            conv2_x (res2). Frozen parameters get ``requires_grad=False``.
        frozen_bn: convert every BatchNorm2d to FrozenBatchNorm2d (Appendix A: BN statistics
            are recomputed after pre-training and then fixed during detection fine-tuning).
    """

    def __init__(self, resnet: nn.Module, *, freeze_at: int = 2, frozen_bn: bool = True) -> None:
        super().__init__()
        _check_attrs(resnet, _REQUIRED_TRUNK, "ResNetC4Trunk")
        if freeze_at not in (0, 1, 2):
            raise ValueError(f"ResNetC4Trunk: freeze_at must be 0, 1 or 2, got {freeze_at!r}")
        # Keep torchvision names so classification checkpoints map key-for-key.
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        if frozen_bn:
            for name in ("bn1", "layer1", "layer2", "layer3"):
                setattr(self, name, convert_frozen_batchnorm(getattr(self, name)))
        self.freeze_at = freeze_at
        self.out_channels = stage_out_channels(self.layer3)
        self.stride = 16
        frozen: list[nn.Module] = []
        if freeze_at >= 1:
            frozen += [self.conv1, self.bn1]
        if freeze_at >= 2:
            frozen.append(self.layer1)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised images -> C4 feature map [B, out_channels, ~H/16, ~W/16]."""
        x = trunk_input_layout(x)
        x = self.maxpool(self.relu(apply_conv_norm(self.conv1, self.bn1, x)))
        return trunk_output_layout(self.layer3(self.layer2(self.layer1(x))))


class ResNetC5Head(nn.Module):
    """conv5_x (layer4, first block stride 2) run on each RoI feature, then global average pooling.

    A 14x14 RoI feature becomes 7x7 after conv5_1 and one vector of ``out_channels``
    (2048 for bottleneck nets, 512 for basic-block nets) after pooling; this plays the role of
    VGG-16's fc layers (Appendix A, "Networks on Conv feature maps").
    """

    def __init__(self, resnet: nn.Module, *, frozen_bn: bool = True) -> None:
        super().__init__()
        _check_attrs(resnet, ("layer4",), "ResNetC5Head")
        self.layer4 = convert_frozen_batchnorm(resnet.layer4) if frozen_bn else resnet.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = stage_out_channels(self.layer4)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """[R,C4,S,S] RoI features -> conv5 maps [R,out_channels,S/2,S/2] (before pooling)."""
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R,C4,S,S] RoI features -> region vectors [R,out_channels]."""
        return torch.flatten(self.avgpool(self.layer4(x)), 1)


def build_resnet_c4(
    depth: int,
    *,
    weights_path: str | Path | None = None,
    freeze_at: int = 2,
    stride_in_1x1: bool = False,
    frozen_bn: bool = True,
    **resnet_kwargs: Any,
) -> tuple[ResNetC4Trunk, ResNetC5Head, int]:
    """Build an ImageNet ResNet of ``depth``, load local pretrained weights, split it C4-style.

    Args:
        depth: 18, 34, 50, 101 or 152.
        weights_path: local classification checkpoint (None = random init, e.g. for tests).
        freeze_at: see :class:`ResNetC4Trunk`.
        stride_in_1x1: put conv5_1/conv4_1/conv3_1's stride in the first 1x1 conv (original
            Caffe ResNet) instead of the 3x3 conv (torchvision); forwarded to ``build_resnet``.
        frozen_bn: convert BN to FrozenBatchNorm2d (paper); False only for from-scratch toys.
        resnet_kwargs: forwarded to ``detres.models.backbones.resnet.build_resnet``.

    Returns:
        (trunk, head, out_channels) where ``out_channels`` is the head's vector size.
    """
    from detres.models.backbones.resnet import build_resnet

    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"build_resnet_c4: pretrained backbone weights_path '{weights_path}' does not exist "
            "(pass a local classification checkpoint, or weights_path=None for random init)"
        )
    resnet = build_resnet(depth, stride_in_1x1=stride_in_1x1, **resnet_kwargs)
    if weights_path is not None:
        from detres.models.backbones.weights import load_pretrained_backbone

        load_pretrained_backbone(resnet, weights_path, skip_prefixes=("fc.",))  # the detector has no fc
    trunk = ResNetC4Trunk(resnet, freeze_at=freeze_at, frozen_bn=frozen_bn)
    head = ResNetC5Head(resnet, frozen_bn=frozen_bn)
    return trunk, head, head.out_channels
