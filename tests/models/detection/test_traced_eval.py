"""The eval steps under torch.jit.trace (what export records): sizes stay traced, and where a CPU fast path cannot be
traced the portable op it stands for is taken, with the same result as the eager path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from detres.models.backbones.cpu_execution import routes_pointwise_to_onednn
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.context import image_cells
from detres.models.detection.roi_pooler import RoIPooler
from detres.models.detection.rpn import top_n_by_score
from tests.inference.conftest import tiny_detector


def _trace(fn, *example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(fn, example, check_trace=False)


def test_traced_roi_pool_is_torchvisions_kernel_with_the_fast_pools_values() -> None:
    pooler = RoIPooler(output_size=4, spatial_scale=1 / 16, pooler_type="roi_pool", sampling_ratio=0)
    features = torch.randn(1, 256, 9, 11)  # 256 * 4 * 4 values per RoI: the eager call takes the fast pool
    boxes = torch.tensor([[0.0, 0.0, 60.0, 40.0], [17.0, 5.0, 150.0, 130.0], [3.0, 9.0, 40.0, 100.0]])
    traced = _trace(lambda f, b: pooler(f, [b]), features, boxes)
    assert "torchvision::roi_pool" in str(traced.graph)
    more = torch.cat([boxes, boxes[:2] + 7.0])
    for b in (boxes, more):
        assert torch.equal(traced(features, b), pooler(features, [b]))


def test_traced_box_head_is_the_one_shot_call_of_the_chunked_eager_path() -> None:
    model = tiny_detector(0, roi_heads={"pooler_type": "roi_pool"}).requires_grad_(False)  # traced as constants
    heads = model.roi_heads
    heads.inference_roi_chunk = 2  # eager: chunks of 2 RoIs (8 per chunk at more threads: still several chunks)
    features = torch.randn(1, model.trunk.out_channels, 7, 9)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=generator) * 80
    rois = torch.cat([corners, corners + 8 + torch.rand(40, 2, generator=generator) * 60], dim=1)
    with torch.no_grad():
        traced = _trace(lambda f, r: heads.pooled_box_head(f, [r]), features, rois[:30])
        assert str(traced.graph).count("torchvision::roi_pool") == 1  # one call, not one per chunk
        for r in (rois[:30], rois):
            torch.testing.assert_close(traced(features, r), heads.pooled_box_head(features, [r]), rtol=0, atol=1e-5)


def test_traced_anchors_follow_the_feature_size() -> None:
    generator = AnchorGenerator(sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0), stride=16, offset=0.5)
    traced = _trace(lambda x: generator(tuple(x.shape[2:])), torch.zeros(1, 1, 5, 7))
    for hw in ((5, 7), (8, 3)):
        assert torch.equal(traced(torch.zeros(1, 1, *hw)), generator(hw))


def test_traced_pre_nms_top_n_follows_the_candidate_count() -> None:
    boxes, scores = torch.rand(12, 4), torch.rand(12)
    traced = _trace(lambda b, s: top_n_by_score(b, s, 5), boxes, scores)
    for n in (12, 3):  # more candidates than top_n: the best 5; fewer: all, as given
        got, want = traced(boxes[:n], scores[:n]), top_n_by_score(boxes[:n], scores[:n], 5)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert got[1].shape[0] == min(n, 5)


@pytest.mark.parametrize("scale", [1 / 16, 1 / 32, 1 / 14, 0.07])
def test_context_cells_are_ceil_of_the_image_size_times_the_scale(scale: float) -> None:
    features = torch.randn(1, 2, 40, 50)
    for height, width in ((1, 1), (16, 32), (17, 33), (223, 97), (2000, 2000)):
        cells, box = image_cells(features, torch.tensor([height, width]), scale)
        rows = min(max(math.ceil(height * scale - 1e-6), 1), 40)
        cols = min(max(math.ceil(width * scale - 1e-6), 1), 50)
        assert cells.shape == (1, 2, rows, cols)
        assert box.tolist() == [[0.0, 0.0, float(width), float(height)]]


def test_traced_context_cells_follow_the_image_size() -> None:
    def cells_of(image: torch.Tensor):
        features = image[None, :, ::16, ::16]
        image_hw = torch.stack([torch.as_tensor(image.shape[1]), torch.as_tensor(image.shape[2])])
        return image_cells(features, image_hw, 1 / 16)

    traced = _trace(cells_of, torch.zeros(2, 40, 50))
    for hw in ((40, 50), (70, 33)):
        image = torch.randn(2, *hw)
        assert all(torch.equal(a, b) for a, b in zip(traced(image), cells_of(image)))


def test_traced_pointwise_convs_keep_the_plain_route() -> None:
    """The oneDNN routing of 1x1 convs is the exporting CPU's choice: a trace records the plain conv."""
    conv, x = nn.Conv2d(64, 64, 1, bias=False), torch.randn(1, 64, 20, 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert routes_pointwise_to_onednn(conv, x)
        seen: list[bool] = []
        _trace(lambda t: seen.append(routes_pointwise_to_onednn(conv, t)) or t + 1, x)
        assert seen == [False]
    finally:
        torch.set_num_threads(threads)
