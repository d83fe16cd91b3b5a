"""torchvision's ImageNet per-channel RGB statistics on the 0..255 scale: the one copy every module imports.

They normalise inputs for weights trained with them (torchvision-format backbones, the shared CIFAR ResNets)
and are the fallback mean when a checkpoint records none.
"""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN_RGB", "IMAGENET_STD_RGB"]

# torchvision's (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225), rescaled from [0, 1] to 0..255.
IMAGENET_MEAN_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB: tuple[float, float, float] = (58.395, 57.12, 57.375)
