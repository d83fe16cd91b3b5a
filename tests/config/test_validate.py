"""Config values are checked against the key -> rule table when loaded: null, zero, bad choices, YAML tags, devices."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import ConfigError, load_config
from detres.config.validate import Rule, check_device, check_value, rules_for_task


def _cfg(tmp_path, task: str, overrides: list[str]):
    path = tmp_path / "c.yaml"
    path.write_text(f"task: {task}\n")
    return load_config(path, overrides)


@pytest.mark.parametrize(
    "task,override,key",
    [
        ("cls", "solver.max_iter=null", "solver.max_iter"),
        ("det", "solver.max_iter=null", "solver.max_iter"),
        ("loc", "solver.max_iter=0", "solver.max_iter"),
        ("det", "solver.max_iter=0", "solver.max_iter"),
        ("cls", "solver.base_lr=null", "solver.base_lr"),
        ("det", "solver.base_lr=0", "solver.base_lr"),
        ("cls", "output_dir=null", "output_dir"),
        ("det", "output_dir=''", "output_dir"),
        ("cls", "solver.checkpoint_period=0", "solver.checkpoint_period"),
        ("det", "solver.log_period=0", "solver.log_period"),
        ("det", "solver.keep_checkpoints=-1", "solver.keep_checkpoints"),
        ("loc", "solver.keep_checkpoints=null", "solver.keep_checkpoints"),
        ("cls", "solver.batch_size=0", "solver.batch_size"),
        ("det", "solver.images_per_batch=0", "solver.images_per_batch"),
        ("loc", "solver.images_per_batch=-1", "solver.images_per_batch"),
        ("cls", "solver.eval_period=0", "solver.eval_period"),
        ("det", "data.on_bad_sample=ignore", "data.on_bad_sample"),
        ("det", "data.format=yolo", "data.format"),
        ("cls", "test.batch_size=0", "test.batch_size"),
        ("det", "input.min_size_train=[0]", "input.min_size_train"),
        ("det", "input.flip_prob=1.5", "input.flip_prob"),
        ("cls", "model.depth=null", "model.depth"),
    ],
)
def test_out_of_range_or_null_value_is_one_line_error_naming_the_key(tmp_path, task, override, key):
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, task, [override])
    message = str(info.value)
    assert key in message and "expected" in message and "c.yaml" in message
    assert "\n" not in message


def test_valid_edge_values_are_accepted(tmp_path):
    cfg = _cfg(
        tmp_path,
        "det",
        [
            "solver.eval_period=0",
            "solver.max_iter=1",
            "solver.weight_decay_bias=null",
            "data.on_bad_sample=skip",
            "input.flip_prob=0.0",
            "device=cuda:1",
        ],
    )
    assert cfg.solver.eval_period == 0 and cfg.solver.weight_decay_bias is None and cfg.data.on_bad_sample == "skip"
    assert _cfg(tmp_path, "cls", []).data.on_bad_sample == "error"  # the safe default
    assert _cfg(tmp_path, "loc", []).data.on_bad_sample == "error"


@pytest.mark.parametrize("device", ["foo", "gpu", "cuda:x", "CPU"])
def test_unknown_device_names_the_valid_forms(tmp_path, device):
    with pytest.raises(ConfigError, match=r"device: expected auto, cpu, cuda, cuda:N or mps"):
        _cfg(tmp_path, "cls", [f"device={device}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_when_the_device_is_resolved():
    with pytest.raises(ConfigError, match=r"device=cuda: this machine has no CUDA GPU.*device=cpu"):
        check_device("cuda", need_available=True)
    assert check_device("cpu", need_available=True) == "cpu"


def test_cuda_index_beyond_the_machines_gpus_is_refused():
    with pytest.raises(ConfigError, match=r"device=cuda:99: this machine has"):
        check_device("cuda:99", need_available=True)


def test_python_yaml_tag_is_refused_in_one_line_naming_the_file(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("task: cls\nseed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "evil.yaml" in message and "line 2" in message and "python/object/apply" in message
    assert "\n" not in message


def test_bad_yaml_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'seed=\[1': invalid YAML value"):
        load_config(None, ["seed=[1"], task="cls")


def test_rule_table_describes_itself_and_checks_values():
    assert check_value(Rule("int", minimum=1), 1) and not check_value(Rule("int", minimum=1), 0)
    assert not check_value(Rule("int", minimum=1), True)  # a bool is no count
    assert not check_value(Rule("float", above=0), None) and check_value(Rule("float", nullable=True), None)
    assert Rule("int", minimum=1).describe() == "an integer >= 1"
    assert "solver.max_iter" in rules_for_task("det") and rules_for_task("det")["solver.eval_period"].minimum == 0
