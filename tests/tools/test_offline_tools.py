"""The tools run with networking refused: train_cls, train_det, test_det, infer and eval_det never try to connect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_configs import tiny_train_det_config, write_tiny_cls_run, write_yaml

ROOT = Path(__file__).resolve().parents[2]

# Runs one tool in a fresh interpreter after an audit hook (sys.addaudithook, PEP 578) that refuses and records
# every Internet socket connection and name look-up; then reports them as the last stdout line.
GUARD = r"""
import json, runpy, sys
attempts = []
NETWORK_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request",
                  "http.client.connect", "ftplib.connect", "smtplib.connect"}
def refuse(event, args):
    # AF_UNIX connections (a str/bytes address) are local IPC, e.g. DataLoader workers sharing tensors.
    if event in NETWORK_EVENTS or (event == "socket.connect" and isinstance(args[1], tuple)):
        attempts.append(f"{event} {args[1:2]!r}")
        raise OSError(f"network disabled in this test: {event}")
sys.addaudithook(refuse)
tool, argv = sys.argv[1], sys.argv[2:]
sys.argv = [tool, *argv]
code = 0
try:
    runpy.run_path(tool, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print("\n" + json.dumps({"attempts": attempts, "code": code}))
"""


def _offline(tool: str, *args: str | Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", GUARD, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, f"{tool} failed:\n{proc.stderr[-3000:]}"
    return report


def test_the_guard_sees_a_connection_attempt(tmp_path):
    script = tmp_path / "tools" / "connect.py"
    script.parent.mkdir()
    script.write_text(
        "import socket\ntry:\n    socket.create_connection(('example.org', 80), timeout=1)\nexcept OSError:\n    pass\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", GUARD, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["attempts"], proc.stdout  # the probe can fail


def _det_config(det: Path, out: Path, path: Path) -> Path:
    """The tool tests' tiny detector, with a loader worker (a worker process must not connect either)."""
    return write_yaml(path, tiny_train_det_config(det, out, data={"num_workers": 1}, test={"vis_images": 1}))


def test_detection_tools_make_no_network_attempt(small_det_world, tmp_path):
    cfg = _det_config(small_det_world, tmp_path / "run", tmp_path / "det.yaml")
    checkpoint = tmp_path / "run" / "model_final.pt"
    reports = {
        "train_det": _offline("train_det", "--config", cfg, cwd=tmp_path),
        "test_det": _offline(
            "test_det", "--config", cfg, "--checkpoint", checkpoint, "--out", tmp_path / "test", cwd=tmp_path
        ),
        "infer": _offline(
            "infer",
            "--checkpoint",
            checkpoint,
            "--input",
            small_det_world / "images",
            "--out",
            tmp_path / "infer",
            "--device",
            "cpu",
            cwd=tmp_path,
        ),
        "eval_det": _offline(
            "eval_det",
            "coco",
            "--gt",
            tmp_path / "test" / "coco_gt.json",
            "--results",
            tmp_path / "test" / "coco_results.json",
            cwd=tmp_path,
        ),
    }
    assert {tool: r["attempts"] for tool, r in reports.items()} == {tool: [] for tool in reports}
    assert (tmp_path / "infer").is_dir() and (tmp_path / "test" / "metrics.json").is_file()


def test_classification_training_makes_no_network_attempt(tmp_path):
    cfg = write_tiny_cls_run(tmp_path, max_iter=2)
    assert _offline("train_cls", "--config", cfg, cwd=tmp_path)["attempts"] == []
    assert (tmp_path / "run" / "last.pt").is_file()
