"""Tests for config loading: defaults, YAML, _base_ inheritance, overrides and their errors."""

from __future__ import annotations

import pytest

from detres.config.load import ConfigError, load_config, parse_overrides


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_paper_values(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", "task: cls\n"))
    assert cfg.solver.base_lr == 0.1 and cfg.solver.momentum == 0.9
    assert cfg.solver.weight_decay == 1e-4 and cfg.solver.batch_size == 256
    assert (cfg.augment.scale_min, cfg.augment.scale_max, cfg.augment.crop) == (256, 480, 224)
    assert cfg.augment.pca_alphastd == 0.1
    assert cfg.test.scales == [224, 256, 384, 480, 640]


def test_file_and_overrides_apply_in_order(tmp_path):
    path = _write(tmp_path / "c.yaml", "task: cls\nsolver:\n  base_lr: 0.05\n  steps: [10, 20]\n")
    cfg = load_config(path, ["solver.base_lr=0.2", "model.depth=18", "data.mean=[1, 2, 3]"])
    assert cfg.solver.base_lr == 0.2 and cfg.solver.steps == [10, 20]
    assert cfg.model.depth == 18 and cfg.data.mean == [1, 2, 3]


def test_int_is_accepted_for_float_and_converted(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", "task: cls\nsolver:\n  base_lr: 1\n"))
    assert isinstance(cfg.solver.base_lr, float) and cfg.solver.base_lr == 1.0


def test_unknown_key_names_the_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "task: cls\nsolver:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*solver\.base_lrr"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.detph"):
        load_config(_write(tmp_path / "ok.yaml", "task: cls\n"), ["model.detph=18"])


def test_wrong_type_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.flip.*true/false"):
        load_config(_write(tmp_path / "c.yaml", "task: cls\naugment:\n  flip: 3\n"))
    with pytest.raises(ConfigError, match=r"model\.depth.*expected int"):
        load_config(_write(tmp_path / "d.yaml", "task: cls\nmodel:\n  depth: fifty\n"))


def test_base_inheritance_and_missing_file(tmp_path):
    _write(tmp_path / "base.yaml", "task: cls\nsolver:\n  base_lr: 0.01\n  max_iter: 5\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nsolver:\n  max_iter: 7\n")
    cfg = load_config(child)
    assert cfg.solver.base_lr == 0.01 and cfg.solver.max_iter == 7
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_missing_task_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="task"):
        load_config(_write(tmp_path / "c.yaml", "solver: {}\n"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["solver.base_lr"])


def test_every_shipped_config_loads(repo_root):
    paths = sorted((repo_root / "configs").rglob("*.yaml"))
    assert paths, "no configs shipped"
    for path in paths:
        load_config(path)


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    # Issue #6: PyYAML (YAML 1.1) reads 1e-4 and 5E-4 as strings, so `solver.base_lr=1e-3` was refused.
    path = _write(tmp_path / "c.yaml", "task: det\nsolver:\n  base_lr: 1e-4\n  weight_decay: 5E-4\n  gamma: 1.0e1\n")
    cfg = load_config(path)
    assert (cfg.solver.base_lr, cfg.solver.weight_decay, cfg.solver.gamma) == (1e-4, 5e-4, 10.0)
    assert all(type(v) is float for v in (cfg.solver.base_lr, cfg.solver.weight_decay, cfg.solver.gamma))
    cfg = load_config(
        path,
        [
            "solver.base_lr=1e-3",
            "solver.warmup_lr=2E-5",
            "model.roi_heads.score_thresh=5e-2",
            "model.roi_heads.bbox_reg_weights=[1e1, 10, 5.0, '5e0']",
        ],
    )
    assert (cfg.solver.base_lr, cfg.solver.warmup_lr, cfg.model.roi_heads.score_thresh) == (1e-3, 2e-5, 0.05)
    assert cfg.model.roi_heads.bbox_reg_weights == [10.0, 10.0, 5.0, 5.0]
    assert all(type(v) is float for v in cfg.model.roi_heads.bbox_reg_weights)


def test_int_keys_stay_int_and_bad_floats_name_the_key(tmp_path):
    path = _write(tmp_path / "c.yaml", "task: det\n")
    cfg = load_config(path, ["solver.max_iter=100"])
    assert cfg.solver.max_iter == 100 and type(cfg.solver.max_iter) is int
    with pytest.raises(ConfigError, match=r"solver\.max_iter: expected int, got '1e3'"):
        load_config(path, ["solver.max_iter=1e3"])
    for value in ("nan", ".nan", "inf", "-.inf", "1e999"):
        with pytest.raises(ConfigError, match=r"solver\.base_lr: expected a finite float"):
            load_config(path, [f"solver.base_lr={value}"])
    for value in ("abc", "1e-3x", "true", "[1]"):
        with pytest.raises(ConfigError, match=r"solver\.base_lr: expected float"):
            load_config(path, [f"solver.base_lr={value}"])
    with pytest.raises(ConfigError, match=r"bad\.yaml.*solver\.momentum: expected float, got 'fast'"):
        load_config(_write(tmp_path / "bad.yaml", "task: det\nsolver:\n  momentum: fast\n"))
    with pytest.raises(ConfigError, match=r"bbox_reg_weights\[2\]: expected float, got 'x'"):
        load_config(path, ["model.roi_heads.bbox_reg_weights=[1, 2, x, 4]"])
