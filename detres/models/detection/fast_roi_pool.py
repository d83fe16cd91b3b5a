"""Fast CPU RoI max pooling: torchvision's ``roi_pool`` bins, reduced on a channels-last copy with torch ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor
from torchvision.ops import roi_pool

__all__ = ["fast_roi_pool", "roi_bins", "single_thread_roi_pool"]

# Below this many pooled values per RoI (C * Ph * Pw) the serial kernel is about as fast as the dozen
# torch calls this path spends per RoI, so such RoIs go to torchvision. Measured speed-ups (1 thread,
# benchmarks/bench_roi_pool.py, contiguous / channels-last output): 256x4x4 0.99x / 1.25x,
# 128x8x8 1.20x / 1.67x, 512x4x4 1.37x / 1.84x, 1024x14x14 in chunks of 32: 3.1x / 4.2x.
MIN_VALUES_PER_ROI = 4096

_SINGLE_THREAD_LOOP: ContextVar[bool] = ContextVar("single_thread_roi_pool", default=False)


def _round_half_away(x: Tensor) -> Tensor:
    """C ``round()``: halves go away from zero (torch.round goes to even). Exact: x - trunc(x) is representable."""
    whole = torch.trunc(x)
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5).to(x.dtype)


def _axis_bins(start: Tensor, end: Tensor, pooled: int, size: int) -> tuple[Tensor, Tensor]:
    """[K] quantised RoI start/end -> clipped bin starts and ends [K, pooled], as torchvision's kernel computes them."""
    dtype = torch.float64 if start.dtype == torch.float64 else torch.float32
    start, end = start.to(torch.int64), end.to(torch.int64)
    length = torch.clamp(end - start + 1, min=1).to(dtype)  # malformed RoIs become one cell
    bin_size = (length / pooled)[:, None]  # the same single division (in T) as the kernel
    steps = torch.arange(pooled + 1, dtype=dtype)
    lo = torch.floor(steps[:-1] * bin_size).to(torch.int64) + start[:, None]
    hi = torch.ceil(steps[1:] * bin_size).to(torch.int64) + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def roi_bins(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bin bounds of every RoI: (row_lo, row_hi [K,Ph], col_lo, col_hi [K,Pw]); a bin is empty where hi <= lo."""
    # The kernel multiplies in the feature dtype T: scale is cast to T before the product.
    scaled = rois[:, 1:] * torch.tensor(spatial_scale, dtype=rois.dtype)
    q = _round_half_away(scaled)
    row_lo, row_hi = _axis_bins(q[:, 1], q[:, 3], output_size[0], height)
    col_lo, col_hi = _axis_bins(q[:, 0], q[:, 2], output_size[1], width)
    return row_lo, row_hi, col_lo, col_hi


def _bin_indices(lo: Tensor, hi: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """Cells to gather [K, P, M] (each bin's last cell repeated up to the longest bin M, empty bins -> the
    zero pad cell) and each RoI's longest bin [K] (M is per RoI: small RoIs gather less)."""
    lengths = (hi - lo).clamp(min=0)
    spans = lengths.amax(dim=1).clamp(min=1)
    idx = torch.minimum(lo[:, :, None] + torch.arange(int(spans.max())), (hi - 1)[:, :, None])
    return torch.where((lengths > 0)[:, :, None], idx, torch.full_like(idx, pad)), spans


def _per_roi(idx: Tensor, spans: Tensor) -> list[Tensor]:
    """[K, P, M] -> K flat [P * M_k] index tensors, cut up front (one copy per M) so the loop indexes nothing."""
    by_span = {m: idx[:, :, :m].reshape(idx.shape[0], -1).unbind(0) for m in spans.unique().tolist()}
    return [by_span[m][k] for k, m in enumerate(spans.tolist())]


def _as_roi_tensor(rois: Tensor | Sequence[Tensor]) -> Tensor:
    """torchvision's two box formats -> [K,5] (batch index, x1, y1, x2, y2)."""
    if isinstance(rois, Tensor):
        return rois
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(rois)])


def _needs_reference(features: Tensor, rois: Tensor, size: tuple[int, int]) -> bool:
    """Cases the fast path does not cover or does not speed up: autograd, GPUs, other dtypes or layouts
    (torchvision handles or rejects them), small pooled outputs."""
    return (
        (features.requires_grad and torch.is_grad_enabled())
        or (features.dim() == 4 and features.shape[1] * size[0] * size[1] < MIN_VALUES_PER_ROI)
        or features.device.type != "cpu"
        or features.dtype not in (torch.float32, torch.float64)
        or rois.dtype != features.dtype
        or features.dim() != 4
        or rois.dim() != 2
        or rois.shape[1] != 5
    )


def fast_roi_pool(
    features: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float,
    *,
    channels_last: bool = False,
) -> Tensor:
    """RoI max pooling equal to ``torchvision.ops.roi_pool`` (same bins, same values), several times faster on CPU.

    features [B,C,H,W]; rois [K,5] (batch index, x1, y1, x2, y2) or B tensors [Ni,4], as torchvision
    takes them -> [K,C,Ph,Pw], contiguous, or with ``channels_last`` in channels-last memory format
    (same values, no final transposes; the fallbacks below return torchvision's contiguous tensor
    as it is, since a format is only a speed hint). The serial kernel walks each channel plane per
    bin; here one channels-last copy of the map (zero-padded by one row and column, which empty bins
    read) lets every gather and max move whole C-vectors: per RoI the bin rows are gathered and
    maxed, then the bin columns.

    Falls back to torchvision's kernel (the reference the tests compare against) when autograd is
    needed (``features.requires_grad`` with grad mode on: this path has no backward), on non-CPU
    devices, for dtypes or shapes it does not cover, and when C * Ph * Pw < ``MIN_VALUES_PER_ROI``
    (there the kernel is as fast). Differences: a NaN in a bin gives NaN here, whereas the kernel
    skips NaNs; a bin whose maximum is a zero holding both -0.0 and 0.0 may get the other sign.
    """
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = _as_roi_tensor(rois)
    if _needs_reference(features, rois, size):
        return roi_pool(features, rois, size, spatial_scale)
    num_rois, channels = rois.shape[0], features.shape[1]
    if channels_last:  # [K, Ph*Pw, C] rows, seen as [K,C,Ph,Pw]
        out = features.new_empty(num_rois, size[0] * size[1], channels)
        view = out.view(num_rois, *size, channels).permute(0, 3, 1, 2)
    else:
        out = features.new_empty(num_rois, channels, size[0] * size[1])
        view = out.view(num_rois, channels, *size)
    if num_rois == 0 or channels == 0:
        return view.zero_()
    _pool_into(out.unbind(0), features, rois, size, spatial_scale, transpose=not channels_last)
    return view


def _padded_channels_last(features: Tensor) -> Tensor:
    """[B,C,H,W] -> [B,H+1,W+1,C], the extra row and column zero (empty bins read them). Clamping to
    -max(T) reproduces the kernel's start value of -FLT_MAX (an all -inf bin gives -FLT_MAX, not -inf)."""
    b, c, h, w = features.shape
    padded = features.new_zeros(b, h + 1, w + 1, c)
    torch.clamp(features.permute(0, 2, 3, 1), min=-torch.finfo(features.dtype).max, out=padded[:, :h, :w])
    return padded


def _pool_into(
    outs: Sequence[Tensor],
    features: Tensor,
    rois: Tensor,
    size: tuple[int, int],
    spatial_scale: float,
    *,
    transpose: bool,
) -> None:
    """Write RoI k's [Ph*Pw, C] bin maxima into outs[k] ([C, Ph*Pw] with ``transpose``)."""
    padded = _padded_channels_last(features)
    height, width = features.shape[-2:]
    row_lo, row_hi, col_lo, col_hi = roi_bins(rois, size, spatial_scale, height, width)
    rows, row_spans = _bin_indices(row_lo, row_hi, height)
    cols, col_spans = _bin_indices(col_lo, col_hi, width)
    # Crop each RoI's column range so that the row gather copies only the columns it needs.
    first_col = cols.flatten(1).amin(dim=1)
    crop_width = cols.flatten(1).amax(dim=1) - first_col + 1
    cols = cols - first_col[:, None, None]
    images = padded.unbind(0)
    rows_k, cols_k = _per_roi(rows, row_spans), _per_roi(cols, col_spans)
    # Contiguous outputs go through one reused [Ph, Pw, C] buffer and a 2-D transposed copy (ATen's blocked transpose).
    scratch = padded.new_empty(*size, padded.shape[-1]) if transpose else None
    images_k = rois[:, 0].to(torch.int64).tolist()
    plan = zip(images_k, first_col.tolist(), crop_width.tolist(), row_spans.tolist(), col_spans.tolist())
    with _loop_threads():
        for k, (image, x0, w, mh, mw) in enumerate(plan):
            target = outs[k].view(*size, -1) if scratch is None else scratch
            _pool_one(images[image].narrow(1, x0, w), rows_k[k], cols_k[k], mh, mw, target)
            if scratch is not None:
                outs[k].copy_(scratch.view(size[0] * size[1], -1).t())


@contextlib.contextmanager
def single_thread_roi_pool() -> Iterator[None]:
    """Inside this block, :func:`fast_roi_pool` runs its per-RoI loop on one intra-op thread (the caller's opt-in).

    The loop runs a few small ops per RoI: with several intra-op threads each op is a parallel region whose barrier
    waits for every thread, and when another process holds a core one pooling call took 0.8 s instead of 3 ms
    (2 threads; 6x slower over 300 RoIs, benchmarks/bench_roi_pool.py). Inside the block each call lowers torch's
    intra-op thread count to 1 for its loop and restores it after, so the convolutions around keep every thread.
    That count is process-wide: enter the block where no other Python thread runs torch ops meanwhile, as the
    command-line tools do around their whole run. Outside it the loop runs at the caller's thread count and
    nothing process-wide is changed; at 1 thread both are the same.
    """
    token = _SINGLE_THREAD_LOOP.set(True)
    try:
        yield
    finally:
        _SINGLE_THREAD_LOOP.reset(token)


@contextlib.contextmanager
def _loop_threads() -> Iterator[None]:
    """One intra-op thread for the per-RoI loop when the caller opted in (:func:`single_thread_roi_pool`)."""
    threads = torch.get_num_threads()
    if threads == 1 or not _SINGLE_THREAD_LOOP.get():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pool_one(window: Tensor, rows: Tensor, cols: Tensor, row_span: int, col_span: int, out: Tensor) -> None:
    """window [H+1, w, C], flat gather indices rows [Ph*Mh] / cols [Pw*Mw] -> bin maxima, into out [Ph, Pw, C]."""
    ph, pw, channels = out.shape
    pooled = window.index_select(0, rows)
    if row_span > 1:  # bins overlap and vary in length: a gather (last cell repeated) then a max
        pooled = pooled.view(ph, row_span, -1, channels).amax(dim=1)
    if col_span > 1:
        torch.amax(pooled.index_select(1, cols).view(ph, pw, col_span, channels), dim=2, out=out)
    else:
        torch.index_select(pooled, 1, cols, out=out)
