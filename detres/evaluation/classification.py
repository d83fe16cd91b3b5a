"""Classification evaluation: top-k error with 1-crop, 10-crop and dense multi-scale testing.

Score averaging (ResNet Sec. 3.4 / AlexNet Sec. 4.1): 10-crop averages the softmax
probabilities of the 10 patches; the dense multi-scale test applies ``model.fc`` at every
position of ``model.forward_features`` (a 1x1 convolution), takes the softmax at each position,
averages the probabilities over positions and then over scales. Softmax, not logits, is
averaged so every view contributes a distribution of the same scale.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from detres.data.cls_transforms import PAPER_TEST_SCALES, shorter_side_size

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
        raise TypeError(f"dense evaluation needs model.forward_features(x) -> [B, C, h, w] ({type(model).__name__} has none)")
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"dense evaluation needs model.fc to be an nn.Linear, got {type(fc).__name__}")
    return fc


def dense_logits(model: nn.Module, images: Tensor) -> Tensor:
    """Class logits at every position of the last feature map: [B, num_classes, h, w].

    ``model.fc`` is applied as a 1x1 convolution to ``model.forward_features(images)``.
    """
    fc = _linear_head(model)
    features = model.forward_features(images)
    if features.ndim != 4 or features.shape[1] != fc.in_features:
        raise ValueError(
            f"forward_features returned shape {tuple(features.shape)}; expected [B, {fc.in_features}, h, w] "
            f"to match fc.in_features"
        )
    logits = torch.einsum("bchw,kc->bkhw", features, fc.weight)
    if fc.bias is not None:
        logits = logits + fc.bias[None, :, None, None]
    return logits


def dense_probs(model: nn.Module, images: Tensor) -> Tensor:
    """Softmax at every position of ``dense_logits``, averaged over positions: [B, num_classes]."""
    return dense_logits(model, images).softmax(dim=1).mean(dim=(2, 3))


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


def _multiscale_scores(model: nn.Module, images, scales: Sequence[int] | None, device: torch.device) -> Tensor:
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
        for shape, members in groups.items():
            probs = dense_probs(model, torch.stack([samples[i][j] for i in members]).to(device))
            if total is None:
                total = probs.new_zeros((len(samples), probs.shape[1]))
            total[members] += probs
    return total / num_views


def _batch_scores(model: nn.Module, images, mode: str, scales, device: torch.device) -> Tensor:
    if mode == "multiscale":
        return _multiscale_scores(model, images, scales, device)
    if not isinstance(images, Tensor):
        raise ValueError(f"{mode}: expected a batch tensor, got {type(images).__name__}")
    images = images.to(device)
    if mode == "1crop":
        if images.ndim != 4:
            raise ValueError(f"1crop: expected a batch [B, 3, H, W], got shape {tuple(images.shape)}")
        return model(images).softmax(dim=1)
    if images.ndim != 5:
        raise ValueError(
            f"10crop: expected a batch [B, num_crops, 3, H, W] (use TenCropEvalTransform), got shape {tuple(images.shape)}"
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
) -> dict[str, float | int]:
    """Top-1 / top-k error of ``model`` over ``data`` (a dataset or loader yielding (images, targets)).

    The data's transform must match ``mode``: "1crop" images [3, H, W] (``CenterCropEvalTransform``),
    "10crop" [10, 3, H, W] (``TenCropEvalTransform``), "multiscale" either per-scale lists from
    ``MultiScaleEvalTransform`` (``scales`` then unused) or one full image [3, H, W] that is resized
    here to each of ``scales`` (bilinear). A loader for "multiscale" whose images differ in size
    needs a list collate. ``device=None`` uses the model's device; otherwise the model is moved.

    Returns ``{"top1_err", "top5_err", "n", "top5_k"}``; errors are fractions in [0, 1] and
    ``top5_k`` is ``min(topk, num_classes)``, the k actually used for "top5_err".
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
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
    was_training = model.training
    model.eval()
    correct = {1: 0, int(topk): 0}
    n = 0
    num_classes = None
    try:
        with torch.inference_mode():
            for images, targets in data:
                targets = torch.as_tensor(targets, dtype=torch.int64)
                scores = _batch_scores(model, images, mode, scales, device).cpu()
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
