"""Tests for fast_roi_pool: bit-exact against torchvision.ops.roi_pool (the reference) and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_pool

import detres.models.detection.fast_roi_pool as fast_module
from detres.models.detection.fast_roi_pool import _round_half_away, fast_roi_pool, single_thread_roi_pool
from detres.models.detection.roi_pooler import RoIPooler

FLT_MAX = torch.finfo(torch.float32).max
DEFAULT_MIN_VALUES = fast_module.MIN_VALUES_PER_ROI


@pytest.fixture(autouse=True)
def _always_fast(monkeypatch):
    """The tests use few channels, which would be handed to torchvision: force the fast path."""
    monkeypatch.setattr(fast_module, "MIN_VALUES_PER_ROI", 0)


def _count_reference_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(fast_module, "roi_pool", lambda *a: calls.append(1) or roi_pool(*a))
    return calls


def _random_rois(num: int, num_images: int, map_hw: tuple[int, int], scale: float, seed: int) -> torch.Tensor:
    """[num,5] RoIs in arbitrary image order: inside, partly and wholly outside, sub-cell, degenerate, .5 cases."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = map_hw[0] / scale, map_hw[1] / scale
    lo = torch.rand(num, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.4 - torch.tensor([img_w, img_h]) * 0.2
    size = torch.rand(num, 2, generator=g) ** 2 * torch.tensor([img_w, img_h])
    boxes = torch.cat([lo, lo + size], dim=1)
    n = num // 8
    boxes[:n, 2:] = boxes[:n, :2] + torch.rand(n, 2, generator=g) / scale * 0.9  # smaller than one cell
    boxes[n : 2 * n, 2:] = boxes[n : 2 * n, :2] - torch.rand(n, 2, generator=g) * 3 / scale  # x2 < x1, y2 < y1
    # Coordinates on exact halves of a cell (k + 0.5 after scaling, negative too): C round() and
    # torch.round disagree on every even k.
    halves = (torch.randint(-4, 2 * max(map_hw), (2 * n, 4), generator=g).float() + 0.5) / scale
    boxes[2 * n : 4 * n] = halves
    images = torch.randint(0, num_images, (num, 1), generator=g).float()
    return torch.cat([images, boxes], dim=1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so that -0.0 and 0.0 would count as different)."""
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _assert_same(features: torch.Tensor, rois: torch.Tensor, size, scale: float) -> None:
    ours = fast_roi_pool(features, rois, size, scale)
    ref = roi_pool(features, rois, size, scale)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert torch.equal(_bits(ours), _bits(ref)), f"{(ours != ref).sum().item()} of {ref.numel()} values differ"


@pytest.mark.parametrize("size", [4, 7, 8, 14, (7, 5)])
@pytest.mark.parametrize("scale", [1 / 16, 1 / 8, 1.0])
def test_equals_torchvision_on_random_rois(size, scale):
    torch.manual_seed(0)
    features = torch.randn(3, 6, 11, 17)
    _assert_same(features, _random_rois(200, 3, (11, 17), scale, seed=1), size, scale)


def test_half_coordinates_are_rounded_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999998, -0.4999999, 3.0])
    assert _round_half_away(x).tolist() == [1, 2, 3, -1, -2, -3, 2, 0, 3]
    # Each RoI sits on halves where torch.round (half to even) would pick another cell.
    features = torch.randn(1, 3, 9, 9)
    rois = torch.tensor([[0, 8.0, 40.0, 72.0, 104.0], [0, -8.0, 8.0, 40.0, 72.0], [0, 72.0, 8.0, 136.0, 136.0]])
    assert not torch.equal(torch.round(rois[:, 1:] / 16), _round_half_away(rois[:, 1:] / 16))
    _assert_same(features, rois, 3, 1 / 16)


@pytest.mark.parametrize("size", [7, 14])
def test_bins_follow_the_kernels_float32_arithmetic(size):
    # For these RoI lengths (in cells) ph * float32(L / P) misses the exact multiple of L / P, so an
    # exactly computed bin edge (e.g. adaptive pooling's integer formula) lands one cell off.
    lengths = torch.tensor([31, 57, 62])
    edges = torch.arange(size + 1)
    exact_end = -((-edges * lengths[:, None]) // size)
    float_end = torch.ceil(edges * (lengths[:, None].float() / size)).long()
    assert (exact_end != float_end).any()
    torch.manual_seed(0)
    features = torch.randn(2, 3, 70, 70)
    starts = torch.tensor([0.0, 3.0, 5.0])
    rois = [[i, s, s, s + length - 1, s + 2] for i in (0, 1) for s in starts.tolist() for length in lengths.tolist()]
    rois += [[0, s, s, s + 2, s + length - 1] for s in starts.tolist() for length in lengths.tolist()]
    _assert_same(features, torch.tensor(rois, dtype=torch.float32), size, 1.0)


def test_relu_ties_neg_infinity_and_channels_last_input():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 12, 10).relu()  # many equal zeros
    features[1, :, :4, :4] = float("-inf")  # the kernel starts from -FLT_MAX, so such bins give -FLT_MAX
    rois = torch.tensor([[1, 0.0, 0.0, 40.0, 40.0], [1, 0.0, 0.0, 120.0, 150.0], [0, 16.0, 16.0, 90.0, 100.0]])
    ref = roi_pool(features, rois, 4, 1 / 16)
    assert (ref == -FLT_MAX).any()
    _assert_same(features, rois, 4, 1 / 16)
    _assert_same(features.contiguous(memory_format=torch.channels_last), rois, 4, 1 / 16)


def test_float64_and_list_of_boxes():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 9, 13, dtype=torch.float64)
    boxes = [torch.tensor([[0.0, 0.0, 100.0, 60.0]], dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64) * 150]
    assert torch.equal(_bits(fast_roi_pool(features, boxes, 7, 1 / 16)), _bits(roi_pool(features, boxes, 7, 1 / 16)))


def test_zero_rois():
    features = torch.randn(2, 4, 9, 13)
    ours = fast_roi_pool(features, torch.zeros(0, 5), (7, 5), 1 / 16)
    assert ours.shape == (0, 4, 7, 5)
    assert torch.equal(ours, roi_pool(features, torch.zeros(0, 5), (7, 5), 1 / 16))


def test_grad_falls_back_to_torchvision(monkeypatch):
    calls = _count_reference_calls(monkeypatch)
    torch.manual_seed(0)
    features = torch.randn(2, 4, 9, 13, requires_grad=True)
    rois = _random_rois(30, 2, (9, 13), 1 / 16, seed=3)
    ours = fast_roi_pool(features, rois, 4, 1 / 16)
    assert ours.grad_fn is not None
    (grad,) = torch.autograd.grad(ours.square().sum(), features)
    ref = roi_pool(features, rois, 4, 1 / 16)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), features)
    assert torch.equal(ours, ref) and torch.equal(grad, ref_grad) and grad.abs().sum() > 0
    assert len(calls) == 1
    with torch.no_grad():  # no graph wanted: the fast path, same values
        _assert_same(features, rois, 4, 1 / 16)
    assert len(calls) == 1


def test_small_outputs_go_to_torchvision(monkeypatch):
    monkeypatch.setattr(fast_module, "MIN_VALUES_PER_ROI", DEFAULT_MIN_VALUES)
    calls = _count_reference_calls(monkeypatch)
    rois = torch.tensor([[0, 0.0, 0.0, 100.0, 100.0]])
    _assert_same(torch.randn(1, 16, 9, 9), rois, 4, 1 / 16)  # 16 * 4 * 4 values per RoI: the kernel
    assert len(calls) == 1
    _assert_same(torch.randn(1, 1024, 9, 9), rois, 4, 1 / 16)  # 1024 * 4 * 4: the fast path
    assert len(calls) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_pooler_uses_the_fast_path_with_the_same_values(fast, monkeypatch):
    import detres.models.detection.roi_pooler as roi_pooler_module

    calls = []
    monkeypatch.setattr(roi_pooler_module, "fast_roi_pool", lambda *a, **k: calls.append(1) or fast_roi_pool(*a, **k))
    features, boxes = torch.randn(2, 8, 10, 12), [torch.rand(7, 4) * 150, torch.rand(3, 4) * 150]
    pooled = RoIPooler(
        output_size=4, spatial_scale=1 / 16, pooler_type="roi_pool", sampling_ratio=0, fast_max_pool=fast
    )(features, boxes)
    assert len(calls) == int(fast)
    assert torch.equal(pooled, roi_pool(features, boxes, (4, 4), 1 / 16))
    assert pooled.is_contiguous(memory_format=torch.channels_last if fast else torch.contiguous_format)


def test_channels_last_output_has_the_same_values():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 11, 17)
    rois = _random_rois(60, 2, (11, 17), 1 / 16, seed=2)
    ours = fast_roi_pool(features, rois, (7, 5), 1 / 16, channels_last=True)
    assert ours.shape == (60, 6, 7, 5) and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_bits(ours), _bits(roi_pool(features, rois, (7, 5), 1 / 16)))
    assert fast_roi_pool(features, rois[:0], 7, 1 / 16, channels_last=True).shape == (0, 6, 7, 7)


def test_thread_count_is_changed_only_inside_single_thread_roi_pool(monkeypatch):
    """No process-wide setting changes inside a plain call; the caller's opt-in runs the loop at 1 thread, restored."""
    seen: list[int] = []
    pool_one = fast_module._pool_one
    monkeypatch.setattr(fast_module, "_pool_one", lambda *a: seen.append(torch.get_num_threads()) or pool_one(*a))
    features = torch.randn(1, 6, 11, 17)
    rois = _random_rois(8, 1, (11, 17), 1 / 16, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = fast_roi_pool(features, rois, 4, 1 / 16)
        assert set(seen) == {2} and torch.get_num_threads() == 2
        seen.clear()
        with single_thread_roi_pool():
            serial = fast_roi_pool(features, rois, 4, 1 / 16)
            assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        fast_roi_pool(features, rois, 4, 1 / 16)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(plain), _bits(serial))
    assert torch.equal(plain, roi_pool(features, rois, 4, 1 / 16))
