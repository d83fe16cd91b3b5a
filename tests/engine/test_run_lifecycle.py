"""Tests of a training run's lifecycle through the trainers and tools (issue 10): divergence leaves a resumable good
checkpoint, changed model options on resume, no batch past max_iter, save before evaluating, SIGINT / SIGTERM,
--resume without last.pt, one run per folder."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detres.config.load import load_config
from detres.data.image_io import ImageReadError
from detres.data.shapes.world import generate_shapes_world
from detres.data.shapes.writers import write_loc_task
from detres.engine.logging import read_json_lines
from detres.engine.tasks import classification, detection, localization_rcnn, localization_rpn
from detres.engine.tasks.detection_run import DetectionRun
from detres.engine.tasks.localization import train_localizer
from detres.utils.torch_files import load_checkpoint
from tests.tiny_configs import tiny_train_det_config, write_yaml
from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
CLS_ARGS = [
    "device=cpu",
    "model.arch=cifar",
    "model.depth=8",
    "model.shortcut=A",
    "augment.scale_min=32",
    "augment.scale_max=40",
    "augment.crop=32",
    "test.resize=32",
    "test.scales=[32, 40]",
    "test.batch_size=8",
    "test.modes=[1crop]",
    "solver.batch_size=4",
    "solver.log_period=1",
    "solver.eval_period=1000",
    "bn_recompute.batch_size=7",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """10 classes x 3 / 1 classification images (32 px) and 3 / 2 detection images (64..96 px)."""
    root = tmp_path_factory.mktemp("lifecycle_world")
    generate_shapes_world(
        root,
        seed=1,
        num_cls_train_per_class=3,
        num_cls_val_per_class=1,
        cls_size=(32, 32),
        num_det_train=3,
        num_det_val=2,
        num_loc_train=0,
        num_loc_val=0,
        det_size=(64, 96),
    )
    return root


def _cls_overrides(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train_dir={world / 'cls' / 'train'}",
        f"data.val_dir={world / 'cls' / 'val'}",
        *CLS_ARGS,
        *extra,
    ]


def _det_config(world: Path, path: Path, **solver) -> Path:
    return write_yaml(
        path,
        tiny_train_det_config(
            world / "det", model={"freeze_at": 0}, test={"vis_images": 0}, solver={"checkpoint_period": 1, **solver}
        ),
    )


def _run_main(tool: str, *args: str) -> tuple[int, str]:
    """tools/<tool>.py's main in-process: (exit status, the last line of stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = load_tool(tool).main([str(a) for a in args])
    lines = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


# ------------------------------------------------------------------------------------ case 1: divergence
def test_cls_blow_up_never_saves_a_non_finite_state_and_resumes_with_a_lower_lr(world, tmp_path):
    config = ROOT / "configs" / "cls" / "shapes_r18.yaml"
    # from the first step at LR 50 every state has blown up (BN running_var inf, losses of 1e3..1e15): none is good
    out = tmp_path / "no_warmup"
    code, line = _run_main(
        "train_cls",
        "--config",
        config,
        *_cls_overrides(world, out, "solver.base_lr=50", "solver.checkpoint_period=1", "solver.max_iter=20"),
    )
    assert code == 1 and "the training state is not finite (model.layer" in line, line
    assert line.endswith("start again (without --resume) with a lower solver.base_lr") and "no good checkpoint" in line
    assert not (out / "last.pt").exists() and list((out / "checkpoints").glob("diverged_iter_*.pt"))
    # after a warm-up at a sane LR the warm-up states are good: the run stops naming one, which trains on
    out = tmp_path / "run"
    code, line = _run_main(
        "train_cls",
        "--config",
        config,
        *_cls_overrides(
            world,
            out,
            "solver.base_lr=50",
            "solver.checkpoint_period=1",
            "solver.max_iter=20",
            "solver.warmup_iters=4",
            "solver.warmup_lr=0.01",
        ),
    )
    assert code == 1, line
    match = re.fullmatch(
        r"train_cls: error: iteration (\d+): .*not finite.*; training stopped; the last good "
        r"checkpoint is (\S+) \(iteration (\d+)\): continue it with a lower LR, e.g. "
        r"--resume solver.base_lr=<lower>",
        line,
    )
    assert match, line
    assert Path(match.group(2)) == out / "last.pt" and int(match.group(3)) < int(match.group(1))
    state = load_checkpoint(out / "last.pt")
    assert state["iter"] == int(match.group(3))
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    code, line = _run_main(
        "train_cls",
        "--config",
        config,
        "--resume",
        *_cls_overrides(
            world,
            out,
            "solver.base_lr=0.01",
            "solver.checkpoint_period=1",
            "solver.max_iter=20",
            "solver.warmup_iters=4",
            "solver.warmup_lr=0.01",
        ),
    )
    assert code == 0, line
    assert load_checkpoint(out / "model_final.pt")["iter"] == 20
    # case 6 for classification: a changed depth on resume is refused, naming the key, or fails one line with the flag
    more = _cls_overrides(
        world,
        out,
        "solver.base_lr=0.01",
        "solver.max_iter=22",
        "model.depth=14",
        "solver.warmup_iters=4",
        "solver.warmup_lr=0.01",
    )
    code, line = _run_main("train_cls", "--config", config, "--resume", *more)
    assert code == 2 and "changed model options (model.depth 8 → 14)" in line and "--allow-model-change" in line
    code, line = _run_main("train_cls", "--config", config, "--resume", "--allow-model-change", *more)
    assert code == 2 and "its weights do not fit the model built from this config (missing" in line, line


def test_det_blow_up_stops_naming_the_last_good_checkpoint_which_trains_on_with_a_lower_lr(world, tmp_path):
    out = tmp_path / "run"
    config = _det_config(world, tmp_path / "det.yaml", max_iter=20, warmup_iters=4, warmup_lr=0.002)
    code, line = _run_main("train_det", "--config", config, f"output_dir={out}", "solver.base_lr=3.0")
    assert code == 1, line
    match = re.fullmatch(
        r"train_det: error: iteration (\d+): loss is (nan|inf).*; training stopped; the last good "
        r"checkpoint is \S+ \(iteration (\d+)\): .*--resume solver.base_lr=<lower>",
        line,
    )
    assert match, line
    good = int(match.group(3))
    assert good == load_checkpoint(out / "last.pt")["iter"] and good <= 4  # still a warm-up state
    code, line = _run_main("train_det", "--config", config, f"output_dir={out}", "--resume", "solver.base_lr=0.005")
    assert code == 0, line
    assert load_checkpoint(out / "model_final.pt")["iter"] == 20
    # case 2: changed model options on resume are refused (config.yaml keeps what the run used) unless allowed
    changed = ["solver.base_lr=0.005", "solver.max_iter=21", "model.roi_heads.pooler_resolution=14"]
    code, line = _run_main("train_det", "--config", config, f"output_dir={out}", "--resume", *changed)
    assert code == 2 and "model.roi_heads.pooler_resolution 8 → 14" in line, line
    assert load_config(out / "config.yaml").model.roi_heads.pooler_resolution == 8
    code, line = _run_main(
        "train_det", "--config", config, f"output_dir={out}", "--resume", "--allow-model-change", *changed
    )
    assert code == 0, line
    final = load_checkpoint(out / "model_final.pt")
    assert final["iter"] == 21 and final["config"]["model"]["roi_heads"]["pooler_resolution"] == 14
    assert load_config(out / "config.yaml").model.roi_heads.pooler_resolution == 14


# ------------------------------------------------------------------------------------ case 4: no batch past max_iter
def _count_batches(monkeypatch, owner, name: str, fetched: list[int]) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        def stream():
            for batch in original(*args, **kwargs):
                fetched.append(1)
                yield batch

        return stream()

    monkeypatch.setattr(owner, name, counted)


def _no_batches(*args, **kwargs):
    raise AssertionError("a finished run must not load training batches")


@pytest.mark.parametrize("scheme", ["joint", "alternating"])
def test_det_loops_never_fetch_past_max_iter_and_a_finished_run_resumes_without_batches(
    world, tmp_path, monkeypatch, scheme
):
    solver = {"training_scheme": scheme, "checkpoint_period": 2}
    if scheme == "alternating":
        solver.update(alternating_iters=[1, 1, 1, 1])
    cfg = load_config(_det_config(world, tmp_path / "det.yaml", **solver), [f"output_dir={tmp_path / 'run'}"])
    fetched: list[int] = []
    _count_batches(monkeypatch, DetectionRun, "loader", fetched)
    metrics = detection.train_detector(cfg)
    assert len(fetched) == metrics["iterations"] == (4 if scheme == "alternating" else 2)
    (tmp_path / "run" / "model_final.pt").unlink()
    monkeypatch.setattr(DetectionRun, "loader", _no_batches)
    assert detection.train_detector(cfg, resume=True)["iterations"] == metrics["iterations"]
    assert (tmp_path / "run" / "model_final.pt").is_file()


@pytest.fixture(scope="module")
def loc_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle_loc")
    write_loc_task(root, 0, {"train": 12, "val": 2}, (96, 128))
    return root / "loc"


def test_loc_stages_never_fetch_past_max_iter_and_finish_a_finished_run_without_batches(
    loc_world, tmp_path, monkeypatch
):
    small = [
        "task=loc",
        f"data.root={loc_world}",
        "model.weights=null",
        "model.depth=18",
        "model.base_width=16",
        "model.anchor_sizes=[16,32,64]",
        "input.scale_min=64",
        "input.scale_max=80",
        "input.crop=56",
        "test.scale=64",
        "test.top_n=5",
        "data.num_workers=0",
        "device=cpu",
        "solver.images_per_batch=4",
        "solver.base_lr=0.001",
        "solver.max_iter=2",
        "solver.steps=[]",
        "solver.warmup_iters=0",
        "solver.log_period=1",
        "solver.checkpoint_period=1",
    ]
    rpn_cfg = load_config(None, [*small, f"output_dir={tmp_path / 'rpn'}"])
    fetched: list[int] = []
    _count_batches(monkeypatch, localization_rpn, "localization_train_loader", fetched)
    assert train_localizer(rpn_cfg)["iterations"] == 2 and len(fetched) == 2
    (tmp_path / "rpn" / "model_final.pt").unlink()
    monkeypatch.setattr(localization_rpn, "localization_train_loader", _no_batches)
    assert train_localizer(rpn_cfg, resume=True)["iterations"] == 2
    rcnn_cfg = load_config(
        None,
        [
            *small,
            f"output_dir={tmp_path / 'rcnn'}",
            "model.rcnn.crop_size=32",
            f"model.rcnn.rpn_checkpoint={tmp_path / 'rpn' / 'model_final.pt'}",
            "model.rcnn.regions_per_batch=4",
            "model.rcnn.proposals_per_class=2",
        ],
    )
    assert train_localizer(rcnn_cfg, stage="rcnn")["iterations"] == 2
    monkeypatch.setattr(localization_rcnn, "_crop_image", _no_batches)
    assert train_localizer(rcnn_cfg, stage="rcnn", resume=True)["iterations"] == 2


# ------------------------------------------------------------------------------------ case 5: save before evaluating
def test_a_failing_evaluation_finds_its_checkpoint_written_and_the_resumed_run_is_exact(world, tmp_path, monkeypatch):
    def cfg(out: Path):
        return load_config(
            None,
            _cls_overrides(
                world,
                out,
                "solver.base_lr=0.05",
                "solver.max_iter=6",
                "solver.eval_period=2",
                "solver.checkpoint_period=2",
                "solver.lr_schedule=plateau",
                "solver.plateau_patience=1",
                "solver.plateau_threshold=0.5",
                "bn_recompute.enabled=false",
            ),
            task="cls",
        )

    classification.train_classifier(cfg(tmp_path / "straight"))
    original, calls = classification.evaluate_split, []

    def failing_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the validation at iteration 4
            raise ImageReadError("image file 'val/b/broken.png' is corrupt or not an image format OpenCV can decode")
        return original(*args, **kwargs)

    monkeypatch.setattr(classification, "evaluate_split", failing_second_validation)
    with pytest.raises(ImageReadError, match="broken.png"):
        classification.train_classifier(cfg(tmp_path / "broken"))
    state = load_checkpoint(tmp_path / "broken" / "last.pt")
    assert state["iter"] == 4 and state["pending_eval"] is True
    monkeypatch.setattr(classification, "evaluate_split", original)  # the val image was fixed
    classification.train_classifier(cfg(tmp_path / "broken"), resume=True)

    # the resumed run evaluated first, so its plateau schedule (and everything after) matches the straight run
    def records(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in read_json_lines(out / "metrics.jsonl")]

    assert records(tmp_path / "broken") == records(tmp_path / "straight")
    assert any(r.get("lr_dropped") for r in records(tmp_path / "straight"))  # the schedule did depend on it
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "broken" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------------------------ case 7: SIGINT / SIGTERM
def _start_tool(tool: str, args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _interrupt_after_first_log(proc: subprocess.Popen, metrics: Path, sig: signal.Signals) -> tuple[int, str]:
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    # SIGINT to the whole process group, as Ctrl-C in a terminal (loader workers included); SIGTERM to the main one
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cls_stop_signal_saves_last_pt_exits_cleanly_and_resumes_to_max_iter(world, tmp_path, sig):
    config = ROOT / "configs" / "cls" / "shapes_r18.yaml"
    args = [
        "--config",
        str(config),
        *_cls_overrides(world, tmp_path / "run", "solver.base_lr=0.01", "solver.max_iter=80", "data.num_workers=2"),
    ]
    status, err = _interrupt_after_first_log(
        _start_tool("train_cls", args, tmp_path), tmp_path / "run" / "metrics.jsonl", sig
    )
    assert status == 128 + sig, err
    for noise in ("Traceback", "KeyboardInterrupt", "ConnectionResetError"):
        assert noise not in err, err
    match = re.search(rf"train_cls: stopped by {sig.name} at iteration (\d+): saved (\S+); continue with --resume", err)
    assert match, err
    assert load_checkpoint(match.group(2))["iter"] == int(match.group(1)) < 80
    code, line = _run_main("train_cls", *args, "--resume")
    assert code == 0, line
    assert load_checkpoint(tmp_path / "run" / "model_final.pt")["iter"] == 80


def test_det_sigterm_saves_last_pt_at_the_iteration_reached(world, tmp_path):
    config = _det_config(world, tmp_path / "det.yaml", max_iter=60, checkpoint_period=1000)
    args = ["--config", str(config), f"output_dir={tmp_path / 'run'}", "data.num_workers=2"]
    status, err = _interrupt_after_first_log(
        _start_tool("train_det", args, tmp_path), tmp_path / "run" / "metrics.jsonl", signal.SIGTERM
    )
    assert status == 143 and "Traceback" not in err, err
    match = re.search(r"train_det: stopped by SIGTERM at iteration (\d+): saved (\S+);", err)
    assert match and load_checkpoint(match.group(2))["iter"] == int(match.group(1)) < 60, err


# ------------------------------------------------------------------------------------ cases 8-10 through the tools
def test_resume_without_last_pt_and_a_second_run_in_a_locked_folder_are_refused(world, tmp_path):
    config = ROOT / "configs" / "cls" / "shapes_r18.yaml"
    out = tmp_path / "run"
    code, line = _run_main("train_cls", "--config", config, "--resume", *_cls_overrides(world, out))
    assert code == 2 and f"--resume: no checkpoint to continue in {out}" in line, line
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from detres.engine.run.lock import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, line = _run_main(
            "train_cls", "--config", config, "--resume-or-start", *_cls_overrides(world, out, "solver.max_iter=2")
        )
        assert code == 2 and f"{out.resolve()} is in use by another training run (pid {holder.pid}" in line, line
    finally:
        holder.kill()  # kill -9: the lock dies with its process
        holder.wait(timeout=10)
    (out / ".last.pt.x7k2m1.tmp").write_bytes(b"the first bytes of a checkpoint whose write was killed")
    code, line = _run_main(
        "train_cls", "--config", config, "--resume-or-start", *_cls_overrides(world, out, "solver.max_iter=2")
    )
    assert code == 0, line
    assert not (out / ".last.pt.x7k2m1.tmp").exists() and load_checkpoint(out / "last.pt")["iter"] == 2
