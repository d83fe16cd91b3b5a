"""Classification train/test transforms of ResNet Sec. 3.4 / 4.2 and AlexNet Sec. 4.1 (OpenCV + numpy).

Inputs are RGB images [H, W, 3] (uint8 0..255, as ``read_image_rgb`` returns them); outputs are
normalised float32 CHW tensors. All randomness of one transform (scale, crop, flip, colour
noise) comes from one seedable, DataLoader-worker-aware numpy generator, and the drawn
parameters are exposed (``sample_params``), so the geometry is plain OpenCV/numpy slicing
rather than an albumentations pipeline with its own random state.

Normalisation (``Normalize``) works on 0..255 values: subtract either the per-pixel mean image
(the papers' choice; it has the crop's size) or a per-channel mean, then optionally divide by a
per-channel std (off in the papers; needed for checkpoints trained with ImageNet mean/std such as
the shared CIFAR ResNets: ``mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB`` of ``imagenet_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from detres.data.transforms.color_pca import PCAColorNoise, WorkerSeededRNG

# ResNet Sec. 3.4: shorter sides used by the dense multi-scale test.
PAPER_TEST_SCALES: tuple[int, ...] = (224, 256, 384, 480, 640)


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got shape {image.shape}")
    return image


def _positive_int(value: int, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side exactly ``size`` and the aspect ratio kept (rounded)."""
    if height <= width:
        return size, max(1, int(round(width * size / height)))
    return max(1, int(round(height * size / width))), size


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size``; area filter when shrinking, bilinear when enlarging."""
    image = _check_image(image, "resize_shorter_side")
    h, w = image.shape[:2]
    new_h, new_w = shorter_side_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return image
    interpolation = cv2.INTER_AREA if new_h * new_w < h * w else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window (top/left offsets rounded down)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The 10 patches [10, size, size, 3] of ``image`` itself: top-left, top-right, bottom-left,
    bottom-right, centre, then the horizontal flips of those five in the same order.

    AlexNet's 10-crop takes them from a square image; ``TenCropEvalTransform`` first cuts the
    central square (``center_square``) of a non-square one."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"ten_crop: image {h}x{w} is smaller than the crop {size}x{size}")
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = np.stack([image[top : top + size, left : left + size] for top, left in corners])
    return np.concatenate([crops, crops[:, :, ::-1]], axis=0)


def center_square(image: np.ndarray) -> np.ndarray:
    """Central min(H, W) x min(H, W) patch (AlexNet Sec. 2: "cropped out the central 256x256 patch")."""
    h, w = image.shape[:2]
    return center_crop(image, min(h, w))


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] array -> contiguous float32 tensor [..., 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.float32), -1, -3)))


class Normalize:
    """Subtract a per-pixel mean image [H, W, 3] or a per-channel mean (3,), then divide by std.

    Exactly one of ``mean_image`` / ``mean`` must be given; ``std`` (3,) is optional.
    """

    def __init__(
        self,
        *,
        mean_image: np.ndarray | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if (mean_image is None) == (mean is None):
            raise ValueError("Normalize: give exactly one of mean_image (per-pixel) or mean (per-channel)")
        self.mean_image = None if mean_image is None else np.asarray(mean_image, dtype=np.float32)
        if self.mean_image is not None and (self.mean_image.ndim != 3 or self.mean_image.shape[2] != 3):
            raise ValueError(f"mean_image: expected an array [H, W, 3], got shape {self.mean_image.shape}")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        if self.mean is not None and self.mean.shape != (3,):
            raise ValueError(f"mean: expected 3 per-channel values, got shape {self.mean.shape}")
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        if self.std is not None and (self.std.shape != (3,) or np.any(self.std <= 0)):
            raise ValueError(f"std: expected 3 positive per-channel values, got {std!r}")

    @property
    def per_pixel(self) -> bool:
        return self.mean_image is not None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """[..., H, W, 3] float32 (a stack of crops is fine) -> normalised float32."""
        image = np.asarray(image, dtype=np.float32)
        if self.mean_image is not None:
            if image.shape[-3:] != self.mean_image.shape:
                raise ValueError(
                    f"Normalize: the per-pixel mean image is {self.mean_image.shape[:2]} but the input "
                    f"is {image.shape[-3:-1]}; compute the mean image at the crop size or use a per-channel mean"
                )
            out = image - self.mean_image
        else:
            out = image - self.mean
        if self.std is not None:
            out = out / self.std
        return out

    def __repr__(self) -> str:
        kind = f"mean_image={self.mean_image.shape}" if self.per_pixel else f"mean={self.mean.tolist()}"
        std = None if self.std is None else self.std.tolist()
        return f"Normalize({kind}, std={std})"


class _RandomCropTrainTransform:
    """Shared driver of the training transforms: draw parameters, crop/flip, colour noise, normalise.

    Subclasses provide ``sample_params(h, w, rng)`` and ``crop_and_flip(image, **params)``; one generator
    (``rng``, a WorkerSeededRNG) drives every draw.
    """

    def __init__(
        self,
        *,
        normalize: Normalize,
        crop: int,
        hflip_prob: float,
        color_noise: PCAColorNoise | None,
        seed: int | None,
    ) -> None:
        self.crop = _positive_int(crop, "crop")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob: expected a probability in [0, 1], got {hflip_prob}")
        self.hflip_prob = float(hflip_prob)
        self.color_noise = color_noise
        self.normalize = normalize
        self.rng = WorkerSeededRNG(seed)

    def _draw_window(self, rng: np.random.Generator, height: int, width: int) -> dict:
        """Draw {top, left, flip}: a ``crop`` x ``crop`` window of a height x width image and the flip."""
        top = int(rng.integers(0, height - self.crop + 1))
        left = int(rng.integers(0, width - self.crop + 1))
        return {"top": top, "left": left, "flip": bool(rng.random() < self.hflip_prob)}

    def set_random_seed(self, seed: int) -> None:
        """Re-seed all draws (scale/pad offsets, flip, colour noise), e.g. per (epoch, index)."""
        self.rng.reseed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = _check_image(image, type(self).__name__)
        rng = self.rng.generator()
        out = self.crop_and_flip(image, **self.sample_params(*image.shape[:2], rng=rng))
        if self.color_noise is not None:
            out = self.color_noise(out, rng)
        return to_chw_tensor(self.normalize(out))


class ScaleAugmentTrainTransform(_RandomCropTrainTransform):
    """ResNet ImageNet training augmentation (Sec. 3.4).

    Shorter side resized to s ~ U{scale_min..scale_max}, a random ``crop`` x ``crop`` window,
    horizontal flip with probability ``hflip_prob``, optional PCA colour noise, normalisation.
    """

    def __init__(
        self,
        *,
        normalize: Normalize,
        scale_min: int = 256,
        scale_max: int = 480,
        crop: int = 224,
        hflip_prob: float = 0.5,
        color_noise: PCAColorNoise | None = None,
        seed: int | None = None,
    ) -> None:
        self.scale_min = _positive_int(scale_min, "scale_min")
        self.scale_max = _positive_int(scale_max, "scale_max")
        super().__init__(normalize=normalize, crop=crop, hflip_prob=hflip_prob, color_noise=color_noise, seed=seed)
        if self.scale_max < self.scale_min:
            raise ValueError(f"scale_max ({scale_max}) must be >= scale_min ({scale_min})")
        if self.scale_min < self.crop:
            raise ValueError(f"scale_min ({scale_min}) must be >= crop ({crop}) so a crop always fits")

    def sample_params(self, height: int, width: int, rng: np.random.Generator | None = None) -> dict:
        """Draw {scale, top, left, flip} for an image of the given size (top/left in the resized image)."""
        rng = self.rng.generator() if rng is None else rng
        scale = int(rng.integers(self.scale_min, self.scale_max + 1))
        return {"scale": scale, **self._draw_window(rng, *shorter_side_size(height, width, scale))}

    def crop_and_flip(self, image: np.ndarray, *, scale: int, top: int, left: int, flip: bool) -> np.ndarray:
        """Geometric part for given parameters -> float32 [crop, crop, 3]."""
        image = resize_shorter_side(image, scale)
        out = image[top : top + self.crop, left : left + self.crop]
        return (out[:, ::-1] if flip else out).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scale=[{self.scale_min}, {self.scale_max}], crop={self.crop}, "
            f"hflip_prob={self.hflip_prob}, color_noise={self.color_noise!r}, normalize={self.normalize!r})"
        )


class PadCropTrainTransform(_RandomCropTrainTransform):
    """ResNet CIFAR-10 augmentation (Sec. 4.2): pad ``pad`` pixels on each side, random
    ``crop`` x ``crop`` window, horizontal flip. Padding uses ``fill`` on the raw 0..255 image
    (0 = black, as torchvision's RandomCrop(padding=4) does), before normalisation.
    """

    def __init__(
        self,
        *,
        normalize: Normalize,
        pad: int = 4,
        crop: int = 32,
        hflip_prob: float = 0.5,
        fill: float = 0.0,
        color_noise: PCAColorNoise | None = None,
        seed: int | None = None,
    ) -> None:
        if int(pad) != pad or pad < 0:
            raise ValueError(f"pad: expected a non-negative integer, got {pad!r}")
        self.pad = int(pad)
        super().__init__(normalize=normalize, crop=crop, hflip_prob=hflip_prob, color_noise=color_noise, seed=seed)
        self.fill = float(fill)

    def sample_params(self, height: int, width: int, rng: np.random.Generator | None = None) -> dict:
        """Draw {top, left, flip} for an image of the given size (top/left in the padded image)."""
        rng = self.rng.generator() if rng is None else rng
        h, w = height + 2 * self.pad, width + 2 * self.pad
        if h < self.crop or w < self.crop:
            raise ValueError(f"{type(self).__name__}: padded image {h}x{w} is smaller than the crop {self.crop}")
        return self._draw_window(rng, h, w)

    def crop_and_flip(self, image: np.ndarray, *, top: int, left: int, flip: bool) -> np.ndarray:
        """Geometric part for given parameters -> float32 [crop, crop, 3]."""
        p = self.pad
        padded = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_CONSTANT, value=(self.fill,) * 3)
        out = padded[top : top + self.crop, left : left + self.crop]
        return (out[:, ::-1] if flip else out).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad={self.pad}, crop={self.crop}, hflip_prob={self.hflip_prob}, "
            f"fill={self.fill}, normalize={self.normalize!r})"
        )


class CenterCropEvalTransform:
    """1-crop test: shorter side to ``resize``, central ``crop``. ``resize=None`` keeps the size and
    ``crop=None`` keeps the whole image (CIFAR: "the single view of the original 32x32 image")."""

    def __init__(self, *, normalize: Normalize, resize: int | None = 256, crop: int | None = 224) -> None:
        self.resize = None if resize is None else _positive_int(resize, "resize")
        self.crop = None if crop is None else _positive_int(crop, "crop")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop ({crop}) must be <= resize ({resize})")
        self.normalize = normalize

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = _check_image(image, type(self).__name__)
        if self.resize is not None:
            image = resize_shorter_side(image, self.resize)
        if self.crop is not None:
            image = center_crop(image, self.crop)
        return to_chw_tensor(self.normalize(image.astype(np.float32)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, normalize={self.normalize!r})"


class TenCropEvalTransform:
    """10-crop test (AlexNet Sec. 4.1, used by ResNet Sec. 3.4): shorter side to ``resize``, then the
    central ``resize`` x ``resize`` square (AlexNet's 256x256 image), then its 4 corner + centre
    ``crop`` patches and their horizontal flips -> [10, 3, crop, crop]. For a 256x341 image the
    corners are those of columns 42..297, not of the whole 341-wide rectangle. ``resize=None``
    keeps the size and uses the central min(H, W) square. A per-pixel mean image is subtracted
    in each patch's own frame, as in training."""

    def __init__(self, *, normalize: Normalize, resize: int | None = 256, crop: int = 224) -> None:
        self.resize = None if resize is None else _positive_int(resize, "resize")
        self.crop = _positive_int(crop, "crop")
        if self.resize is not None and self.crop > self.resize:
            raise ValueError(f"crop ({crop}) must be <= resize ({resize})")
        self.normalize = normalize

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = _check_image(image, type(self).__name__)
        if self.resize is not None:
            image = resize_shorter_side(image, self.resize)
        crops = ten_crop(center_square(image), self.crop).astype(np.float32)
        return to_chw_tensor(self.normalize(crops))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, normalize={self.normalize!r})"


class MultiScaleEvalTransform:
    """Dense multi-scale test input (ResNet Sec. 3.4): the whole image resized so its shorter side
    is each of ``scales`` -> list of [3, H_s, W_s] tensors. The per-pixel mean image has a fixed
    size, so this needs a per-channel mean (e.g. ``PixelStats.channel_mean``)."""

    def __init__(self, *, normalize: Normalize, scales: Sequence[int] = PAPER_TEST_SCALES) -> None:
        if normalize.per_pixel:
            raise ValueError(
                "MultiScaleEvalTransform: full images of varying size cannot use a per-pixel mean image; "
                "pass Normalize(mean=<per-channel mean>)"
            )
        if len(scales) == 0:
            raise ValueError("scales: expected at least one shorter-side size")
        self.scales = tuple(_positive_int(s, "scales") for s in scales)
        self.normalize = normalize

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        image = _check_image(image, type(self).__name__)
        return [to_chw_tensor(self.normalize(resize_shorter_side(image, s).astype(np.float32))) for s in self.scales]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scales={self.scales}, normalize={self.normalize!r})"


def train_transform_for_kind(kind: str = "imagenet", **kwargs) -> ScaleAugmentTrainTransform | PadCropTrainTransform:
    """``kind="imagenet"``: scale augmentation (Sec. 3.4); ``kind="cifar"``: pad-4 crop-32 (Sec. 4.2).
    Keyword arguments go to the chosen class."""
    if kind == "imagenet":
        return ScaleAugmentTrainTransform(**kwargs)
    if kind == "cifar":
        return PadCropTrainTransform(**kwargs)
    raise ValueError(f"kind: expected 'imagenet' or 'cifar', got {kind!r}")


def eval_transform_for_mode(
    mode: str = "1crop", **kwargs
) -> CenterCropEvalTransform | TenCropEvalTransform | MultiScaleEvalTransform:
    """Test-time transform for ``evaluate_classifier``'s ``mode`` ("1crop", "10crop", "multiscale")."""
    if mode == "1crop":
        return CenterCropEvalTransform(**kwargs)
    if mode == "10crop":
        return TenCropEvalTransform(**kwargs)
    if mode == "multiscale":
        return MultiScaleEvalTransform(**kwargs)
    raise ValueError(f"mode: expected '1crop', '10crop' or 'multiscale', got {mode!r}")
