"""How the per-region head runs on a CPU: the memory layout of its maps and the RoI chunk size (both measured)."""
from __future__ import annotations

import torch

__all__ = ["CHANNELS_LAST_MIN_SIZE", "cpu_roi_chunk"]

# Pooled maps at least this large go through conv5 channels-last on CPU (at 4x4 it was 0.65x, slower).
CHANNELS_LAST_MIN_SIZE = 7


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
