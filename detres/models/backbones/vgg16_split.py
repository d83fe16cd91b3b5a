"""VGG-16 split for Faster R-CNN (the ResNet paper's baseline, Tables 7-8): shared conv1_1..conv5_3, per-region fc6/fc7.

As in Fast/Faster R-CNN: the conv layers up to conv5_3 (VGG-16's ``features`` without its last max-pool,
total stride 16, 512 channels) are shared by the RPN and the RoI heads; each RoI is pooled to 7x7 on the
conv5_3 map and run through fc6 and fc7 (4096, ReLU, dropout), whose 4096-d output is the region vector
of the sibling predictor. Parameter names are those of :class:`detres.models.backbones.vgg.VGG` (= torchvision's
``vgg16``): the trunk holds ``features.0`` .. ``features.29`` and the head ``classifier.0`` .. ``classifier.5``,
so a train_cls ``vgg16`` checkpoint or a torchvision ``vgg16`` state_dict maps key for key (fc8 =
``classifier.6.*`` is not used). VGG-16 has no BatchNorm: only the paper's ``batch_norm=False`` network is
supported; a ``vgg16_bn`` file is refused with an error naming it (its BN layers would also have to be
frozen, which nothing here does). Sizes quoted (512, 4096) are the paper's; ``width``/``hidden`` of
:func:`build_vgg16_c4` give a narrower copy (conv5_3 with ``8 * width`` channels, ``hidden``-d region
vectors) and must match what the checkpoint's ``model_args`` record.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detres.models.backbones.vgg import HEAD_GRID, VGG, vgg16

__all__ = ["VGGTrunk", "VGGFcHead", "build_vgg16_c4", "check_vgg_size", "VGG_TRUNK_LAYERS", "VGG_FREEZE_LAYERS"]

VGG_TRUNK_LAYERS = 30  # features[0:30] = conv1_1 .. relu5_3; features[30] is pool5, dropped for stride 16
# freeze_at -> how many leading modules of ``features`` are frozen: conv1_x (with pool1) / + conv2_x (with pool2).
VGG_FREEZE_LAYERS = {0: 0, 1: 5, 2: 10}
_FC8_PREFIX = "classifier.6."


class VGGTrunk(nn.Module):
    """conv1_1 .. conv5_3 of VGG-16 with their ReLUs and four max-pools: stride 16, 512 channels.

    Args:
        vgg: a :class:`detres.models.backbones.vgg.VGG` without BN (its conv modules are reused, not copied).
        freeze_at: 0 = train everything, 1 = freeze conv1_x (conv1_1, conv1_2), 2 = freeze conv1_x and
            conv2_x (the first four convs; Faster R-CNN's VGG-16 default, as fine-tuning them does not
            help and costs memory). Frozen parameters get ``requires_grad=False``.
    """

    def __init__(self, vgg: VGG, *, freeze_at: int = 2) -> None:
        super().__init__()
        if freeze_at not in VGG_FREEZE_LAYERS:
            raise ValueError(f"VGGTrunk: freeze_at must be 0, 1 or 2, got {freeze_at!r}")
        if any(isinstance(m, nn.BatchNorm2d) for m in vgg.features):
            raise ValueError("VGGTrunk: VGG with batch_norm=True is not supported as a detection backbone")
        # Same attribute name and indices as the classifier, so its state_dict keys carry over.
        self.features = nn.Sequential(*list(vgg.features)[:VGG_TRUNK_LAYERS])
        self.freeze_at = freeze_at
        self.out_channels = int(self.features[VGG_TRUNK_LAYERS - 2].out_channels)  # conv5_3
        self.stride = 16  # four 2x2 max-pools
        for p in self.features[: VGG_FREEZE_LAYERS[freeze_at]].parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] normalised images -> conv5_3 features [B, 512, ~H/16, ~W/16]."""
        return self.features(x)


class VGGFcHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout on each 7x7x512 pooled RoI: [R,512,7,7] -> [R,4096].

    Reuses the classifier's first six modules (``classifier.0`` .. ``classifier.5``), so fc6/fc7 keep their
    pre-trained weights and names. fc6 was trained on a 7x7 conv5 map, hence RoI pooling to 7x7.
    """

    def __init__(self, vgg: VGG) -> None:
        super().__init__()
        self.classifier = nn.Sequential(*list(vgg.classifier)[:6])
        self.grid = HEAD_GRID
        self.in_channels = int(self.classifier[0].in_features) // (HEAD_GRID * HEAD_GRID)
        self.out_channels = int(self.classifier[3].out_features)

    def forward(self, x: Tensor) -> Tensor:
        """[R,512,7,7] RoI features -> region vectors [R,4096] (fc7 after ReLU and dropout)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.grid, self.grid):
            raise ValueError(
                f"VGGFcHead: expected pooled RoI features [R,{self.in_channels},{self.grid},{self.grid}], "
                f"got {tuple(x.shape)} (use a {self.grid}x{self.grid} RoI pooler)"
            )
        return self.classifier(torch.flatten(x, 1))


def _vgg_state_dict(path: Path) -> tuple[dict[str, Tensor], Mapping[str, Any]]:
    """The VGG-16 (no BN) parameters held by ``path`` with classifier names, and its stored ``model_args``
    (empty for a torchvision state_dict); errors name the file."""
    from detres.models.backbones.weights import checkpoint_state_dict
    from detres.utils.torch_files import read_torch_file

    obj = read_torch_file(path, what="weights file")
    _, state = checkpoint_state_dict(obj, str(path))
    saved: Mapping[str, Any] = (obj.get("model_args") or {}) if isinstance(obj, Mapping) else {}
    arch = saved.get("arch")
    if (arch is not None and arch != "vgg16") or "features.0.weight" not in state:
        found = arch if arch is not None else ", ".join(sorted(state)[:5])
        raise ValueError(
            f"{path}: not a VGG-16 network (found {found}); a vgg16 backbone needs a train_cls "
            "checkpoint with model.arch=vgg16 or a torchvision vgg16 state_dict"
        )
    if saved.get("batch_norm") or any(k.endswith("running_mean") for k in state):
        raise ValueError(
            f"{path}: holds a VGG-16 with batch normalisation (vgg16_bn); the detection backbone "
            "is the paper's VGG-16 without BN (model.batch_norm=false)"
        )
    return state, saved


def check_vgg_size(saved: Mapping[str, Any], *, width: int, hidden: int, source: str) -> None:
    """Refuse a checkpoint whose recorded ``width``/``hidden`` differ from the requested ones (absent = 64/4096,
    the sizes of checkpoints written before the options existed); the error names the file and both values."""
    for key, wanted, default, option in (("width", width, 64, "vgg_width"), ("hidden", hidden, 4096, "vgg_hidden")):
        found = saved.get(key, default) if saved else None
        if found is not None and int(found) != int(wanted):
            raise ValueError(
                f"{source} holds a VGG-16 with {key}={int(found)} but the detector asks for "
                f"{key}={int(wanted)}: set model.{option}={int(found)} or use another checkpoint"
            )


def build_vgg16_c4(
    *,
    weights_path: str | Path | None = None,
    freeze_at: int = 2,
    dropout: float = 0.5,
    pooler_resolution: int = HEAD_GRID,
    width: int = 64,
    hidden: int = 4096,
) -> tuple[VGGTrunk, VGGFcHead, int]:
    """Build VGG-16, load local pretrained weights (fc8 skipped), split it into trunk and fc head.

    Args:
        weights_path: train_cls ``vgg16`` checkpoint or torchvision ``vgg16`` state_dict (None = random init).
        freeze_at: see :class:`VGGTrunk`.
        dropout: dropout probability after fc6 and fc7 (Faster R-CNN: 0.5, as in pre-training).
        pooler_resolution: the detector's RoI pooler output size; must be 7, the grid fc6 was trained on.
        width: conv1 channels (64 = the paper's VGG-16; conv5_3 has ``8 * width``); must match the checkpoint.
        hidden: fc6/fc7 size (paper: 4096); must match the checkpoint.

    Returns:
        (trunk, head, hidden) where ``hidden`` is the region vector size (fc7).
    """
    from detres.models.backbones.weights import load_state_dict_strict

    if int(pooler_resolution) != HEAD_GRID:
        raise ValueError(
            f"backbone='vgg16' needs pooler_resolution={HEAD_GRID} (fc6 takes a {HEAD_GRID}x{HEAD_GRID} "
            f"conv5_3 map), got {pooler_resolution}: set model.roi_heads.pooler_resolution={HEAD_GRID}"
        )
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"build_vgg16_c4: pretrained backbone weights_path '{weights_path}' does not exist "
            "(pass a local VGG-16 checkpoint, or weights_path=None for random init)"
        )
    state, saved = _vgg_state_dict(Path(weights_path)) if weights_path is not None else (None, {})
    if state is not None:  # fail before building
        check_vgg_size(saved, width=width, hidden=hidden, source=str(weights_path))
    # fc8's size is irrelevant: it is skipped and dropped
    vgg = vgg16(num_classes=1000, dropout=dropout, width=width, hidden=hidden)
    if state is not None:
        load_state_dict_strict(vgg, state, source=str(weights_path), skip_prefixes=(_FC8_PREFIX,))
    trunk = VGGTrunk(vgg, freeze_at=freeze_at)
    head = VGGFcHead(vgg)
    return trunk, head, head.out_channels
