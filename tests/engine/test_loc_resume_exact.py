"""The localizer's RPN stage resumes exactly: a run stopped at a checkpoint and resumed repeats the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detres.config.load import load_config
from detres.data.datasets.localization import LocDataset
from detres.data.shapes.writers import write_loc_task
from detres.data.transforms.localization import LocTrainTransform
from detres.engine.loc_data import load_loc_records
from detres.engine.logging import read_json_lines
from detres.engine.tasks.localization import train_localizer
from detres.engine.tasks.localization_rpn import localization_train_loader
from detres.utils.torch_files import load_checkpoint

# The tiny localizer of test_loc_trainer.py with scale augmentation (64..96), random 56² crops and flips on, so every
# kind of random draw (scale, crop window, flip, anchor sampling) happens at every iteration.
TINY = [
    "model.weights=null",
    "model.depth=18",
    "model.base_width=16",
    "model.freeze_at=0",
    "model.anchor_sizes=[16,32,64]",
    "input.scale_min=64",
    "input.scale_max=96",
    "input.crop=56",
    "input.flip_prob=0.5",
    "test.scale=64",
    "test.top_n=20",
    "data.num_workers=0",
    "device=cpu",
    "solver.images_per_batch=4",
    "solver.base_lr=0.01",
    "solver.warmup_iters=2",
    "solver.warmup_lr=0.001",
    "solver.steps=[4]",
    "solver.log_period=1",
    "data.max_val_images=2",
]


@pytest.fixture(scope="module")
def loc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_loc_task(root, 0, {"train": 12, "val": 2}, (96, 160))
    return root / "loc"


def _cfg(root: Path, out: Path, *overrides: str):
    return load_config(None, ["task=loc", f"output_dir={out}", f"data.root={root}", *TINY, *overrides])


def _losses(out: Path) -> dict[int, dict[str, float]]:
    return {
        r["iter"]: {k: v for k, v in r.items() if k.startswith("loss")}
        for r in read_json_lines(out / "metrics.jsonl")
        if "loss" in r
    }


def test_a_resumed_rpn_stage_repeats_the_uninterrupted_losses_and_weights_bit_for_bit(loc_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_localizer(_cfg(loc_root, full, "solver.max_iter=6", "solver.checkpoint_period=6"))
    train_localizer(_cfg(loc_root, part, "solver.max_iter=3", "solver.checkpoint_period=3"))
    torch.manual_seed(1234)  # the resumed process's global generators differ: no draw may depend on them
    train_localizer(_cfg(loc_root, part, "solver.max_iter=6", "solver.checkpoint_period=6"), resume=True)

    want, got = _losses(full), _losses(part)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for iteration in (4, 5, 6):  # the resumed iterations: equal as floats, not approximately
        assert got[iteration] == want[iteration], iteration
    assert want[1] != want[6]  # the weights moved: not a comparison of two untouched models
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(part / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_crops_and_sampling_seeds_are_functions_of_seed_iteration_and_image(loc_root, tmp_path):
    """The loader's crops and the seeds its targets carry do not depend on where the stream started."""
    cfg = _cfg(loc_root, tmp_path)
    train, _, synsets = load_loc_records(cfg.data)
    dataset = LocDataset(
        train,
        synsets,
        transform=LocTrainTransform(scale_min=64, scale_max=96, crop=56, hflip_prob=0.5, seed=cfg.seed),
    )

    def batches(start: int, count: int) -> list[dict]:
        stream = iter(localization_train_loader(dataset, cfg, start))
        return [next(stream) for _ in range(count)]

    serial, resumed = batches(0, 5), batches(3, 2)
    for a, b in zip(serial[3:], resumed):
        assert a["image_ids"] == b["image_ids"] and torch.equal(a["images"], b["images"])
        assert [t["seed"] for t in a["targets"]] == [t["seed"] for t in b["targets"]]
        for ta, tb in zip(a["targets"], b["targets"]):
            assert torch.equal(ta["boxes"], tb["boxes"])
    seeds = [t["seed"] for b in serial for t in b["targets"]]
    assert len(set(seeds)) == len(seeds)  # a fresh seed per (iteration, image)
    # 12 images, 4 per batch: batches 0 and 3 hold the same images (the second pass), but crops them anew
    first = {i: im for b in serial[:3] for i, im in zip(b["image_ids"], b["images"])}
    again = {i: im for i, im in zip(serial[3]["image_ids"], serial[3]["images"])}
    assert any(not torch.equal(first[i], again[i]) for i in again)
