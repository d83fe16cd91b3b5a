"""Export a trained detector: TorchScript and ONNX files of its single-image eval forward, plus export.json.

Both formats trace the detector itself (:class:`SingleImageDetector` around ``FasterRCNN.detect``): its eval
steps keep a traced image's size as a value of the graph, and the data-dependent ones (pre-NMS top-n, NMS, the
context crop) are compiled into it, so the files take any image size."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from detres.data.transforms.detection import build_det_transforms, finalize_sample
from detres.inference.fast_path import prepare_for_inference
from detres.models.detection.faster_rcnn import FasterRCNN
from detres.models.detection.rpn import RegionProposalNetwork
from detres.utils.atomic import atomic_write_bytes, write_json_atomic

__all__ = [
    "EXPORT_FORMATS",
    "FILE_NAMES",
    "SingleImageDetector",
    "default_onnx_opset",
    "example_image",
    "export_detector",
    "export_input",
    "export_onnx",
    "export_torchscript",
    "input_contract",
]

EXPORT_FORMATS = ("torchscript", "onnx")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
# torchvision's nms / roi_pool / roi_align have ONNX symbolics from opset 11 (roi_align's `aligned` from 16).
MIN_ONNX_OPSET = 11


def default_onnx_opset() -> int:
    """The installed torch's default opset for the TorchScript-based ONNX exporter (its newest fully supported one)."""
    try:
        from torch.onnx import _constants
    except ImportError:  # a torch that moved the private constants: opset 17 is supported by every torch >= 2.0
        return 17
    return int(getattr(_constants, "ONNX_DEFAULT_OPSET", 17))


def example_image(height: int, width: int, seed: int = 0) -> Tensor:
    """A deterministic 0..255 float image [3,H,W] to trace with (noise gives the RPN and heads something to do)."""
    if height < 1 or width < 1:
        raise ValueError(f"example_image: size must be positive, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, int(height), int(width), generator=generator) * 255


def export_input(image_rgb: np.ndarray, min_size: int, max_size: int) -> tuple[Tensor, tuple[float, float]]:
    """An RGB image [H,W,3] (uint8 or 0..255 float) as the exported models take it: resized exactly as the
    Predictor resizes (shorter side ``min_size``, longer side at most ``max_size``, cv2 bilinear), float32
    [3,H',W']. Also returns (sx, sy) = (W'/W, H'/H): divide the boxes' x by sx and y by sy to get back."""
    transform = build_det_transforms(train=False, min_size=int(min_size), max_size=int(max_size))
    image = image_rgb if image_rgb.dtype == np.uint8 else image_rgb.astype(np.float32)
    sample = {
        "image": np.ascontiguousarray(image),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "image_id": 0,
        "orig_size": tuple(image.shape[:2]),
    }
    out = finalize_sample(sample, transform)
    sx, sy = out["scale_xy"]
    return out["image"], (float(sx), float(sy))


class SingleImageDetector(nn.Module):
    """The exported signature around a detector: ``image`` float [3,H,W], RGB on the 0..255 scale, already
    resized as the Predictor resizes (any H, W) -> ``boxes`` float32 [N,4] xyxy in the input's pixels (clipped),
    ``scores`` float32 [N] (decreasing), ``labels`` int64 [N] in 1..K: ``model([image])[0]`` as a tuple.

    Only the signature is adapted: normalising and padding are ``model.preprocess``, the rest is
    ``model.detect`` (trunk, RPN, RoI heads, post-processing), on the model's own modules and parameters.
    """

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, _ = self.model.preprocess([image])
        # The image's own (traced) sizes: preprocess returns ints, which would freeze a trace to the example.
        detections = self.model.detect(batch, [(image.shape[1], image.shape[2])])[0]
        return detections["boxes"], detections["scores"], detections["labels"]


def _check_supported(model: nn.Module) -> None:
    """Raise ValueError for a detector whose eval forward does not trace: another model than a detres FasterRCNN
    with the one-objectness RPN, a model in training mode, soft-NMS or box voting (loops over the detections)."""
    if not isinstance(model, FasterRCNN):
        raise ValueError(f"export: expected a detres FasterRCNN, got {type(model).__name__}")
    if model.training:
        raise ValueError("export: the detector is in training mode; call model.eval() first")
    if type(model.rpn) is not RegionProposalNetwork or model.rpn.head.num_classes != 1:
        raise ValueError("export: only the Faster R-CNN RPN (one objectness per anchor) is supported")
    post = model.roi_heads.postprocess
    if post.nms_method != "nms" or post.voting:
        raise ValueError(
            f"export: only hard NMS without box voting is supported, the detector has "
            f"nms_method={post.nms_method!r}, voting={post.voting}"
        )


def _exportable(model: nn.Module) -> SingleImageDetector:
    _check_supported(model)
    return SingleImageDetector(model).eval()


def _check_example(example: Tensor) -> None:
    image_like = isinstance(example, Tensor) and example.dim() == 3 and example.shape[0] == 3
    if not image_like or not example.is_floating_point():
        got = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"export: example must be a float image tensor [3,H,W] (RGB 0..255), got {got}")


def _same_detections(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """Two (boxes, scores, labels) results agree: same count and labels, values to fp32 rounding."""
    return (
        a[0].shape == b[0].shape
        and torch.equal(a[2], b[2])
        and torch.allclose(a[0], b[0], atol=1e-4)
        and torch.allclose(a[1], b[1], atol=1e-6)
    )


def _second_size(example: Tensor) -> Tensor:
    """A crop of ``example`` of another size (padding, anchors and clipping must follow it)."""
    height, width = example.shape[1:]
    return example[:, : max(17, height * 3 // 4 + 1), : max(17, width - 9)].contiguous()


def _trace_checked(module: SingleImageDetector, example: Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace of the whole module, refused unless it reproduces the module on a second image size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
    second = _second_size(example)
    if not _same_detections(traced(second), module(second)):
        raise RuntimeError(
            f"export: the traced model does not generalise from {tuple(example.shape[1:])} to "
            f"{tuple(second.shape[1:])}: tracing froze a size-dependent step"
        )
    return traced


def export_torchscript(model: nn.Module, path: str | Path, example: Tensor) -> str:
    """Write ``model``'s single-image eval forward as TorchScript to ``path`` (atomically); returns how, "trace":
    torch.jit.trace of :class:`SingleImageDetector` (its data-dependent steps compiled in), checked on a second
    image size. Load with ``torch.jit.load(path)``; call ``m(image)``."""
    _check_example(example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 calls TorchScript deprecated; it still works
        compiled = _trace_checked(_exportable(model), example)
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return "trace"


def export_onnx(model: nn.Module, path: str | Path, example: Tensor, opset: int | None = None) -> int:
    """Write ``model``'s single-image eval forward as ONNX to ``path`` (atomically); returns the opset used.

    The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) traces the module; the input's
    H and W and every output's length are dynamic axes, and the data-dependent steps (the RPN's pre-NMS
    top-n, batched NMS, the context crop) are compiled into the graph. torchvision's nms becomes
    NonMaxSuppression, roi_align RoiAlign, roi_pool MaxRoiPool. ``opset``: None = :func:`default_onnx_opset`.
    """
    _check_example(example)
    opset = default_onnx_opset() if opset is None else int(opset)
    if opset < MIN_ONNX_OPSET:
        raise ValueError(f"export_onnx: opset {opset} is too old; torchvision's ops need >= {MIN_ONNX_OPSET}")
    module = _exportable(model)
    pooler = model.roi_heads.pooler
    if pooler.pooler_type == "roi_align" and pooler.aligned and opset < 16:
        raise ValueError(f"export_onnx: roi_align with aligned=True needs opset >= 16, got {opset}")
    dynamic_axes = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter is "legacy"
        warnings.simplefilter("ignore", FutureWarning)  # and so is the torch.jit.script its tracer calls
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    atomic_write_bytes(path, buffer.getvalue())
    return opset


def input_contract(meta: dict[str, Any]) -> dict[str, Any]:
    """What the exported models take and return (written to export.json)."""
    return {
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": [3, "H", "W"],
            "values": "RGB on the 0..255 scale, not normalised (the model subtracts its pixel mean itself)",
            "resize": (
                f"as detres Predictor / detres.inference.export.export_input: shorter side "
                f"{meta.get('min_size_test')}, longer side at most {meta.get('max_size_test')}, "
                "cv2 bilinear; any H, W are accepted"
            ),
        },
        "outputs": {
            "boxes": "float32 [N,4] xyxy, 0-based continuous pixels of the input image, clipped to it",
            "scores": "float32 [N], decreasing",
            "labels": "int64 [N] in 1..K (class_names[label-1])",
        },
        "to_original_pixels": "divide x by W_input/W_original and y by H_input/H_original, then clip",
    }


def export_detector(
    model: nn.Module,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = EXPORT_FORMATS,
    meta: dict[str, Any] | None = None,
    example_hw: tuple[int, int] = (320, 400),
    fast_path: bool = True,
    opset: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` (eval mode) into ``out_dir``: model.ts / model.onnx for ``formats`` and export.json.

    ``fast_path``: export :func:`prepare_for_inference`'s copy (frozen BN folded into the convs; same
    detections). ``example_hw``: the traced example's size (the files accept any size). ``meta``: the
    checkpoint's metadata (class names, test sizes), copied to export.json. Returns export.json's content.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"export: unknown format(s) {unknown or list(formats)}; choose from {list(EXPORT_FORMATS)}")
    meta = dict(meta or {})
    model = prepare_for_inference(model, fold_bn=fast_path)  # an eval-mode copy without gradients either way
    example = example_image(*example_hw)
    out_dir = Path(out_dir)
    written: dict[str, Any] = {}
    if "torchscript" in formats:
        method = export_torchscript(model, out_dir / FILE_NAMES["torchscript"], example)
        written["torchscript"] = {
            "file": FILE_NAMES["torchscript"],
            "method": method,
            "load": "torch.jit.load(file); boxes, scores, labels = m(image)",
        }
    if "onnx" in formats:
        used = export_onnx(model, out_dir / FILE_NAMES["onnx"], example, opset)
        written["onnx"] = {
            "file": FILE_NAMES["onnx"],
            "opset": used,
            "exporter": "torch.onnx.export(dynamo=False), dynamic H, W",
            "input_names": INPUT_NAMES,
            "output_names": OUTPUT_NAMES,
        }
    info = {
        "checkpoint": source,
        "formats": written,
        "fast_path": bool(fast_path),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "example_hw": list(example_hw),
        **input_contract(meta),
        "class_names": [str(n) for n in meta.get("class_names", [])],
        "min_size_test": meta.get("min_size_test"),
        "max_size_test": meta.get("max_size_test"),
    }
    write_json_atomic(out_dir / "export.json", info)
    return info
