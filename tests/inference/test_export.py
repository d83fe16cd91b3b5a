"""Exported detectors (TorchScript run in torch, ONNX in onnxruntime) against the eager model on shapes-world images."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from detres.data.shapes.scene import render_detection_image
from detres.data.transforms.imagenet_stats import IMAGENET_STD_RGB
from detres.inference.export import (
    SingleImageDetector,
    example_image,
    export_detector,
    export_input,
    export_torchscript,
)
from detres.inference.predictor import Predictor
from detres.models.build import build_detector, detector_state
from detres.utils.torch_files import save_checkpoint
from tests.inference.conftest import tiny_detector
from tests.tiny_configs import det_input_config, det_model_config
from tests.tool_loader import load_tool

META = {"class_names": ["circle", "square", "star"], "min_size_test": 112, "max_size_test": 160}
# (pooler_type, global_context): both poolers, and the Appendix-B whole-image context heads
VARIANTS = [("roi_align", False), ("roi_pool", False), ("roi_align", True)]


def trained_scale_detector(pooler_type: str, global_context: bool = False) -> torch.nn.Module:
    """conftest's tiny detector with a trained detector's activation sizes: inputs divided by the ImageNet std,
    class logits of std ~2 and box deltas of std ~0.5. With raw 0..255 inputs the random trunk's features
    reach ~2000, where onnxruntime's and torch's conv kernels, 1 ulp apart (~1e-7 relative), end up 1.6e-3 px
    apart in the boxes: the comparison would test the random network's conditioning, not the export."""
    model = tiny_detector(
        0,
        roi_heads={"pooler_type": pooler_type},
        pixel_std=list(IMAGENET_STD_RGB),
        global_context=global_context,
        test_scale=(META["min_size_test"], META["max_size_test"]),  # export_input's images stay at their size
    )
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.normal_(std=0.1)
        model.roi_heads.predictor.bbox_pred.weight.normal_(std=0.03)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Two shapes-world scenes resized as the Predictor resizes them: 123x112 and 112x115 (neither a multiple of 16)."""
    out = [
        export_input(
            render_detection_image(np.random.default_rng(seed)).image, META["min_size_test"], META["max_size_test"]
        )[0]
        for seed in (0, 1)
    ]
    assert out[0].shape != out[1].shape
    return out


def eager(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model([image])[0]


def assert_same_detections(got, ref: dict[str, torch.Tensor]) -> None:
    boxes, scores, labels = (t.detach().numpy() if isinstance(t, torch.Tensor) else t for t in got)
    assert len(ref["scores"]) > 0  # a comparison of two empty results would prove nothing
    assert (boxes.dtype, scores.dtype, labels.dtype) == (np.float32, np.float32, np.int64)
    assert labels.tolist() == ref["labels"].tolist()
    np.testing.assert_allclose(boxes, ref["boxes"].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores, ref["scores"].numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("pooler_type, global_context", VARIANTS)
def test_torchscript_matches_eager(
    pooler_type: str, global_context: bool, images: list[torch.Tensor], tmp_path
) -> None:
    model = trained_scale_detector(pooler_type, global_context)
    info = export_detector(model, tmp_path, formats=["torchscript"], meta=META, example_hw=(112, 140))
    assert info["formats"]["torchscript"]["method"] == "trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "model.ts"]  # no temp files left
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    for image in images:
        assert_same_detections(loaded(image), eager(model, image))


@pytest.mark.parametrize("pooler_type, global_context", VARIANTS)
def test_onnx_in_onnxruntime_matches_eager(
    pooler_type: str, global_context: bool, images: list[torch.Tensor], tmp_path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = trained_scale_detector(pooler_type, global_context)
    info = export_detector(model, tmp_path, formats=["onnx"], meta=META, example_hw=(112, 140))
    proto = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(proto)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert info["formats"]["onnx"]["opset"] == opset
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for image in images:
        assert_same_detections(session.run(None, {"image": image.numpy()}), eager(model, image))


def test_export_input_and_contract_reproduce_the_predictor(tmp_path) -> None:
    """export_input's size and factors are the model transform's; the model's resize, the exported model and
    export.json's way back to original pixels = Predictor.predict. (export_input resizes the uint8 image with cv2,
    the model the float image with torch: the pixels agree up to cv2's rounding to uint8.)"""
    model = trained_scale_detector("roi_align")
    export_detector(model, tmp_path, formats=["torchscript"], meta=META, example_hw=(112, 140))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    image = render_detection_image(np.random.default_rng(2)).image
    cv2_resized, (sx, sy) = export_input(image, META["min_size_test"], META["max_size_test"])
    resized = model.transform.resize(torch.from_numpy(image).permute(2, 0, 1).float())
    assert resized.shape == cv2_resized.shape and (sx, sy) == (
        resized.shape[2] / image.shape[1],
        resized.shape[1] / image.shape[0],
    )
    assert float((resized - cv2_resized).abs().max()) <= 1.0
    with torch.no_grad():
        boxes, scores, labels = loaded(resized)
    height, width = image.shape[:2]
    boxes = (boxes / torch.tensor([sx, sy, sx, sy])).clamp(min=0).minimum(torch.tensor([width, height] * 2))
    ref = Predictor.from_model(model, META).predict(image)
    assert len(ref["scores"]) > 0 and labels.tolist() == ref["labels"].tolist()
    np.testing.assert_allclose(boxes.numpy(), ref["boxes"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), ref["scores"], rtol=0, atol=1e-4)


def test_export_traces_the_model_itself(images: list[torch.Tensor], tmp_path) -> None:
    """No restatement of the eval forward: the exported file holds the FasterRCNN and its own parameters."""
    assert importlib.util.find_spec("detres.inference.export_module") is None
    model = trained_scale_detector("roi_pool", global_context=True)
    export_detector(model, tmp_path, formats=["torchscript"], example_hw=(112, 140), fast_path=False)
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    assert loaded.model.original_name == "FasterRCNN"
    exported = loaded.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name
    # The traced module runs on the model's tensors, not a copy: a changed weight changes what it detects.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(SingleImageDetector(model).eval(), (images[0],), check_trace=False)
    before = traced(images[0])[1].clone()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[1] += 5.0
    after = traced(images[0])[1]
    assert not torch.equal(before, after)
    assert_same_detections(traced(images[0]), eager(model, images[0]))


@pytest.mark.parametrize("change", [{"voting": True}, {"nms_method": "soft_linear"}, {"nms_method": "soft_gaussian"}])
def test_unsupported_postprocess_is_refused(change: dict, tmp_path) -> None:
    model = trained_scale_detector("roi_align")
    model.roi_heads.postprocess = dataclasses.replace(model.roi_heads.postprocess, **change)
    with pytest.raises(ValueError, match="only hard NMS without box voting"):
        export_detector(model, tmp_path, formats=["torchscript"], example_hw=(64, 80))
    assert not (tmp_path / "model.ts").exists()


def test_training_mode_and_foreign_models_are_refused(tmp_path) -> None:
    model = trained_scale_detector("roi_align")
    with pytest.raises(ValueError, match="training mode"):
        export_torchscript(model.train(), tmp_path / "m.ts", example_image(64, 80))
    with pytest.raises(ValueError, match="expected a detres FasterRCNN"):
        export_torchscript(model.trunk, tmp_path / "m.ts", example_image(64, 80))


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model_cfg = det_model_config(
        depth=18,
        base_width=8,
        anchor_sizes=[16, 32, 64],
        pixel_std=list(IMAGENET_STD_RGB),
        rpn={"pre_nms_top_n_test": 200, "post_nms_top_n_test": 30},
        roi_heads={"pooler_type": "roi_align", "pooler_resolution": 4, "sampling_ratio": 2, "score_thresh": 0.01},
    )
    path = tmp_path / "det.pt"
    inp = det_input_config(min_size_test=META["min_size_test"], max_size_test=META["max_size_test"])
    model = build_detector(model_cfg, input_cfg=inp, num_classes=3).eval()
    config = {"task": "det", "model": model_cfg, "input": inp}
    save_checkpoint(path, {**detector_state(model, config=config, meta=META), "iter": 0})
    return path


def test_cli_writes_both_formats_and_the_contract(tmp_path) -> None:
    out = tmp_path / "export"
    assert load_tool("export").main(["--checkpoint", str(_checkpoint(tmp_path)), "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    assert (out / "model.ts").is_file() and (out / "model.onnx").is_file()
    assert set(info["formats"]) == {"torchscript", "onnx"} and info["formats"]["onnx"]["opset"] >= 11
    assert info["class_names"] == META["class_names"] and info["fast_path"] is True
    assert info["example_hw"] == [112, 140] and info["input"]["shape"] == [3, "H", "W"]


def test_cli_one_format_without_fast_path(tmp_path) -> None:
    out = tmp_path / "export"
    argv = [
        "--checkpoint",
        str(_checkpoint(tmp_path)),
        "--out",
        str(out),
        "--format",
        "onnx",
        "--no-fast-path",
        "--size",
        "64",
        "--opset",
        "17",
    ]
    assert load_tool("export").main(argv) == 0
    info = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert info["fast_path"] is False and info["formats"]["onnx"]["opset"] == 17 and info["example_hw"] == [64, 80]


@pytest.mark.parametrize("case", ["missing", "format"])
def test_cli_bad_input_exits_2_with_one_line(case: str, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "nope.pt" if case == "missing" else _checkpoint(tmp_path)
    argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    assert load_tool("export").main(argv + (["--format", "tflite"] if case == "format" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export: error:") and "\n" not in err
    assert ("nope.pt" if case == "missing" else "tflite") in err
    assert not (tmp_path / "o").exists()
