"""Tiny randomly initialised detectors shared by the test-time pipeline tests (eval mode, seeded)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_configs import build_test_detector


def tiny_detector(
    seed: int = 0,
    *,
    global_context: bool = False,
    num_classes: int = 3,
    roi_heads: dict | None = None,
    test_scale: tuple[int, int] = (96, 128),
    **kwargs,
) -> torch.nn.Module:
    """A ResNet-18 (width 8) C4 detector with roi_align 4x4 and 30 test proposals, in eval mode; ``roi_heads`` and
    ``kwargs`` override its ``model`` config tree (and ``class_agnostic_bbox``). Its default test scale (96, at most
    128) leaves the first of :func:`images` at its size and resizes the second (112x80 -> 128x91)."""
    torch.manual_seed(seed)
    heads = {"pooler_type": "roi_align", "pooler_resolution": 4, "sampling_ratio": 2, "score_thresh": 0.01}
    model = build_test_detector(
        num_classes,
        test_scale=test_scale,
        **{
            "depth": 18,
            "base_width": 8,
            "anchor_sizes": [16, 32, 64],
            "pixel_std": [1.0, 1.0, 1.0],
            "rpn": {"pre_nms_top_n_test": 200, "post_nms_top_n_test": 30},
            "roi_heads": {**heads, "global_context": global_context, **(roi_heads or {})},
            **kwargs,
        },
    )
    with torch.no_grad():  # class scores that differ between RoIs (the default init gives ~uniform ones)
        model.roi_heads.predictor.cls_score.weight.normal_(std=0.5)
        model.roi_heads.predictor.bbox_pred.weight.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="package")
def detector() -> torch.nn.Module:
    return tiny_detector(0)


@pytest.fixture(scope="package")
def context_detector() -> torch.nn.Module:
    return tiny_detector(1, global_context=True)


@pytest.fixture(scope="package")
def images() -> list[torch.Tensor]:
    """Two 0..255 images of different sizes (the batch gets padded)."""
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 128, generator=g) * 255, torch.rand(3, 112, 80, generator=g) * 255]
