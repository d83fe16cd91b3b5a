"""Inference on RGB numpy images with a trained detector (which resizes them and answers in their pixels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detres.data.collate import collate_detection
from detres.data.transforms.detection import finalize_sample
from detres.inference.detect import detect_batch
from detres.inference.test_config import TestConfig
from detres.models.build import load_detector


class Predictor:
    """Run a train_det checkpoint on RGB images given as numpy arrays.

    Each image goes to the detector as it is; the detector resizes it to its test scale (the checkpoint's
    config) and returns boxes in the input image's pixels (0-based continuous xyxy, clipped to the image).

    Args:
        checkpoint: a train_det checkpoint (``model_final.pt`` or ``last.pt``).
        device: torch device for the forward pass.
        amp: forward passes under float16 CUDA autocast (ignored off CUDA; results stay float32).
    """

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", *, amp: bool = False) -> None:
        model, meta = load_detector(checkpoint, device=device)
        self._setup(model, meta, torch.device(device), amp)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, meta: dict[str, Any], device: torch.device | str = "cpu", *, amp: bool = False
    ) -> Predictor:
        """A predictor around an already built detector and its metadata (as returned by ``load_detector``)."""
        if "class_names" not in meta:
            raise ValueError("Predictor: detector metadata lacks ['class_names']")
        predictor = cls.__new__(cls)
        predictor._setup(model.to(device), meta, torch.device(device), amp)
        return predictor

    def _setup(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device, amp: bool) -> None:
        self.model = model.eval()
        self.meta = meta
        self.device = device
        self.amp = bool(amp)  # float16 CUDA autocast in predict / predict_batch (no-op off CUDA)
        # the test configuration of predict / predict_batch (see detres.inference.test_config)
        self.options = TestConfig()
        self.ensemble: list[torch.nn.Module] = []  # further members besides self.model (an ensemble)
        self.class_names: list[str] = [str(n) for n in meta["class_names"]]

    def predict(self, image_rgb: np.ndarray, *, score_thresh: float = 0.0) -> dict[str, Any]:
        """Detections on one RGB image (uint8 or 0..255 float, [H, W, 3]) scoring at least ``score_thresh``.

        Returns ``{"boxes": float32 [N, 4] xyxy in the image's pixels, "scores": float32 [N],
        "labels": int64 [N] (1..K), "class_names": list of N names}``, sorted by decreasing score.
        """
        return self.predict_batch([image_rgb], score_thresh=score_thresh)[0]

    def predict_batch(self, images_rgb: Sequence[np.ndarray], *, score_thresh: float = 0.0) -> list[dict[str, Any]]:
        """:meth:`predict` for several images in one padded forward pass."""
        if len(images_rgb) == 0:
            return []
        samples = [self._sample(i, image) for i, image in enumerate(images_rgb)]
        outputs = detect_batch(
            [self.model, *self.ensemble], collate_detection(samples), self.device, options=self.options, amp=self.amp
        )
        return [self._to_result(det, score_thresh) for det in outputs]

    def _sample(self, index: int, image: Any) -> dict[str, Any]:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            got = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"Predictor: image {index} must be a numpy RGB array [H, W, 3], got {got}")
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
                raise ValueError(f"Predictor: image {index} must be uint8 or finite float (0..255), got {image.dtype}")
            image = image.astype(np.float32)  # values stay on the 0..255 scale the model expects
        sample = {
            "image": np.ascontiguousarray(image),
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int64),
            "image_id": index,
            "orig_size": tuple(image.shape[:2]),
            "file_name": f"<image {index}>",
        }
        return finalize_sample(sample, None)

    def _to_result(self, det: dict[str, Any], score_thresh: float) -> dict[str, Any]:
        keep = det["scores"] >= score_thresh
        boxes = det["boxes"][keep].numpy().astype(np.float32).reshape(-1, 4)
        scores = det["scores"][keep].numpy().astype(np.float32)
        labels = det["labels"][keep].numpy().astype(np.int64)
        names = [
            self.class_names[label - 1] if 1 <= label <= len(self.class_names) else str(label)
            for label in labels.tolist()
        ]
        return {"boxes": boxes, "scores": scores, "labels": labels, "class_names": names}
