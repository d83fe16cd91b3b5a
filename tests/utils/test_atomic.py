"""Tests for detres.utils.atomic: strict JSON written atomically."""

from __future__ import annotations

import json
import math

import numpy as np

from detres.utils.atomic import write_json_atomic


def test_write_json_atomic_turns_nan_into_null(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"ap": math.nan, "arr": np.array([1.5, 2.0]), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"ap": None, "arr": [1.5, 2.0], "n": 3}
