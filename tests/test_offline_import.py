"""Nothing in detres may reach the network at run time: albumentations' import-time update check is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: every socket connection and name look-up raises and is recorded, then the
# modules of the detection tools are imported, as tools/train_det.py, test_det.py and infer.py import them.
PROBE = r"""
import json, socket, sys, warnings
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network access attempted during import")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import detres.data.transforms.detection, detres.engine.tasks.detection, detres.inference.predictor  # noqa: E401
import os
about_updates = [str(w.message) for w in caught if "lbumentations" in str(w.message) or "update" in str(w.message)]
print(json.dumps({"attempts": attempts, "warnings": about_updates, "env": os.environ.get("NO_ALBUMENTATIONS_UPDATE"),
                  "albumentations": "albumentations" in sys.modules}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if env_value is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = env_value
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_detection_modules_makes_no_network_call():
    # Before: albumentations looked up pypi.org on import (up to 2 s) and warned when it could not reach it.
    result = _probe(None)
    assert result["albumentations"], "the probe no longer imports albumentations; make it import what does"
    assert result["attempts"] == [] and result["warnings"] == []
    assert result["env"] == "1"


def test_a_users_own_setting_is_left_alone():
    # setdefault, not an override: a user who wants the check (or set it another way) keeps their value.
    assert _probe("true")["env"] == "true"
    result = _probe("0")
    assert result["env"] == "0" and result["attempts"]  # their choice: albumentations does try the network
