"""Tests for detres.inference.detect: original images in, the model's boxes out, dataset order, train mode restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from detres.data.collate import collate_detection
from detres.data.transforms.detection import build_det_transforms, finalize_sample
from detres.inference.detect import detect_batch, run_inference


class EchoDetector(nn.Module):
    """Stub detector: returns preset boxes per image and records what it was given."""

    def __init__(self, boxes_per_image: list[torch.Tensor]) -> None:
        super().__init__()
        self.boxes = boxes_per_image
        self.calls: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = []
        self.modes: list[bool] = []
        self.served = 0

    def forward(self, images, targets=None, image_sizes=None):
        self.calls.append((tuple(images.shape), list(image_sizes)))
        self.modes.append(self.training)
        out = []
        for _ in range(images.shape[0]):
            boxes = self.boxes[self.served]
            self.served += 1
            n = boxes.shape[0]
            out.append(
                {
                    "boxes": boxes.clone(),
                    "scores": torch.linspace(0.9, 0.5, n),
                    "labels": torch.ones(n, dtype=torch.int64),
                }
            )
        return out


def _sample(h: int, w: int, boxes: list[list[float]], image_id: int, transforms=None) -> dict:
    rng = np.random.default_rng(image_id)
    sample = {
        "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "boxes": np.asarray(boxes, np.float32),
        "labels": np.ones(len(boxes), np.int64),
        "image_id": image_id,
        "orig_size": (h, w),
        "file_name": f"img{image_id}.png",
    }
    return finalize_sample(sample, transforms)


def test_detect_batch_gives_the_model_the_original_images_and_keeps_its_boxes():
    # The detector resizes and maps back itself (detres.models.detection.transform); detect_batch passes the
    # original-size batch and returns the model's boxes as they are, float32 on the CPU, with the image ids.
    originals = [[[3.0, 5.0, 40.0, 60.0], [10.5, 0.0, 77.0, 48.0]], [[0.0, 0.0, 100.0, 30.0]]]
    a = _sample(60, 77, originals[0], 7)
    b = _sample(50, 100, originals[1], 9)
    model = EchoDetector([a["boxes"], b["boxes"]])
    dets = detect_batch(model, collate_detection([a, b]), torch.device("cpu"))
    assert [d["image_id"] for d in dets] == [7, 9]
    for det, boxes in zip(dets, originals):
        assert torch.equal(det["boxes"], torch.tensor(boxes))
    assert model.calls[0][1] == [(60, 77), (50, 100)]


def test_detect_batch_refuses_images_a_dataset_resized():
    resized = _sample(60, 77, [[3.0, 5.0, 40.0, 60.0]], 7, build_det_transforms(train=False, min_size=96, max_size=200))
    with pytest.raises(ValueError, match=r"img7\.png.*resized"):
        detect_batch(EchoDetector([torch.zeros(0, 4)]), collate_detection([resized]), torch.device("cpu"))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_run_inference_keeps_dataset_order_and_restores_training_mode():
    samples = [_sample(40 + 8 * i, 64, [[4.0 * i, 2.0, 30.0 + i, 20.0]], 100 + i) for i in range(5)]
    model = EchoDetector([s["boxes"] for s in samples])
    model.train()
    dets = run_inference(model, ListDataset(samples), device=torch.device("cpu"), batch_size=2, progress=False)
    assert model.training and model.modes == [False, False, False]  # batches of 2, 2, 1 in eval mode
    assert [d["image_id"] for d in dets] == [100, 101, 102, 103, 104]
    for i, det in enumerate(dets):
        torch.testing.assert_close(det["boxes"], torch.tensor([[4.0 * i, 2.0, 30.0 + i, 20.0]]), atol=1e-4, rtol=0)
        assert det["scores"].shape == (1,) and det["labels"].tolist() == [1]
