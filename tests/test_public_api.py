"""The curated public API of ``detres``: every name resolves to its one definition, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import detres

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", detres.__all__)
def test_every_public_name_is_its_defining_module_object(name):
    module = importlib.import_module(detres._PUBLIC[name])
    assert getattr(detres, name) is getattr(module, name)
    assert getattr(module, name).__module__ == detres._PUBLIC[name], "a public name must point at its definition"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'build_detectr'"):
        _ = detres.build_detectr


def test_import_detres_imports_no_torch_until_a_name_is_used():
    probe = (
        "import sys, detres; heavy = [m for m in ('torch', 'detres.engine', 'detres.models') if m in sys.modules];"
        "print(','.join(heavy)); detres.TestConfig; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert out == ["True"], f"imported at `import detres`: {out[0] if len(out) > 1 else ''}"
