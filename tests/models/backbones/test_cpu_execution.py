"""Tests for detres.models.backbones.cpu_execution: the CPU RoI chunk grows with the thread count, as measured."""

from __future__ import annotations

import pytest
import torch

from detres.models.backbones.cpu_execution import cpu_roi_chunk


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_one_thread_keeps_the_base_chunk_and_more_threads_use_larger_ones(threads):
    threads(1)
    assert cpu_roi_chunk(32) == 32 and cpu_roi_chunk(5) == 5
    threads(2)
    assert cpu_roi_chunk(32) == 256 and cpu_roi_chunk(5) == 40  # 4 x threads x base
    assert cpu_roi_chunk(0) == 0 and cpu_roi_chunk(-1) == -1  # "all at once" stays all at once
