"""The detector's input and output transform: the test-scale resize (eval mode), normalisation with the backbone's
statistics, zero padding into one batch, and detections mapped back to each original image's pixels.

Training images come resized by the data pipeline (its seeded scale draws are what exact resume replays), so in
training mode the transform only normalises and pads. In eval mode it resizes each image itself, with the data
pipeline's scale rule (:func:`detres.data.transforms.detection.faster_rcnn_scale`) and sizes rounded as that
pipeline rounds them, by bilinear interpolation with half-pixel centres and no antialiasing (what cv2's
``INTER_LINEAR`` computes, up to cv2's 8-bit rounding). The size arithmetic runs inside
``torch.jit._script_if_tracing`` functions, so a traced transform follows the size of each new input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detres.data.collate import pad_images
from detres.data.transforms.detection import faster_rcnn_scale
from detres.models.backbones.backbone_config import model_normalization

__all__ = ["DetectorTransform", "resized_size", "resize_image", "boxes_to_original"]


def _per_channel(values: Sequence[float], name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != 3:
        raise ValueError(f"DetectorTransform: {name} must have 3 values (RGB), got {list(values)}")
    if name == "pixel_std" and bool((t <= 0).any()):
        raise ValueError(f"DetectorTransform: pixel_std must be positive, got {t.tolist()}")
    return t.view(3, 1, 1)


def _round_half_even(value: float) -> int:
    """Python's ``round`` (ties to the even integer), written so that TorchScript compiles it to the same rule."""
    low = int(value // 1)
    rest = value - low
    if rest > 0.5 or (rest == 0.5 and low % 2 == 1):
        low += 1
    return low


@torch.jit._script_if_tracing
def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """(h, w) of an image of ``height`` x ``width`` at the scale of ``faster_rcnn_scale`` (shorter side ``min_size``,
    longer side at most ``max_size``), each rounded to the nearest integer (ties to even) and at least 1, as the
    data pipeline's resize rounds them."""
    scale = faster_rcnn_scale(height, width, min_size, max_size)
    return max(1, _round_half_even(height * scale)), max(1, _round_half_even(width * scale))


@torch.jit._script_if_tracing
def resize_image(image: Tensor, min_size: float, max_size: float) -> Tensor:
    """A float image [3,H,W] resized to :func:`resized_size` by bilinear interpolation (half-pixel centres, no
    antialiasing); the image itself when the size does not change."""
    h, w = resized_size(int(image.shape[-2]), int(image.shape[-1]), min_size, max_size)
    if h == image.shape[-2] and w == image.shape[-1]:
        return image
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]


@torch.jit._script_if_tracing
def boxes_to_original(boxes: Tensor, original: Tensor, resized: Tensor) -> Tensor:
    """xyxy ``boxes`` [D,4] in the pixels of ``resized`` (an image [3,h,w] resized from ``original`` [3,H,W]) in the
    original's pixels: x divided by w/W, y by h/H (the exact per-axis factors of the rounded size), clipped, float32."""
    height, width = float(original.shape[-2]), float(original.shape[-1])
    factor_x = float(resized.shape[-1]) / width
    factor_y = float(resized.shape[-2]) / height
    boxes = boxes.float()  # float16 under autocast would round original-image pixels to 0.5 px and worse
    factors = torch.tensor([factor_x, factor_y, factor_x, factor_y], dtype=boxes.dtype, device=boxes.device)
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum((boxes / factors).clamp(min=0.0), limits)


class DetectorTransform(nn.Module):
    """Images in, one normalised batch out; detections back in each input image's pixels.

    Args:
        pixel_mean: per-channel RGB mean on the 0..255 scale, subtracted from every input pixel: the value
            the classification backbone was trained with (:func:`model_normalization`).
        pixel_std: per-channel divisor. (1, 1, 1) is the paper's / AlexNet's mean-subtraction-only
            practice; the ImageNet std (58.395, 57.12, 57.375) for torchvision-trained weights.
        min_size, max_size: the test scale (eval mode): shorter side ``min_size`` unless the longer side would
            exceed ``max_size`` (a det config's ``input`` section).
        size_divisibility: the padded batch's H and W are rounded up to a multiple of this (16 = the trunk
            stride, so feature cells align with anchors for every image in the batch).

    Padding is zero *after* normalisation (the mean colour).
    """

    def __init__(
        self,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        min_size: int,
        max_size: int,
        size_divisibility: int = 16,
    ) -> None:
        super().__init__()
        if int(size_divisibility) < 1:
            raise ValueError(f"DetectorTransform: size_divisibility must be >= 1, got {size_divisibility}")
        if int(min_size) < 1 or int(max_size) < int(min_size):
            raise ValueError(f"DetectorTransform: need 1 <= min_size <= max_size, got {min_size} and {max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisibility = int(size_divisibility)
        self.register_buffer("pixel_mean", _per_channel(pixel_mean, "pixel_mean"))
        self.register_buffer("pixel_std", _per_channel(pixel_std, "pixel_std"))

    @classmethod
    def from_config(
        cls, model_cfg: Mapping[str, Any], input_cfg: Mapping[str, Any], *, load_weights: bool = True
    ) -> DetectorTransform:
        """The backbone's statistics (``model``, see :func:`model_normalization`) and the test scale (``input``)."""
        mean, std = model_normalization(model_cfg, load_weights=load_weights)
        return cls(
            pixel_mean=mean,
            pixel_std=std,
            min_size=int(input_cfg["min_size_test"]),
            max_size=int(input_cfg["max_size_test"]),
        )

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, size_divisibility={self.size_divisibility}"

    # ------------------------------------------------------------------------------------------- sizes
    def max_size_for(self, min_size: float) -> float:
        """The longer-side cap that goes with shorter side ``min_size``: the test scale's ratio kept."""
        return float(min_size) * self.max_size / self.min_size

    def scaled_size(
        self, hw: Sequence[int], min_size: float | None = None, max_size: float | None = None
    ) -> tuple[int, int]:
        """(h, w) an image of size ``hw`` gets at shorter side ``min_size`` (None = the test scale), the longer
        side capped at ``max_size`` (None = :meth:`max_size_for`): what the multi-scale pyramid's levels ask."""
        short = float(self.min_size if min_size is None else min_size)
        cap = self.max_size_for(short) if max_size is None else float(max_size)
        return resized_size(int(hw[0]), int(hw[1]), short, cap)

    def resize(self, image: Tensor, min_size: float | None = None) -> Tensor:
        """One float image [3,H,W] at the test scale (or at shorter side ``min_size``, see :meth:`scaled_size`)."""
        short = float(self.min_size if min_size is None else min_size)
        return resize_image(image, short, self.max_size_for(short))

    # ------------------------------------------------------------------------------------------- batches
    def to_test_scale(
        self, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(the original images, each resized to the test scale) on the transform's device, as float32.

        ``images``: a list of float 0..255 images [3,H,W] (or one), or a zero-padded batch [B,3,H,W] whose valid
        regions are ``image_sizes`` (default: the whole tensor), e.g. ``collate_detection``'s. The originals
        are what :meth:`postprocess` maps the boxes back to.
        """
        device = self.pixel_mean.device
        originals = [img.to(device=device, dtype=torch.float32) for img in self.unbatch(images, image_sizes)]
        return originals, [self.resize(img) for img in originals]

    def postprocess(
        self, detections: Sequence[dict[str, Tensor]], originals: Sequence[Tensor], resized: Sequence[Tensor]
    ) -> list[dict[str, Tensor]]:
        """Each detection dict with its ``boxes`` in the pixels of its original image (:func:`boxes_to_original`)."""
        out = []
        for det, original, image in zip(detections, originals, resized):
            det = dict(det)
            det["boxes"] = boxes_to_original(det["boxes"], original, image)
            out.append(det)
        return out

    def unbatch(self, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None) -> list[Tensor]:
        """The images as a checked list of [3,h,w] (views of a padded batch's valid regions: no copy)."""
        if isinstance(images, Tensor) and images.dim() == 4:
            sizes = self._checked_sizes(images, image_sizes)
            return [img[:, :h, :w] for img, (h, w) in zip(images, sizes)]
        if image_sizes is not None:
            raise ValueError("FasterRCNN: image_sizes is only accepted with a padded [B,3,H,W] batch tensor")
        return self._checked_list(images)

    def normalise(
        self, images: Sequence[Tensor] | Tensor, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and zero-pad into one batch [B,3,Hp,Wp]; returns it with the valid (h, w) of each image.

        ``images``: a list of [3,H,W] tensors, or an already padded [B,3,H,W] tensor whose valid
        regions are given by ``image_sizes`` (default: the full tensor size), e.g. ``collate_detection``'s.
        Padding is done once: a list is normalised image by image and padded here (``pad_images``); a
        padded batch is normalised as a whole and only its padding is reset to 0 (the mean colour), the
        batch being extended only if its H or W is not yet a multiple of ``size_divisibility``.
        """
        device = self.pixel_mean.device
        if isinstance(images, Tensor) and images.dim() == 4:
            sizes = self._checked_sizes(images, image_sizes)
            batch = (images.to(device=device, dtype=torch.float32) - self.pixel_mean) / self.pixel_std
            # Extend only a batch not padded to the divisibility (e.g. a hand-made one); collate's already is.
            div = self.size_divisibility
            extra_h, extra_w = -images.shape[2] % div, -images.shape[3] % div
            if extra_h or extra_w:
                batch = F.pad(batch, (0, extra_w, 0, extra_h))
            for slot, (h, w) in zip(batch, sizes):
                slot[:, h:, :] = 0.0
                slot[:, :h, w:] = 0.0
            return batch, sizes
        if image_sizes is not None:
            raise ValueError("FasterRCNN: image_sizes is only accepted with a padded [B,3,H,W] batch tensor")
        images = self._checked_list(images)
        normalised = [(img.to(device=device, dtype=torch.float32) - self.pixel_mean) / self.pixel_std for img in images]
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        return pad_images(normalised, self.size_divisibility), sizes

    @staticmethod
    def _checked_sizes(images: Tensor, image_sizes: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
        if images.shape[1] != 3:
            raise ValueError(f"FasterRCNN: batch must be [B,3,H,W], got {tuple(images.shape)}")
        batch_hw = (images.shape[2], images.shape[3])
        if image_sizes is None:
            image_sizes = [batch_hw] * images.shape[0]
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"FasterRCNN: {len(image_sizes)} image_sizes for a batch of {images.shape[0]} images")
        if images.shape[0] == 0:
            raise ValueError("FasterRCNN: got an empty batch of images")
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        for i, (h, w) in enumerate(sizes):
            if not (0 < h <= batch_hw[0] and 0 < w <= batch_hw[1]):
                raise ValueError(f"FasterRCNN: image_sizes[{i}]={(h, w)} does not fit the batch size {batch_hw}")
        if not images.is_floating_point():
            raise ValueError(f"FasterRCNN: images must be floating point (0..255 values), got {images.dtype}")
        return sizes

    @staticmethod
    def _checked_list(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
        if isinstance(images, Tensor) and images.dim() == 3:
            images = [images]
        if len(images) == 0:
            raise ValueError("FasterRCNN: got an empty list of images")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"FasterRCNN: images[{i}] must be a float tensor [3,H,W] (RGB 0..255), got {shape}")
            if not img.is_floating_point():
                raise ValueError(f"FasterRCNN: images[{i}] must be floating point (0..255 values), got {img.dtype}")
        return list(images)
