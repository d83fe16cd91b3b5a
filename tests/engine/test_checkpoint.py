"""Tests for detres/engine/run/checkpoint.py, lock.py and setup.start_run: finite-only saves, the last K kept,
the last good checkpoint restored on divergence, stale temp files, the folder lock, the resume guard."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from detres.config.load import load_config
from detres.engine.run.checkpoint import CheckpointManager, Diverged, non_finite_entries, remove_stale_temp_files
from detres.engine.run.lock import RunLock, RunLockedError
from detres.engine.run.setup import load_model_state, model_changes, start_run
from detres.utils.torch_files import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _payload(iteration: int, *, running_var: float = 1.0) -> dict:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].running_var.fill_(running_var)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()  # creates momentum buffers
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": iteration}


def test_non_finite_entries_name_model_buffers_and_optimizer_state():
    payload = _payload(1, running_var=float("inf"))
    payload["optimizer"]["state"][0]["momentum_buffer"][0] = float("nan")
    bad = non_finite_entries({k: payload[k] for k in ("model", "optimizer")})
    assert bad == ["model.1.running_var", "optimizer.state.0.momentum_buffer"]
    assert non_finite_entries({"steps": torch.tensor([1, 2]), "x": 3.0}) == []  # integers / plain numbers ignored


def test_a_non_finite_state_is_never_written_and_the_previous_last_pt_stays(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_payload(4), 4)
    with pytest.raises(
        Diverged, match=r"iteration 5: the training state is not finite \(model.1.running_var\)"
    ) as info:
        manager.save(_payload(5, running_var=float("inf")), 5)
    assert info.value.failed_from == 4  # the step from state 4 produced it
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 4 and list(manager.kept()) == [4]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_the_last_k_saves_are_kept_by_iteration(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for it in (10, 20, 30, 40):
        manager.save(_payload(it), it)
    assert list(manager.kept()) == [30, 40]
    assert [load_checkpoint(p)["iter"] for p in manager.kept().values()] == [30, 40]
    assert (tmp_path / "checkpoints" / "iter_0000030.pt").is_file()
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 40
    only_last = CheckpointManager(tmp_path / "k0", keep=0)
    only_last.save(_payload(1), 1)
    assert only_last.kept() == {} and (tmp_path / "k0" / "last.pt").is_file()


def test_divergence_sets_last_pt_back_to_the_newest_checkpoint_before_the_failing_steps_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for it in (1, 2, 3):
        manager.save(_payload(it), it)
    error = manager.diverged(Diverged("iteration 3: loss is nan (lr 50); lower solver.base_lr", failed_from=3))
    # state 3 gives a NaN loss on its batch: an exact resume from it would fail again at once
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 2 and list(manager.kept()) == [1, 2]
    assert (tmp_path / "checkpoints" / "diverged_iter_0000003.pt").is_file()
    message = str(error)
    assert "\n" not in message and message.startswith("iteration 3: loss is nan")
    assert f"last good checkpoint is {tmp_path / 'last.pt'} (iteration 2)" in message
    assert "--resume solver.base_lr=<lower>" in message


def test_a_state_whose_loss_had_already_exploded_is_not_a_good_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for it, loss in ((1, 2.5), (2, 2.0), (3, 4.0e12)):
        manager.save(_payload(it), it)
        manager.note_loss(it, loss)  # the step from state `it`
    manager.diverged(Diverged("iteration 4: loss is nan", failed_from=4))
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 2


def test_no_good_checkpoint_left_says_so(tmp_path):
    manager = CheckpointManager(tmp_path, keep=0)
    manager.save(_payload(1), 1)
    message = str(manager.diverged(Diverged("iteration 1: loss is inf", failed_from=1)))
    assert "no good checkpoint is left" in message and not (tmp_path / "last.pt").exists()


def test_temp_files_of_a_killed_write_are_removed_with_a_note(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".last.pt.k3j_x1.tmp", tmp_path / "checkpoints" / ".iter_0000005.pt.link.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "last.pt"]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    with caplog.at_level(logging.WARNING):
        removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(stale) and all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert "removed 2 temp file(s) of an interrupted write" in caplog.text


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from detres.engine.run.lock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_in_a_folder_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by another training run \(pid {holder.pid},"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with RunLock(tmp_path):  # the kernel dropped the dead process's lock
        with RunLock(tmp_path):  # re-entrant within one process (a stage calling another trainer)
            pass
    assert (tmp_path / ".lock").read_text() == ""


def test_model_changes_list_old_and_new_values():
    old = load_config(None, ["model.roi_heads.pooler_resolution=8"], task="det").to_dict()
    del old["model"]["rpn"]["nms_thresh"]  # a key the checkpoint's version did not have: not compared
    new = load_config(None, ["model.roi_heads.pooler_resolution=14", "model.rpn.nms_thresh=0.5"], task="det")
    assert model_changes(old, new) == ["model.roi_heads.pooler_resolution 8 → 14"]
    assert model_changes({"model": {}}, new) == [] and model_changes(None, new) == []


def test_load_model_state_names_what_does_not_fit(tmp_path):
    small, big = nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 5))
    with pytest.raises(
        ValueError, match=r"ckpt.pt: its weights do not fit .*missing 0.weight, 0.bias; unexpected weight, bias"
    ):
        load_model_state(big, small.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"shape mismatch: weight \(4, 3\) vs \(6, 3\)"):
        load_model_state(nn.Linear(3, 6), small.state_dict(), tmp_path / "ckpt.pt")


def _cls_cfg(out: Path, *extra: str):
    return load_config(None, [f"output_dir={out}", "device=cpu", *extra], task="cls")


def test_start_run_resume_guard(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint to continue in .*--resume-or-start"):
        start_run(_cls_cfg(out), resume=True)
    fresh = start_run(_cls_cfg(out), resume="auto")
    assert fresh.state is None and (out / "config.yaml").is_file()
    manager = CheckpointManager(out, keep=3)
    for it in (5, 10, 15):
        manager.save(dict(_payload(it), config=_cls_cfg(out).to_dict()), it)
    with pytest.raises(FileExistsError, match="pass --resume"):
        start_run(_cls_cfg(out), resume=False)
    (out / ".last.pt.abcdef.tmp").write_bytes(b"half a checkpoint")
    resumed = start_run(_cls_cfg(out), resume="auto")
    assert resumed.start_iter == 15 and not (out / ".last.pt.abcdef.tmp").exists()
    older = start_run(_cls_cfg(out), resume_from=out / "checkpoints" / "iter_0000010.pt")
    assert older.start_iter == 10 and load_checkpoint(out / "last.pt")["iter"] == 10
    assert list(older.checkpoints.kept()) == [5, 10]  # the abandoned newer one is gone
    with pytest.raises(ValueError, match=r"changed model options \(model.depth 50 → 18\).*--allow-model-change"):
        start_run(_cls_cfg(out, "model.depth=18"), resume=True)
    assert "depth: 50" in (out / "config.yaml").read_text()  # not rewritten with values the run does not use
    changed = start_run(_cls_cfg(out, "model.depth=18"), resume=True, allow_model_change=True)
    assert changed.model_changed and "depth: 18" in (out / "config.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="--resume-from: checkpoint not found"):
        start_run(_cls_cfg(out), resume_from=out / "nope.pt")
