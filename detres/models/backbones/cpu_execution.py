"""How the detector runs on a CPU: layouts of the trunk's and the head's maps, conv routes, RoI chunks (measured)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

__all__ = [
    "CHANNELS_LAST_MIN_SIZE",
    "ONEDNN_POINTWISE_DILATION",
    "cpu_pointwise_onednn",
    "cpu_roi_chunk",
    "routes_pointwise_to_onednn",
    "trunk_input_layout",
    "trunk_output_layout",
]

# Pooled maps at least this large go through conv5 channels-last on CPU (at 4x4 it was 0.65x, slower).
CHANNELS_LAST_MIN_SIZE = 7

# A 1x1 kernel has a single tap, so its dilation changes nothing in the result. ATen sends a float32 stride-1
# 1x1 conv on fewer than 16 images at 1 thread to its GEMM path (MKL sgemm) and the other CPU convs to oneDNN;
# declaring dilation 2 routes those to oneDNN too. Measured on this AMD Zen 5 CPU, 1 thread, ResNet-50 trunk
# shapes (benchmarks/bench_pointwise_conv.py): GEMM path 84-109 GFLOP/s forward, oneDNN 215-257; at 2 threads
# both routes are oneDNN and equally fast, so only the GEMM-bound cases are rerouted (the rest stay bit for bit).
# A constant of the route, not a setting: cpu_pointwise_onednn(False) switches the route off.
ONEDNN_POINTWISE_DILATION = 2
ONEDNN_MIN_BATCH = 16
# ATen keeps single-image convs with at most this many input values off oneDNN whatever their dilation
# (they would fall to its slow dilated kernel): such small maps keep the default route.
ONEDNN_MIN_SINGLE_IMAGE_NUMEL = 20480


_POINTWISE_ONEDNN: ContextVar[bool] = ContextVar("cpu_pointwise_onednn", default=True)


@contextlib.contextmanager
def cpu_pointwise_onednn(enabled: bool) -> Iterator[None]:
    """Choose the CPU route of float32 1x1 stride-1 convs for the block: oneDNN (``True``, the default everywhere)
    or PyTorch's own (``False``: its GEMM path for single images at 1 thread, as a plain ``nn.Conv2d`` runs them).

    The two routes give the same function up to float32 summation order; ``False`` is for comparing against
    PyTorch bit for bit or for a CPU where its GEMM path is the faster one. The choice holds for the calling
    thread (and its asyncio task) until the block ends; other threads keep the default.
    """
    token = _POINTWISE_ONEDNN.set(bool(enabled))
    try:
        yield
    finally:
        _POINTWISE_ONEDNN.reset(token)


def routes_pointwise_to_onednn(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a float32 CPU 1x1 stride-1 unpadded conv that ATen would run on its GEMM path,
    to be run with ONEDNN_POINTWISE_DILATION instead (unless ``cpu_pointwise_onednn(False)`` is in force).
    Never while traced: an exported graph keeps the plain 1x1 conv, not a route chosen for the exporting CPU."""
    return (
        _POINTWISE_ONEDNN.get()
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
        and x.dim() == 4
        and x.shape[0] < ONEDNN_MIN_BATCH
        and (x.shape[0] > 1 or x.numel() > ONEDNN_MIN_SINGLE_IMAGE_NUMEL)
        and torch.get_num_threads() == 1
    )


def cpu_roi_chunk(base: int) -> int:
    """The CPU inference chunk for ``base`` (``inference_roi_chunk``) at torch's current thread count.

    With several threads every conv is a parallel region ending in a barrier, and small chunks
    multiply the barriers: when another process holds one of the cores, each barrier waits for the
    thread it descheduled. ResNet-50 conv5 on 300 RoIs, 2 threads, one core busy: chunks of 32 took
    3.0-3.5 s, 150 2.2 s, 300 1.9-2.0 s; idle, every chunk >= 64 took ~1.1 s. So 1 thread keeps
    ``base`` (best there) and n > 1 threads use ``4 * n * base``.
    """
    threads = torch.get_num_threads()
    return base if base <= 0 or threads <= 1 else 4 * threads * base


def trunk_input_layout(images: torch.Tensor) -> torch.Tensor:
    """The trunk runs channels-last on CPU: oneDNN's convolutions read and write that layout without reorders
    (inference, 1 thread, 480x640: ResNet-18 trunk 0.121 -> 0.072 s, ResNet-50 0.28 -> 0.19 s with the 1x1
    routing of ONEDNN_POINTWISE_DILATION on both sides)."""
    if images.device.type != "cpu" or images.dim() != 4:
        return images
    return images.contiguous(memory_format=torch.channels_last)


def trunk_output_layout(features: torch.Tensor) -> torch.Tensor:
    """The C4 map handed to the RPN and the RoI pooling. When autograd records (training) it goes back to the
    contiguous layout: the RPN's 3x3 conv backward and torchvision's roi_pool were slower on channels-last
    (ResNet-50, 1 thread, 5 interleaved steps: 1.36-1.37x torchvision's step with the contiguous C4 map, 1.31-1.33x
    with the channels-last one). Inference keeps channels-last (1.83x -> 1.88-1.90x torchvision's: the fast RoI pool
    reads it as it is)."""
    if features.device.type != "cpu" or not torch.is_grad_enabled():
        return features
    return features.contiguous()
