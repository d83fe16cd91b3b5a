"""Tests for atomic checkpoint writes and safe loading."""

from __future__ import annotations

import pytest
import torch

from detres.utils import torch_files as ckpt


def test_round_trip_and_weights_only(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "iter": 7, "names": ["a", "b"]}
    ckpt.save_checkpoint(tmp_path / "m.pt", obj)
    back = ckpt.load_checkpoint(tmp_path / "m.pt")
    assert back["iter"] == 7 and back["names"] == ["a", "b"]
    assert torch.equal(back["model"]["w"], obj["model"]["w"])


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, {"iter": 1})

    def explode(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(path, {"iter": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        ckpt.load_checkpoint(tmp_path / "nothere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ckpt.load_checkpoint(bad)


class Thing:  # an arbitrary class: weights_only loading must refuse to unpickle it
    pass


def test_non_tensor_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Thing()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        ckpt.load_checkpoint(path)
