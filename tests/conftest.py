"""Shared pytest fixtures: the ../shared folder (skip when absent) and single-threaded torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = (REPO_ROOT / ".." / "shared").resolve()

torch.set_num_threads(1)  # tests run beside other work on 2 cores; threads only add contention


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"../shared not found at {SHARED_DIR} (real-data tests need it; CI has it)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture()
def one_thread():
    """Exactly 1 intra-op thread for the test (PyTorch's conv routing depends on it), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ tiny detection world + untrained checkpoints
def _shapes_det_world(tmp_path_factory, name: str, *, train: int, val: int) -> Path:
    """The detection part of a shapes world of 64x96 px images (its ``det`` folder)."""
    from tests.tiny_configs import write_det_world

    return write_det_world(tmp_path_factory.mktemp(name), train=train, val=val)


@pytest.fixture(scope="session")
def tiny_det_world(tmp_path_factory) -> Path:
    """1 train and 3 val images (for untrained checkpoints)."""
    return _shapes_det_world(tmp_path_factory, "tiny_det_world", train=1, val=3)


@pytest.fixture(scope="session")
def small_det_world(tmp_path_factory) -> Path:
    """3 train and 2 val images (for short training runs)."""
    return _shapes_det_world(tmp_path_factory, "small_det_world", train=3, val=2)


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tiny_det_world, tmp_path_factory):
    """``make(name, seed=0, class_names=None, **model) -> Path``: an untrained quarter-width ResNet-18
    detector saved as train_det would (test size 64 / 96, box voting on); ``model`` overrides its config tree."""
    import json

    from detres.config.load import config_from_tree
    from detres.models.build import build_detector, detector_state
    from detres.utils.torch_files import save_checkpoint

    categories = json.loads((tiny_det_world / "annotations" / "instances_val.json").read_text())["categories"]
    ids = {c["name"]: c["id"] for c in categories}
    folder = tmp_path_factory.mktemp("tiny_ckpt")

    def make(name: str = "det.pt", *, seed: int = 0, class_names: list[str] | None = None, **model) -> Path:
        names = sorted(ids) if class_names is None else list(class_names)
        torch.manual_seed(seed)
        tree = {
            "depth": 18,
            "base_width": 16,
            "anchor_sizes": [16, 32],
            "aspect_ratios": [1.0],
            "pixel_std": [1.0, 1.0, 1.0],
            "rpn": {"pre_nms_top_n_test": 100, "post_nms_top_n_test": 20},
            "roi_heads": {"pooler_resolution": 8, "score_thresh": 0.0, "box_voting": True},
        }
        cfg = config_from_tree(
            {"task": "det", "model": {**tree, **model}, "input": {"min_size_test": 64, "max_size_test": 96}}, task="det"
        )
        detector = build_detector(cfg.model, input_cfg=cfg.input, num_classes=len(names))
        meta = {
            "class_names": names,
            "min_size_test": 64,
            "max_size_test": 96,
            "label_to_category_id": {i + 1: ids.get(n, i + 1) for i, n in enumerate(names)},
        }
        path = folder / name
        save_checkpoint(path, {**detector_state(detector, config=cfg, meta=meta), "iter": 0})
        return path

    return make


@pytest.fixture(scope="session")
def tiny_det_checkpoint(make_tiny_checkpoint) -> Path:
    """The default :func:`make_tiny_checkpoint` checkpoint (seed 0, box voting on)."""
    return make_tiny_checkpoint("det.pt")


@pytest.fixture(scope="session")
def write_tiny_det_config(tiny_det_world):
    """``write(path, output_dir, **sections) -> path``: a det config testing on the tiny world's val images at the
    tiny checkpoints' 64 / 96 px (``sections`` are merged into the top-level sections, e.g. test={...})."""
    import yaml

    def write(path: Path, output_dir: Path, **sections) -> Path:
        det = tiny_det_world
        cfg = {
            "task": "det",
            "output_dir": str(output_dir),
            "device": "cpu",
            "data": {
                "format": "coco",
                "val_images": str(det / "images"),
                "val_ann": str(det / "annotations" / "instances_val.json"),
                "num_workers": 0,
            },
            "input": {"min_size_test": 64, "max_size_test": 96},
            "test": {"vis_images": 0},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write
