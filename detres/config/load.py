"""Load a YAML config over the defaults tree, apply key=value overrides, reject unknown keys."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from detres.config.defaults import defaults_for_task
from detres.config.validate import ConfigError, validate_config

__all__ = ["Config", "ConfigError", "config_from_tree", "dump_config", "load_config", "parse_overrides"]


class Config(dict):
    """A nested dict with attribute access (``cfg.solver.base_lr``); values are plain Python types."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(f"config has no key {name!r}") from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _to_config(tree: Mapping) -> Config:
    return Config({k: _to_config(v) if isinstance(v, Mapping) else v for k, v in tree.items()})


def _to_float(value: Any, where: str) -> float:
    """A finite float from an int, a float or a numeric string; ConfigError naming ``where`` otherwise.

    PyYAML follows YAML 1.1, whose float pattern needs a dot: ``1e-4`` and ``5E-4`` (in a file or on the
    command line) load as the *strings* '1e-4' and '5E-4'. Python's float() reads them as the numbers
    they plainly are. NaN and infinities are no learning rate, weight or threshold, so they are refused.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    else:
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite float, got {value!r}")
    return number


def _check_type(default: Any, value: Any, where: str) -> Any:
    """Return ``value`` coerced to the default's type where that is lossless; raise otherwise.

    A float key takes an int, a float or a string that reads as a finite float ('1e-4'); an int key
    takes only an int; a list of floats (e.g. ``bbox_reg_weights``) takes the same per element.
    """
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        return _to_float(value, where)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if default and all(isinstance(v, float) for v in default):
            return [_to_float(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if isinstance(default, (int, float, str)) and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _merge(base: dict, update: Mapping, where: str) -> None:
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            known = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"unknown config key {path!r}; known keys here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a mapping of options, got {value!r}")
            _merge(base[key], value, path)
        else:
            base[key] = _check_type(base[key], value, path)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file, resolving ``_base_`` (a path relative to the file) recursively."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML{_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base_ref = data.pop("_base_", None)
    if base_ref is None:
        return data
    base = _read_yaml((path.parent / base_ref).resolve(), seen + (path,))
    return _deep_update(base, data)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from a PyYAML error: where and what (its str() spans several lines with a source excerpt).

    safe_load refuses tags such as ``!!python/object/apply`` with "could not determine a constructor".
    """
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    refused_tag = "constructor" in problem
    hint = " (only plain YAML values are allowed; tags such as !!python/... are refused)" if refused_tag else ""
    return f"{where}: {' '.join(str(problem).split())}{hint}"


def _deep_update(base: dict, update: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: Iterable[str]) -> dict:
    """Turn ``["solver.base_lr=0.01", "model.depth=18"]`` into a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: invalid YAML value{_yaml_problem(exc)}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), *, task: str | None = None) -> Config:
    """Defaults for the file's ``task`` (or ``task``), updated by the file, then by the overrides."""
    data = _read_yaml(Path(path).resolve()) if path is not None else {}
    over = parse_overrides(overrides)
    chosen = over.get("task") or data.get("task") or task
    if chosen is None:
        raise ConfigError(f"{path}: missing 'task' (one of cls, det, loc)")
    tree = defaults_for_task(chosen)
    where = str(path) if path is not None else "<defaults>"
    try:
        _merge(tree, data, "")
        _merge(tree, over, "")
        validate_config(tree, defaults_for_task(chosen))  # types and ranges, before any tool writes output
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return _to_config(tree)


def config_from_tree(tree: Mapping, *, task: str) -> Config:
    """A ``task`` config from a (possibly partial) nested mapping, e.g. a checkpoint's stored tree: merged over the
    defaults and validated as a YAML file would be (unknown keys and bad values are ConfigErrors)."""
    if tree.get("task", task) != task:
        raise ConfigError(f"task: expected {task!r}, got {tree.get('task')!r}")
    merged = defaults_for_task(task)
    _merge(merged, tree, "")
    validate_config(merged, defaults_for_task(task))
    return _to_config(merged)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config next to a run's outputs (atomically)."""
    from detres.utils.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
