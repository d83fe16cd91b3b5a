"""Classification evaluation: top-k error with 1-crop, 10-crop and dense multi-scale testing.

Score averaging (ResNet Sec. 3.4 / AlexNet Sec. 4.1): 10-crop averages the softmax
probabilities of the 10 patches. The dense multi-scale test is the fully-convolutional form of
VGG / PReLU-net that ResNet Sec. 3.4 adopts: the net scores every window of the *training* size,
i.e. a k x k window of the last feature map where k x k is the map a training crop produces
(7 x 7 for a 224 crop of an ImageNet ResNet, 8 x 8 for a 32 crop of a CIFAR ResNet). The window
is average-pooled (``avg_pool2d``, kernel k, stride 1), ``model.fc`` is applied as a 1x1
convolution, and the softmax of each window is averaged over all windows and then over the
scales. A map smaller than k along a side is pooled over that whole side (a map smaller than k
in both sides: the global average). At the training scale (image = crop) there is exactly one
window, the net's own global pooling, so the dense test equals the 1-crop test. Softmax, not
logits, is averaged so every view contributes a distribution of the same scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from detres.data.transforms.classification import PAPER_TEST_SCALES, shorter_side_size

MODES = ("1crop", "10crop", "multiscale")


def _check_scores_targets(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    scores, targets = torch.as_tensor(scores), torch.as_tensor(targets)
    if scores.ndim != 2:
        raise ValueError(f"logits: expected [N, num_classes], got shape {tuple(scores.shape)}")
    if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(
            f"targets: expected [N] with N = {scores.shape[0]} to match logits, got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected integer class indices, got dtype {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(
            f"targets: class indices must lie in [0, {scores.shape[1] - 1}], "
            f"got range [{int(targets.min())}, {int(targets.max())}]"
        )
    return scores, targets


def topk_correct(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest scores, for each k.

    A k larger than the number of classes is clipped to it (everything is then correct).
    """
    scores, targets = _check_scores_targets(scores, targets)
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks: expected positive k values, got {tuple(ks)}")
    num_classes = scores.shape[1]
    kmax = min(max(int(k) for k in ks), num_classes)
    top = scores.topk(kmax, dim=1).indices
    hits = top.eq(targets.to(top.device)[:, None])
    return {int(k): int(hits[:, : min(int(k), num_classes)].any(dim=1).sum()) for k in ks}


def topk_errors(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k error rate in [0, 1] for each k (k clipped to the number of classes)."""
    _, targets = _check_scores_targets(logits, targets)
    n = targets.shape[0]
    if n == 0:
        raise ValueError("topk_errors: no samples")
    return {k: 1.0 - c / n for k, c in topk_correct(logits, targets, ks).items()}


def _linear_head(model: nn.Module) -> nn.Linear:
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(
            f"dense evaluation needs model.forward_features(x) -> [B, C, h, w] ({type(model).__name__} has none)"
        )
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"dense evaluation needs model.fc to be an nn.Linear, got {type(fc).__name__}")
    return fc


Window = int | tuple[int, int] | None  # k or (kh, kw) in feature-map cells; None = whole map


def _window_size(window, h: int, w: int) -> tuple[int, int]:
    """Window (in feature cells) clipped to an h x w map; None = the whole map."""
    if window is None:
        return h, w
    kh, kw = (window, window) if isinstance(window, int) else tuple(window)
    if int(kh) < 1 or int(kw) < 1:
        raise ValueError(f"window: expected positive sizes in feature-map cells, got {window!r}")
    return min(int(kh), h), min(int(kw), w)


def dense_logits(model: nn.Module, images: Tensor, window: Window = 1) -> Tensor:
    """Class logits of every ``window`` of the last feature map: [B, num_classes, h', w'].

    ``model.forward_features(images)`` [B, C, h, w] is average-pooled with a k x k kernel and
    stride 1 (``window`` = k or (kh, kw) in feature cells, clipped to the map: a side shorter than
    k is pooled whole; ``None`` = the whole map), then ``model.fc`` is applied as a 1x1 convolution,
    giving h' x w' = (h - kh + 1) x (w - kw + 1) windows. ``window=1`` scores every single position.
    """
    fc = _linear_head(model)
    features = model.forward_features(images)
    if features.ndim != 4 or features.shape[1] != fc.in_features:
        raise ValueError(
            f"forward_features returned shape {tuple(features.shape)}; expected [B, {fc.in_features}, h, w] "
            f"to match fc.in_features"
        )
    kernel = _window_size(window, *features.shape[-2:])
    if kernel != (1, 1):
        features = F.avg_pool2d(features, kernel_size=kernel, stride=1)
    return F.conv2d(features, fc.weight[:, :, None, None], fc.bias)


def dense_probs(model: nn.Module, images: Tensor, window: Window = 1) -> Tensor:
    """Softmax of every window of ``dense_logits``, averaged over the windows: [B, num_classes]."""
    return dense_logits(model, images, window).softmax(dim=1).mean(dim=(2, 3))


def feature_window(model: nn.Module, crop: int | tuple[int, int]) -> tuple[int, int]:
    """Size (kh, kw) of the last feature map for a ``crop`` x ``crop`` input: the training-size window.

    Measured by running ``model.forward_features`` on one blank crop (so padding and rounding of
    every stride are those of the real net): 7 x 7 for a 224 crop of an ImageNet ResNet, 2 x 2 for
    a 56 crop, 8 x 8 for a 32 crop of a CIFAR ResNet.
    """
    _linear_head(model)
    ch, cw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    if int(ch) < 1 or int(cw) < 1:
        raise ValueError(f"crop: expected a positive size in pixels, got {crop!r}")
    was_training = model.training
    model.eval()  # one blank image would break train-mode BN and must not touch its running statistics
    try:
        with torch.inference_mode():
            probe = torch.zeros((1, 3, int(ch), int(cw)), device=_model_device(model))
            h, w = model.forward_features(probe).shape[-2:]
    finally:
        model.train(was_training)
    return int(h), int(w)


def resize_tensor_shorter_side(image: Tensor, size: int) -> Tensor:
    """[3, H, W] -> [3, H', W'] with shorter side ``size`` (bilinear, antialiased when shrinking)."""
    h, w = image.shape[-2:]
    new_hw = shorter_side_size(h, w, size)
    if new_hw == (h, w):
        return image
    return F.interpolate(image[None], size=new_hw, mode="bilinear", align_corners=False, antialias=True)[0]


def _per_sample_views(images, scales: Sequence[int] | None) -> list[list[Tensor]]:
    """Normalise a multi-scale batch into one list of [3, H, W] views per sample.

    Accepted: a [B, 3, H, W] tensor or per-sample [3, H, W] tensors (resized here to ``scales``),
    per-sample lists of already-resized [3, H_s, W_s] tensors (``MultiScaleEvalTransform``), or
    the default collate of those (a list of [B, 3, H_s, W_s] tensors, one per scale).
    """

    def resized(image: Tensor) -> list[Tensor]:
        if image.ndim != 3:
            raise ValueError(f"multiscale: expected an image [3, H, W], got shape {tuple(image.shape)}")
        if not scales:
            raise ValueError("multiscale: samples are single images, so scales must name the shorter sides")
        return [resize_tensor_shorter_side(image, int(s)) for s in scales]

    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"multiscale: expected a batch [B, 3, H, W], got shape {tuple(images.shape)}")
        return [resized(img) for img in images]
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"multiscale: unexpected batch of type {type(images).__name__}")
    if all(isinstance(v, Tensor) and v.ndim == 4 for v in images):
        return [list(views) for views in zip(*[v.unbind(0) for v in images])]
    return [list(s) if isinstance(s, (list, tuple)) else resized(s) for s in images]


def _multiscale_scores(
    model: nn.Module, images, scales: Sequence[int] | None, device: torch.device, window: Window
) -> Tensor:
    samples = _per_sample_views(images, scales)
    num_views = len(samples[0])
    if num_views == 0 or any(len(v) != num_views for v in samples):
        raise ValueError(f"multiscale: every sample needs the same number of scales, got {[len(v) for v in samples]}")
    total = None
    for j in range(num_views):
        # Images of one scale with equal shapes (same aspect ratio) run as one batch.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, views in enumerate(samples):
            groups.setdefault(tuple(views[j].shape), []).append(i)
        for members in groups.values():
            probs = dense_probs(model, torch.stack([samples[i][j] for i in members]).to(device), window)
            if total is None:
                total = probs.new_zeros((len(samples), probs.shape[1]))
            total[members] += probs
    return total / num_views


def _batch_scores(model: nn.Module, images, mode: str, scales, device: torch.device, window: Window = None) -> Tensor:
    if mode == "multiscale":
        return _multiscale_scores(model, images, scales, device, window)
    if not isinstance(images, Tensor):
        raise ValueError(f"{mode}: expected a batch tensor, got {type(images).__name__}")
    images = images.to(device)
    if mode == "1crop":
        if images.ndim != 4:
            raise ValueError(f"1crop: expected a batch [B, 3, H, W], got shape {tuple(images.shape)}")
        return model(images).softmax(dim=1)
    if images.ndim != 5:
        raise ValueError(
            f"10crop: expected a batch [B, num_crops, 3, H, W] (use TenCropEvalTransform), "
            f"got shape {tuple(images.shape)}"
        )
    b, n = images.shape[:2]
    probs = model(images.flatten(0, 1)).softmax(dim=1)
    return probs.view(b, n, -1).mean(dim=1)


def _collate_lists(batch: list) -> tuple[list, Tensor]:
    images, targets = zip(*batch)
    return list(images), torch.as_tensor(targets, dtype=torch.int64)


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def evaluate_classifier(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    *,
    mode: str = "1crop",
    scales: Sequence[int] | None = PAPER_TEST_SCALES,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    topk: int = 5,
    crop: int | None = None,
) -> dict[str, float | int]:
    """Top-1 / top-k error of ``model`` over ``data`` (a dataset or loader yielding (images, targets)).

    The data's transform must match ``mode``: "1crop" images [3, H, W] (``CenterCropEvalTransform``),
    "10crop" [10, 3, H, W] (``TenCropEvalTransform``), "multiscale" either per-scale lists from
    ``MultiScaleEvalTransform`` (``scales`` then unused) or one full image [3, H, W] that is resized
    here to each of ``scales`` (bilinear). A loader for "multiscale" whose images differ in size
    needs a list collate. ``device=None`` uses the model's device; otherwise the model is moved.

    "multiscale" needs ``crop``, the training crop size in pixels: the dense test scores every
    window of the feature map that such a crop produces (``feature_window``), as in the paper.

    Returns ``{"top1_err", "top5_err", "n", "top5_k"}``; errors are fractions in [0, 1] and
    ``top5_k`` is ``min(topk, num_classes)``, the k actually used for "top5_err".
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "multiscale" and crop is None:
        raise ValueError(
            "multiscale: pass crop=<training crop size in pixels>; the dense test scores windows of the "
            "size a training crop covers on the last feature map (e.g. 224 -> 7x7 for an ImageNet ResNet)"
        )
    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        model.to(device)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        if len(data) == 0:
            raise ValueError("evaluate_classifier: the dataset is empty")
        data = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate_lists if mode == "multiscale" else None,
        )
    window = feature_window(model, crop) if mode == "multiscale" else None
    was_training = model.training
    model.eval()
    correct = {1: 0, int(topk): 0}
    n = 0
    num_classes = None
    try:
        with torch.inference_mode():
            for images, targets in data:
                targets = torch.as_tensor(targets, dtype=torch.int64)
                scores = _batch_scores(model, images, mode, scales, device, window).cpu()
                num_classes = scores.shape[1]
                for k, c in topk_correct(scores, targets, tuple(correct)).items():
                    correct[k] += c
                n += targets.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_classifier: the data yielded no samples")
    return {
        "top1_err": 1.0 - correct[1] / n,
        "top5_err": 1.0 - correct[int(topk)] / n,
        "n": n,
        "top5_k": min(int(topk), num_classes),
    }
