"""Tests for tools/train_cls.py: bad input exits 2 with one line naming the key, folder or file.

The worker-error case runs the tool as a real command (subprocess); the others call its ``main``
in-process, which prints the same lines without paying for another interpreter start.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_configs import write_tiny_cls_run

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "train_cls.py"


def run_tool(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def tool_main():
    spec = importlib.util.spec_from_file_location("train_cls_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def last_line(stderr: str) -> str:
    # tqdm draws its bar on stderr with carriage returns; the error is the final line.
    return stderr.strip().splitlines()[-1].split("\r")[-1]


@pytest.fixture()
def config(tmp_path) -> Path:
    return write_tiny_cls_run(tmp_path)


def test_unknown_config_keys_are_named(config, tmp_path, capsys):
    main = tool_main()
    assert main(["--config", str(config), "solver.bogus_rate=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'solver.bogus_rate'" in last_line(err) and "Traceback" not in err
    typo = tmp_path / "typo.yaml"
    written = yaml.safe_load(config.read_text())
    written["model"]["acrh"] = written["model"].pop("arch")
    typo.write_text(yaml.safe_dump(written))
    assert main(["--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.acrh'" in last_line(err) and str(typo) in last_line(err)
    assert not (tmp_path / "run").exists()


def test_an_empty_class_folder_is_named(config, tmp_path, capsys):
    (tmp_path / "data" / "train" / "c").mkdir()
    assert tool_main()(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"class folder '{tmp_path / 'data' / 'train' / 'c'}' contains no images" in last_line(err)


def test_a_corrupt_validation_image_is_named_in_one_line(config, tmp_path):
    bad = tmp_path / "data" / "val" / "b" / "zz_broken.png"
    bad.write_bytes(b"not an image at all")
    # Issue 10 case 5: every image header is checked before the first iteration, the validation set's too.
    proc = run_tool("--config", config, cwd=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"train_cls: error: {bad}: image header cannot be read: empty, corrupt or not an "
        "image format (data.on_bad_sample=skip drops such samples and lists them)"
    )
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert not list((tmp_path / "run").glob("*.jsonl"))  # stopped before training: no log, no checkpoint
