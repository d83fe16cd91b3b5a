"""Detection resume is exact: a run stopped at a checkpoint and resumed repeats the uninterrupted run bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from detres.config.load import load_config
from detres.data.build import build_detection_dataset
from detres.engine.logging import read_json_lines
from detres.engine.tasks.detection import train_detector
from detres.engine.tasks.detection_run import detection_train_loader
from detres.utils.torch_files import load_checkpoint
from tests.tiny_configs import write_det_world

# Tiny ResNet-18 C4 (quarter width), two training scales and flips on, so every kind of random draw
# (scale choice, flip, RPN anchor sampling, RoI sampling) happens at every iteration.
TINY = [
    "device=cpu",
    "model.depth=18",
    "model.base_width=16",
    "model.freeze_at=0",
    "model.anchor_sizes=[16, 32, 64]",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=32",
    "model.roi_heads.batch_size_per_image=8",
    "model.roi_heads.pooler_resolution=8",
    "input.min_size_train=[96, 128]",
    "input.max_size_train=192",
    "input.min_size_test=128",
    "input.max_size_test=192",
    "input.flip_prob=0.5",
    "data.num_workers=0",
    "solver.base_lr=0.01",
    "solver.warmup_iters=2",
    "solver.warmup_lr=0.001",
    "solver.steps=[4]",
    "solver.images_per_batch=2",
    "solver.log_period=1",
    "solver.eval_period=0",
    "test.vis_images=0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_det_world(tmp_path_factory.mktemp("world"), train=6, val=1)


def _cfg(det: Path, out: Path, *overrides: str):
    data = [
        f"data.train_images={det / 'images'}",
        f"data.train_ann={det / 'annotations' / 'instances_train.json'}",
        f"data.val_images={det / 'images'}",
        f"data.val_ann={det / 'annotations' / 'instances_val.json'}",
    ]
    return load_config(None, [f"output_dir={out}", *TINY, *data, *overrides], task="det")


def _train(cfg, *, resume: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model's evaluation warns about empty classes
        train_detector(cfg, resume=resume)


def _losses(out: Path) -> dict[int, dict[str, float]]:
    return {
        r["iter"]: {k: v for k, v in r.items() if k.startswith("loss")}
        for r in read_json_lines(out / "metrics.jsonl")
        if "loss" in r
    }


@pytest.mark.parametrize("scheme", ["joint"])
def test_a_resumed_run_repeats_the_uninterrupted_losses_and_weights_bit_for_bit(world, tmp_path, scheme):
    full, part = tmp_path / "full", tmp_path / "part"
    _train(_cfg(world, full, "solver.max_iter=6", "solver.checkpoint_period=6"))
    _train(_cfg(world, part, "solver.max_iter=3", "solver.checkpoint_period=3"))
    (part / "model_final.pt").unlink()
    _train(_cfg(world, part, "solver.max_iter=6", "solver.checkpoint_period=6"), resume=True)

    want, got = _losses(full), _losses(part)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for iteration in (4, 5, 6):  # the resumed iterations: equal as floats, not approximately
        assert got[iteration] == want[iteration], iteration
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(part / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_loader_workers_do_not_change_the_draws(world, tmp_path):
    """Images, their scale/flip and the sampling seeds are functions of (seed, iteration, image) only."""

    def batches(workers: int, start: int, count: int) -> list[dict]:
        cfg = _cfg(world, tmp_path, f"data.num_workers={workers}")
        dataset = build_detection_dataset(cfg, "train", train=True)
        out = []
        for batch in detection_train_loader(dataset, cfg, start):
            out.append(batch)
            if len(out) == count:
                return out
        return out

    serial, parallel, resumed = batches(0, 0, 5), batches(2, 0, 5), batches(0, 3, 2)
    for a, b in zip(serial, parallel):
        assert a["image_ids"] == b["image_ids"] and torch.equal(a["images"], b["images"])
        assert [t["seed"] for t in a["targets"]] == [t["seed"] for t in b["targets"]]
    for a, b in zip(serial[3:], resumed):
        assert a["image_ids"] == b["image_ids"] and torch.equal(a["images"], b["images"])
        assert [t["seed"] for t in a["targets"]] == [t["seed"] for t in b["targets"]]
    seeds = [t["seed"] for b in serial for t in b["targets"]]
    assert len(set(seeds)) == len(seeds)  # a fresh seed per (iteration, image)
    sizes = {tuple(s) for b in serial for s in b["image_sizes"]}
    assert len(sizes) > 1  # the two training scales are both drawn
