"""Typed and ranged checks of config values, driven by one table of key -> rule, run when a config is loaded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMON_RULES", "ConfigError", "Rule", "TASK_RULES", "check_device", "rules_for_task", "validate_config"]


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type or range."""


@dataclass(frozen=True)
class Rule:
    """What a key accepts: ``kind`` (int, float, str, ints = list of ints), an inclusive ``minimum`` / ``maximum``,
    ``above`` (exclusive minimum), ``choices``, ``nullable`` (None allowed)."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        else:
            text = {
                "int": "an integer",
                "float": "a number",
                "str": "a non-empty string",
                "ints": "a list of integers",
            }[self.kind]
            bounds = [
                f">= {self.minimum:g}" if self.minimum is not None else "",
                f"> {self.above:g}" if self.above is not None else "",
                f"<= {self.maximum:g}" if self.maximum is not None else "",
            ]
            bounds = [b for b in bounds if b]
            if bounds:
                joined = " and ".join(bounds)
                text += f" (each {joined})" if self.kind == "ints" else f" {joined}"
        return text + (" or null" if self.nullable else "")


POSITIVE_INT = Rule("int", minimum=1)
NON_NEGATIVE_INT = Rule("int", minimum=0)
POSITIVE_FLOAT = Rule("float", above=0)
NON_NEGATIVE_FLOAT = Rule("float", minimum=0)
FRACTION = Rule("float", minimum=0, maximum=1)
POSITIVE_INTS = Rule("ints", minimum=1)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
BAD_SAMPLE_POLICIES = ("error", "skip")
KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "list": "a list"}

# Keys every task shares (checked where the task's tree has them).
COMMON_RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE_INT,
    "output_dir": Rule("str"),
    "device": Rule("str"),  # its form is checked by check_device
    "data.num_workers": NON_NEGATIVE_INT,
    "data.on_bad_sample": Rule("str", choices=BAD_SAMPLE_POLICIES),
    "solver.base_lr": POSITIVE_FLOAT,
    "solver.max_iter": POSITIVE_INT,
    "solver.batch_size": POSITIVE_INT,
    "solver.images_per_batch": POSITIVE_INT,
    "solver.momentum": FRACTION,
    "solver.weight_decay": NON_NEGATIVE_FLOAT,
    "solver.weight_decay_bias": Rule("float", minimum=0, nullable=True),  # None = weight_decay
    "solver.bias_lr_factor": NON_NEGATIVE_FLOAT,
    "solver.gamma": POSITIVE_FLOAT,
    "solver.steps": Rule("ints", minimum=0),
    "solver.warmup_iters": NON_NEGATIVE_INT,
    "solver.warmup_lr": NON_NEGATIVE_FLOAT,
    "solver.checkpoint_period": POSITIVE_INT,
    "solver.log_period": POSITIVE_INT,
    "solver.keep_checkpoints": NON_NEGATIVE_INT,  # 0 = last.pt only
    "solver.amp_dtype": Rule("str", choices=("float16", "bfloat16")),
}

TASK_RULES: dict[str, dict[str, Rule]] = {
    "cls": {
        "solver.eval_period": POSITIVE_INT,  # also drives the plateau rule: every run evaluates
        "solver.lr_schedule": Rule("str", choices=("plateau", "step")),
        "solver.plateau_patience": NON_NEGATIVE_INT,
        "solver.min_lr": NON_NEGATIVE_FLOAT,
        "data.train_dir": Rule("str"),
        "data.val_dir": Rule("str"),
        "data.mean_mode": Rule("str", choices=("per_pixel", "per_channel")),
        "data.stats_max_images": Rule("int", minimum=1, nullable=True),
        "augment.mode": Rule("str", choices=("imagenet", "cifar")),
        "augment.scale_min": POSITIVE_INT,
        "augment.scale_max": POSITIVE_INT,
        "augment.crop": POSITIVE_INT,
        "augment.cifar_pad": NON_NEGATIVE_INT,
        "test.resize": POSITIVE_INT,
        "test.scales": POSITIVE_INTS,
        "test.batch_size": POSITIVE_INT,
        "bn_recompute.batch_size": POSITIVE_INT,
        "bn_recompute.max_images": Rule("int", minimum=1, nullable=True),
    },
    "det": {
        "solver.eval_period": NON_NEGATIVE_INT,  # 0 = evaluate only at the end
        "data.format": Rule("str", choices=("coco", "voc")),
        "data.train_images": Rule("str"),
        "data.train_ann": Rule("str"),
        "data.val_images": Rule("str"),
        "data.val_ann": Rule("str"),
        "input.min_size_train": POSITIVE_INTS,
        "input.max_size_train": POSITIVE_INT,
        "input.min_size_test": POSITIVE_INT,
        "input.max_size_test": POSITIVE_INT,
        "input.flip_prob": FRACTION,
        "model.roi_heads.detections_per_img": POSITIVE_INT,
        "model.roi_heads.pooler_resolution": POSITIVE_INT,
        "model.rpn.batch_size_per_image": POSITIVE_INT,
        "model.roi_heads.batch_size_per_image": POSITIVE_INT,
        "test.vis_images": NON_NEGATIVE_INT,
    },
    "loc": {
        "data.format": Rule("str", choices=("ilsvrc", "tiny_imagenet")),
        "data.root": Rule("str"),
        "data.max_val_images": Rule("int", minimum=1, nullable=True),
        "input.scale_min": POSITIVE_INT,
        "input.scale_max": POSITIVE_INT,
        "input.crop": POSITIVE_INT,
        "input.flip_prob": FRACTION,
        "test.scale": POSITIVE_INT,
        "test.top_n": POSITIVE_INT,
        "model.rpn.batch_size_per_image": POSITIVE_INT,
        "model.rcnn.regions_per_batch": POSITIVE_INT,
        "model.rcnn.proposals_per_class": POSITIVE_INT,
        "model.rcnn.crop_size": POSITIVE_INT,
    },
}


def rules_for_task(task: str) -> dict[str, Rule]:
    """The table that applies to ``task``: the shared rules, then the task's own (which win)."""
    return {**COMMON_RULES, **TASK_RULES.get(task, {})}


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(rule: Rule, value: float) -> bool:
    return (
        (rule.minimum is None or value >= rule.minimum)
        and (rule.maximum is None or value <= rule.maximum)
        and (rule.above is None or value > rule.above)
    )


def check_value(rule: Rule, value: Any) -> bool:
    """True when ``value`` satisfies ``rule``."""
    if value is None:
        return rule.nullable
    if rule.choices is not None:
        return value in rule.choices
    if rule.kind == "int":
        return _is_int(value) and _in_range(rule, value)
    if rule.kind == "float":
        return _is_number(value) and _in_range(rule, float(value))
    if rule.kind == "str":
        return isinstance(value, str) and bool(value.strip())
    if rule.kind == "ints":
        return isinstance(value, (list, tuple)) and all(_is_int(v) and _in_range(rule, v) for v in value)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def check_device(name: Any, *, key: str = "device", need_available: bool = False) -> str:
    """``name`` if it is auto, cpu, mps, cuda or cuda:N; with ``need_available`` also that the device exists here."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ConfigError(f"{key}: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if need_available and name.startswith("cuda"):
        import torch  # only here: loading a config must not need torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA GPU (torch.cuda.is_available() is False)"
            raise ConfigError(f"{key}={name}: this machine has {found}; use device=auto or device=cpu")
    if need_available and name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError(f"{key}=mps: MPS is not available on this machine; use device=auto or device=cpu")
    return name


def _null_leaves(defaults: Mapping[str, Any], tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keys whose default is a value but that are set to null (None would reach code expecting a number)."""
    found = []
    for key, default in defaults.items():
        path = f"{prefix}{key}"
        if isinstance(default, Mapping):
            if isinstance(tree.get(key), Mapping):
                found += _null_leaves(default, tree[key], path + ".")
        elif default is not None and tree.get(key, default) is None:
            found.append(path)
    return found


def validate_config(tree: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
    """Raise ConfigError naming the first key whose value breaks its rule (type, range, choices, null).

    ``defaults`` (the task's default tree) also refuses null for keys whose default is a value, unless
    the key's rule is nullable.
    """
    rules = rules_for_task(str(tree.get("task")))
    if defaults is not None:
        for key in _null_leaves(defaults, tree):
            rule = rules.get(key)
            if rule is None or not rule.nullable:
                kind = type(_lookup(defaults, key)[1]).__name__
                expected = rule.describe() if rule else KIND_WORDS.get(kind, f"a {kind} value")
                raise ConfigError(f"{key}: null is not allowed; expected {expected}")
    for key, rule in rules.items():
        present, value = _lookup(tree, key)
        if present and not check_value(rule, value):
            raise ConfigError(f"{key}: expected {rule.describe()}, got {value!r}")
    if "device" in tree:
        check_device(tree["device"])
