"""Issue 10, cases 6 and 11 at the tools: a bad config value, device, YAML tag, hand-edited checkpoint or --classes name
exits with a one-line error naming the key or file (status 2; eval_det keeps its 1), before any output is written."""

from __future__ import annotations

import pytest
import torch
import yaml

from detres.utils.torch_files import load_checkpoint, save_checkpoint
from tests.tool_loader import load_tool

TRAIN_TOOLS = {"cls": "train_cls", "det": "train_det", "loc": "train_loc"}


def _run(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    code = load_tool(tool).main(argv)
    return code, capsys.readouterr().err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("task", ["cls", "det", "loc"])
@pytest.mark.parametrize(
    "override,key",
    [
        ("solver.max_iter=null", "solver.max_iter"),
        ("solver.max_iter=0", "solver.max_iter"),
        ("solver.base_lr=null", "solver.base_lr"),
        ("output_dir=null", "output_dir"),
        ("solver.checkpoint_period=0", "solver.checkpoint_period"),
        ("solver.log_period=0", "solver.log_period"),
        ("device=foo", "device"),
    ],
)
def test_train_tools_refuse_bad_values_before_writing_anything(tmp_path, capsys, task, override, key):
    config = tmp_path / "c.yaml"
    out = tmp_path / "run"
    config.write_text(yaml.safe_dump({"task": task, "output_dir": str(out)}))
    code, err = _run(TRAIN_TOOLS[task], ["--config", str(config), override], capsys)
    assert code == 2
    _one_line_error(err, key, "c.yaml" if key != "device" else "device", "expected")
    assert not out.exists()


@pytest.mark.parametrize(
    "task,override",
    [("cls", "solver.batch_size=0"), ("det", "solver.images_per_batch=0"), ("loc", "solver.images_per_batch=0")],
)
def test_zero_batch_size_is_refused(tmp_path, capsys, task, override):
    config = tmp_path / "c.yaml"
    config.write_text(f"task: {task}\noutput_dir: {tmp_path / 'run'}\n")
    code, err = _run(TRAIN_TOOLS[task], ["--config", str(config), override], capsys)
    assert code == 2
    _one_line_error(err, override.split("=")[0], "an integer >= 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_cls_on_cuda_without_a_gpu_fails_before_writing(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    out = tmp_path / "run"
    config.write_text(f"task: cls\noutput_dir: {out}\ndevice: cuda\n")
    code, err = _run("train_cls", ["--config", str(config)], capsys)
    assert code == 2
    _one_line_error(err, "device=cuda", "no CUDA GPU")
    # No config.yaml, checkpoint or log: at most the folder's run lock, taken before the run starts.
    assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}


def test_yaml_python_tag_is_refused(tmp_path, capsys):
    config = tmp_path / "evil.yaml"
    config.write_text("task: det\noutput_dir: !!python/object/apply:os.getcwd []\n")
    code, err = _run("train_det", ["--config", str(config)], capsys)
    assert code == 2
    _one_line_error(err, "evil.yaml", "invalid YAML at line 2", "python/object/apply")


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s["meta"].pop("class_names"), "meta.class_names is missing"),
        (
            lambda s: s["config"]["model"].update(bogus_option=3),
            "its config: unknown config key 'model.bogus_option'; known keys here:",
        ),
        (lambda s: s.pop("config"), "not a train_det checkpoint (missing ['config'])"),
        (lambda s: s["meta"].update(class_names=["only_one"]), "'model' weights do not fit its config's model"),
    ],
)
def test_test_det_refuses_a_hand_edited_checkpoint(
    tmp_path, capsys, tiny_det_checkpoint, write_tiny_det_config, edit, needle
):
    state = load_checkpoint(tiny_det_checkpoint)
    edit(state)
    edited = tmp_path / "edited.pt"
    save_checkpoint(edited, state)
    config = write_tiny_det_config(tmp_path / "c.yaml", tmp_path / "run")
    code, err = _run("test_det", ["--config", str(config), "--checkpoint", str(edited)], capsys)
    assert code == 2
    _one_line_error(err, "edited.pt", needle)


def _voc_annotations(folder) -> None:
    folder.mkdir()
    for image_id, name in (("a", "cat"), ("b", "dog")):
        (folder / f"{image_id}.xml").write_text(
            f"<annotation><size><width>50</width><height>40</height></size><object><name>{name}</name>"
            "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>"
        )


def test_eval_det_voc_unknown_class_lists_the_valid_ones(tmp_path, capsys):
    _voc_annotations(tmp_path / "ann")
    (tmp_path / "det_cat.txt").write_text("a 0.9 5 5 20 20\n")
    results = str(tmp_path / "det_{cls}.txt")
    code, err = _run(
        "eval_det",
        ["voc", "--annotations", str(tmp_path / "ann"), "--results", results, "--classes", "cat", "caat"],
        capsys,
    )
    assert code == 1
    _one_line_error(err, "['caat']", "valid classes: cat, dog")
    code = load_tool("eval_det").main(
        ["voc", "--annotations", str(tmp_path / "ann"), "--results", results, "--classes", "cat"]
    )
    assert code == 0 and "mAP" in capsys.readouterr().out


def _det_run_config(det, out, path, **data) -> str:
    """A 1-iteration CPU detector run on the small shapes world (quarter-width ResNet-18, ~128 px inputs)."""
    cfg = {
        "task": "det",
        "output_dir": str(out),
        "device": "cpu",
        "model": {
            "depth": 18,
            "base_width": 16,
            "anchor_sizes": [16, 32, 64],
            "rpn": {
                "pre_nms_top_n_train": 100,
                "post_nms_top_n_train": 20,
                "pre_nms_top_n_test": 100,
                "post_nms_top_n_test": 20,
                "batch_size_per_image": 32,
            },
            "roi_heads": {"batch_size_per_image": 8, "pooler_resolution": 8},
        },
        "data": {
            "format": "coco",
            "train_images": str(det / "images"),
            "train_ann": str(det / "annotations" / "instances_train.json"),
            "val_images": str(det / "images"),
            "val_ann": str(det / "annotations" / "instances_val.json"),
            "num_workers": 0,
            **data,
        },
        "input": {"min_size_train": [96], "max_size_train": 128, "min_size_test": 96, "max_size_test": 128},
        "solver": {
            "images_per_batch": 1,
            "base_lr": 0.001,
            "max_iter": 1,
            "steps": [],
            "eval_period": 0,
            "checkpoint_period": 1,
            "log_period": 1,
        },
        "test": {"vis_images": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_det_with_a_missing_val_image_stops_or_skips_and_lists_it(small_det_world, tmp_path, capsys):
    import json
    import shutil
    import warnings

    det = tmp_path / "det"
    shutil.copytree(small_det_world, det)
    val = json.loads((det / "annotations" / "instances_val.json").read_text())
    missing = det / "images" / val["images"][0]["file_name"]
    missing.unlink()
    strict = _det_run_config(det, tmp_path / "strict", tmp_path / "strict.yaml")
    code, err = _run("train_det", ["--config", strict], capsys)
    assert code == 2
    _one_line_error(err, str(missing), "image file does not exist", "data.on_bad_sample=skip")
    assert not (tmp_path / "strict" / "last.pt").exists()  # stopped before the first iteration
    lenient = _det_run_config(det, tmp_path / "lenient", tmp_path / "lenient.yaml", on_bad_sample="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model's evaluation warns about classes without detections
        code, err = _run("train_det", ["--config", lenient], capsys)
    assert code == 0, err
    listed = json.loads((tmp_path / "lenient" / "skipped_samples.json").read_text())
    assert listed["count"] == 1 and listed["samples"][0] == {
        "file": str(missing),
        "kind": "missing image",
        "reason": "image file does not exist",
    }
    assert (tmp_path / "lenient" / "model_final.pt").is_file()
