"""Worker script for tests/engine/test_distributed.py, started by torchrun: one rank's side of a distributed check.

    python -m torch.distributed.run --nproc_per_node=2 tests/engine/ddp_worker.py CHECK OUT_DIR

CHECK is "detect" (sharded run_inference vs the unsharded one) or "sync_bn" (GlooSyncBatchNorm on a rank's half
batch vs BatchNorm2d on the whole batch); rank 0 writes what the test compares to OUT_DIR/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from detres.data.transforms.detection import finalize_sample  # noqa: E402
from detres.engine.distributed import get_rank, get_world_size, init_distributed, is_main_process  # noqa: E402
from detres.engine.sync_bn import GlooSyncBatchNorm  # noqa: E402
from detres.inference.detect import run_inference  # noqa: E402
from tests.tiny_configs import build_test_detector  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def _images(count: int) -> ListDataset:
    """``count`` random 80x96 images (one size: batches pad alike however they are grouped), at their size."""
    samples = []
    for i in range(count):
        rng = np.random.default_rng(i)
        sample = {
            "image": rng.integers(0, 255, (80, 96, 3), dtype=np.uint8),
            "boxes": np.asarray([[4.0, 4.0, 40.0, 50.0]], np.float32),
            "labels": np.ones(1, np.int64),
            "image_id": 500 + i,
            "orig_size": (80, 96),
            "file_name": f"img{i}.png",
        }
        samples.append(finalize_sample(sample, None))
    return ListDataset(samples)


def check_detect(out: Path) -> None:
    torch.manual_seed(0)  # the same random detector on every rank
    model = build_test_detector(
        3,
        test_scale=(80, 160),  # the 80x96 images stay at their size
        depth=18,
        base_width=8,
        anchor_sizes=[16, 32, 64],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 200, "post_nms_top_n_test": 30},
        roi_heads={"pooler_type": "roi_align", "pooler_resolution": 4, "sampling_ratio": 2, "score_thresh": 0.01},
    )
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.normal_(std=0.5)
    dataset = _images(5)  # odd: the ranks' shards differ in size
    sharded = run_inference(model, dataset, device=torch.device("cpu"), batch_size=2, progress=False)
    alone = run_inference(model, dataset, device=torch.device("cpu"), batch_size=2, progress=False, shard=False)
    if is_main_process():
        torch.save({"sharded": sharded, "alone": alone, "world": get_world_size()}, out / "result.pt")


def check_sync_bn(out: Path) -> None:
    torch.manual_seed(0)
    batch = torch.randn(6, 4, 5, 5) * 3 + 1
    plain, synced = torch.nn.BatchNorm2d(4), GlooSyncBatchNorm(4)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        synced.weight.copy_(plain.weight)
    share = batch.shape[0] // get_world_size()
    mine = batch[get_rank() * share : (get_rank() + 1) * share].clone().requires_grad_(True)
    whole = batch.clone().requires_grad_(True)
    weights = torch.arange(batch.numel(), dtype=torch.float32).reshape(batch.shape).sin()  # a non-trivial loss
    (synced(mine) * weights[get_rank() * share : (get_rank() + 1) * share]).sum().backward()
    (plain(whole) * weights).sum().backward()
    grads = [torch.zeros_like(mine) for _ in range(get_world_size())]
    torch.distributed.all_gather(grads, mine.grad)
    if is_main_process():
        torch.save(
            {
                "input_grad": torch.cat(grads),
                "expected_input_grad": whole.grad,
                "running": (synced.running_mean, synced.running_var),
                "expected_running": (plain.running_mean, plain.running_var),
            },
            out / "result.pt",
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))
    {"detect": check_detect, "sync_bn": check_sync_bn}[sys.argv[1]](Path(sys.argv[2]))
