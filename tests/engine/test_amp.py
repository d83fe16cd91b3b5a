"""Tests for detres/engine/amp.py: CPU stays exact fp32 (also through the trainers); CUDA autocast and scaling."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detres.config.load import load_config
from detres.data.shapes.world import generate_shapes_world
from detres.engine.amp import SCALER_KEY, MixedPrecision, mixed_precision_from_config
from detres.engine.logging import read_json_lines
from detres.engine.tasks.classification import train_classifier
from detres.engine.tasks.detection import train_detector
from detres.utils.torch_files import load_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (autocast is CUDA-only)")

# The quarter-width ResNet-18 detector of tests/engine/test_det_trainer.py, 2 iterations.
DET_TINY = [
    "device=cpu",
    "model.depth=18",
    "model.base_width=16",
    "model.freeze_at=0",
    "model.anchor_sizes=[16, 32, 64]",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=16",
    "model.roi_heads.pooler_resolution=8",
    "input.min_size_train=[96]",
    "input.max_size_train=128",
    "input.min_size_test=96",
    "input.max_size_test=128",
    "data.num_workers=0",
    "solver.base_lr=0.005",
    "solver.images_per_batch=1",
    "solver.max_iter=2",
    "solver.steps=[]",
    "solver.log_period=1",
    "solver.eval_period=0",
    "solver.checkpoint_period=2",
    "test.vis_images=0",
]


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _steps(amp: MixedPrecision | None, steps: int = 3) -> list[torch.Tensor]:
    """Parameters after ``steps`` SGD steps on fixed data, through ``amp`` or plain backward + step."""
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(steps):
        ctx = amp.autocast() if amp is not None else torch.enable_grad()
        with ctx:
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if amp is None:
            loss.backward()
            optimizer.step()
        else:
            amp.backward_and_step(loss, optimizer)
    return [p.detach().clone() for p in model.parameters()]


def test_enabled_on_cpu_is_inactive_warns_once_and_steps_exactly_like_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="detres.engine.amp"):
        amp = MixedPrecision(enabled=True, device="cpu")
        got = _steps(amp)
    assert not amp.active and amp.state_dict() == {}
    warned = [r for r in caplog.records if "CUDA-only" in r.getMessage()]
    assert len(warned) == 1 and "fp32 on cpu" in warned[0].getMessage()
    assert all(torch.equal(a, b) for a, b in zip(got, _steps(None)))
    assert not torch.is_autocast_enabled("cpu")


def test_disabled_never_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="detres.engine.amp"):
        assert not MixedPrecision(enabled=False, device="cpu").active
    assert not caplog.records


def test_a_scaled_step_equals_the_plain_step_and_its_state_round_trips():
    # The float16 path's scaler logic, run on CPU with a CPU GradScaler (power-of-two scale: exact in fp32).
    amp = MixedPrecision(enabled=False, device="cpu")
    amp._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    assert all(torch.equal(a, b) for a, b in zip(_steps(amp), _steps(None)))
    state = amp.state_dict()
    assert state["scale"] == 2.0**11  # grew once after 2 finite steps
    other = MixedPrecision(enabled=False, device="cpu")
    other._scaler = torch.amp.GradScaler("cpu")
    other.load_state_dict(state)
    assert other.state_dict() == state
    other.load_state_dict({})  # an fp32 checkpoint: the scaler is kept as it is
    other.load_state_dict(None)
    assert other.state_dict() == state


def test_bad_amp_dtype_names_the_key():
    with pytest.raises(ValueError, match=r"solver\.amp_dtype.*bfloat16.*float16.*float32"):
        mixed_precision_from_config({"amp": True, "amp_dtype": "float32"}, "cpu")
    # the config check refuses it when the config is loaded, before any tool writes anything
    for task, value in (("det", "float32"), ("cls", "half")):
        with pytest.raises(ValueError, match=rf"solver\.amp_dtype: expected one of float16, bfloat16, got '{value}'"):
            load_config(None, [f"solver.amp_dtype={value}"], task=task)


def test_amp_keys_exist_in_every_task_with_fp32_defaults():
    for task in ("cls", "det", "loc"):
        cfg = load_config(None, task=task)
        assert cfg.solver.amp is False and cfg.solver.amp_dtype == "float16"
    assert load_config(None, task="det").test.amp is False


def _as_text(result: object) -> str:
    """A comparable form of logs / metrics (NaN, e.g. VOC AP of an absent class, never equals itself)."""
    return json.dumps(result, sort_keys=True, default=str)


def _det_cfg(world: Path, out: Path, *overrides: str):
    data = [
        f"data.train_images={world / 'images'}",
        f"data.train_ann={world / 'annotations' / 'instances_train.json'}",
        f"data.val_images={world / 'images'}",
        f"data.val_ann={world / 'annotations' / 'instances_val.json'}",
    ]
    return load_config(None, [f"output_dir={out}", *DET_TINY, *data, *overrides], task="det")


def _run_det(world: Path, out: Path, amp: bool) -> str:
    cfg = _det_cfg(world, out, f"solver.amp={str(amp).lower()}", f"test.amp={str(amp).lower()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model's COCO/VOC evaluation warns about empty classes
        metrics = train_detector(cfg)
    records = [{k: v for k, v in r.items() if k != "time"} for r in read_json_lines(out / "metrics.jsonl")]
    return _as_text([records, {k: metrics[k] for k in ("coco", "voc")}])


def test_train_detector_with_amp_on_cpu_gives_the_fp32_losses_and_metrics(small_det_world, tmp_path):
    fp32 = _run_det(small_det_world, tmp_path / "fp32", amp=False)
    amp = _run_det(small_det_world, tmp_path / "amp", amp=True)
    assert '"loss_cls"' in fp32 and '"AP50"' in fp32
    assert amp == fp32
    assert SCALER_KEY not in load_checkpoint(tmp_path / "amp" / "last.pt")  # CPU: no scaler, fp32 checkpoint


def test_the_scaler_state_is_saved_in_last_pt_and_restored_on_resume(small_det_world, tmp_path, monkeypatch):
    # The float16 scaler path on CPU: the run's MixedPrecision gets a CPU GradScaler (exact, power-of-two scale).
    from detres.engine.tasks import detection_run

    restored: list[dict] = []

    def with_cpu_scaler(solver, device) -> MixedPrecision:
        amp = mixed_precision_from_config(solver, device)
        amp._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        real_load = amp.load_state_dict
        amp.load_state_dict = lambda state: (restored.append(state), real_load(state))
        return amp

    monkeypatch.setattr(detection_run, "mixed_precision_from_config", with_cpu_scaler)
    _run_det(small_det_world, tmp_path / "run", amp=True)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")[SCALER_KEY]
    assert saved["scale"] == 2.0**10  # grew after each of the 2 finite steps
    cfg = _det_cfg(small_det_world, tmp_path / "run", "solver.max_iter=3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_detector(cfg, resume=True)
    assert restored == [saved]
    assert load_checkpoint(tmp_path / "run" / "last.pt")[SCALER_KEY]["scale"] == 2.0**11


def test_train_classifier_with_amp_on_cpu_gives_the_fp32_losses_and_errors(tmp_path):
    root = tmp_path / "world"
    generate_shapes_world(
        root,
        seed=1,
        num_cls_train_per_class=1,
        num_cls_val_per_class=1,
        cls_size=(32, 32),
        num_det_train=0,
        num_det_val=0,
        num_loc_train=0,
        num_loc_val=0,
    )

    def run(amp: bool) -> str:
        out = tmp_path / f"cls_{amp}"
        cfg = load_config(
            None,
            [
                f"output_dir={out}",
                "device=cpu",
                f"data.train_dir={root / 'cls' / 'train'}",
                f"data.val_dir={root / 'cls' / 'val'}",
                "data.num_workers=0",
                "model.arch=cifar",
                "model.depth=8",
                "model.shortcut=A",
                "augment.scale_min=32",
                "augment.scale_max=36",
                "augment.crop=32",
                "test.resize=32",
                "test.scales=[32]",
                "test.modes=[1crop]",
                "test.batch_size=8",
                "solver.batch_size=5",
                "solver.max_iter=2",
                "solver.lr_schedule=step",
                "solver.log_period=1",
                "solver.eval_period=2",
                "solver.checkpoint_period=2",
                "bn_recompute.enabled=false",
                f"solver.amp={str(amp).lower()}",
            ],
            task="cls",
        )
        metrics = train_classifier(cfg)
        records = [{k: v for k, v in r.items() if k != "time"} for r in read_json_lines(out / "metrics.jsonl")]
        return _as_text([records, metrics["final"]])

    fp32 = run(False)
    assert '"loss"' in fp32 and '"top1_err"' in fp32
    assert run(True) == fp32


def test_predictor_amp_on_cpu_gives_the_fp32_detections(make_tiny_checkpoint):
    from detres.inference.predictor import Predictor

    path = make_tiny_checkpoint("amp_cpu.pt")
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    half, full = (Predictor(path, "cpu", amp=amp).predict(image) for amp in (True, False))
    assert full["scores"].size > 0 and half["boxes"].dtype == np.float32
    assert all(np.array_equal(half[k], full[k]) for k in ("boxes", "scores", "labels"))


# ------------------------------------------------------------------------------------------- CUDA only
@needs_cuda
def test_cuda_autocast_is_really_on_and_float16_is_scaled():
    amp = MixedPrecision(enabled=True, device="cuda")
    assert amp.active and amp.state_dict()["scale"] == 2.0**16
    model = _small_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with amp.autocast():
        assert torch.is_autocast_enabled("cuda")
        logits = model(torch.randn(4, 6, device="cuda"))
        loss = nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device="cuda"))
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    optimizer.zero_grad(set_to_none=True)
    amp.backward_and_step(loss, optimizer)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = amp.state_dict()
    fresh = MixedPrecision(enabled=True, device="cuda")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


@needs_cuda
def test_cuda_bfloat16_runs_without_a_scaler():
    amp = MixedPrecision(enabled=True, device="cuda", dtype="bfloat16")
    assert amp.active and amp.state_dict() == {}
    with amp.autocast():
        out = _small_model().cuda()(torch.randn(2, 6, device="cuda"))
    assert out.dtype == torch.bfloat16


@needs_cuda
def test_a_float16_detection_forward_returns_float32_detections(make_tiny_checkpoint, tiny_det_world):
    from detres.data.build import build_detection_dataset
    from detres.inference.detect import run_inference
    from detres.models.build import load_detector

    model, meta = load_detector(make_tiny_checkpoint("amp_det.pt"), device="cuda")
    cfg = load_config(
        None,
        [
            f"data.val_images={tiny_det_world / 'images'}",
            f"data.val_ann={tiny_det_world / 'annotations' / 'instances_val.json'}",
            "input.min_size_test=64",
            "input.max_size_test=96",
        ],
        task="det",
    )
    dataset = build_detection_dataset(cfg, "val", train=False, class_names=meta["class_names"])
    half = run_inference(model, dataset, device=torch.device("cuda"), batch_size=2, amp=True, progress=False)
    full = run_inference(model, dataset, device=torch.device("cuda"), batch_size=2, amp=False, progress=False)
    assert len(half) == len(full) == len(dataset)
    for det in half:
        assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
        assert det["boxes"].device.type == "cpu"
    assert sum(d["scores"].numel() for d in half) > 0
