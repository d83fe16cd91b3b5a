"""Benchmark the whole detres C4 Faster R-CNN against torchvision's FasterRCNN built from torchvision parts, same
weights."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_roi_head import _randomise_norms, calibrate_scores  # noqa: E402
from detector_peer import build_torchvision_c4, load_detres_weights  # noqa: E402

from detres.config.load import Config, load_config  # noqa: E402
from detres.models.backbones.backbone_config import model_normalization  # noqa: E402
from detres.models.build import build_detector  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402

NUM_CLASSES = 20  # VOC
STAGES = ("preprocess", "trunk", "rpn", "roi_pool", "conv5_head", "predictor_postprocess")
PROPOSAL_POINTS, QUICK_PROPOSAL_POINTS = (100, 300, 600, 1000), (50, 100)
SIZE_POINTS, QUICK_SIZE_POINTS = (200, 400, 600, 800, 1000), (200, 320)
BCCD_ROOT = REPO_ROOT.parent / "shared" / "data" / "bccd" / "BCCD"
AGREE_PX = 1e-3  # detections of the two models must match to this many pixels
RPN_LOGIT_STD = 1.5  # spread enough to rank anchors clearly, small enough that sigmoid does not saturate into ties
MODELS = ("detres", "torchvision")

Image = torch.Tensor
Target = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- inputs
def image_hw(size: int) -> tuple[int, int]:
    """A 4:3 landscape image whose shorter side is ``size`` (600 -> 600x800)."""
    return size, int(round(size * 4 / 3))


def make_image(size: int, seed: int) -> Image:
    """A smooth random 0..255 RGB image [3,H,W] (blobs at ~16 px scale plus pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw(size)
    coarse = torch.rand(1, 3, h // 16 + 1, w // 16 + 1, generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (0.8 * smooth + 0.2 * torch.rand(3, h, w, generator=g)) * 255.0


def make_targets(size: int, seed: int, count: int = 6) -> Target:
    """``count`` ground-truth boxes (sides 10-60 % of the shorter side) with labels in 1..NUM_CLASSES."""
    g = torch.Generator().manual_seed(seed + 7)
    h, w = image_hw(size)
    sides = (torch.rand(count, 2, generator=g) * 0.5 + 0.1) * size
    x1 = torch.rand(count, generator=g) * (w - sides[:, 0])
    y1 = torch.rand(count, generator=g) * (h - sides[:, 1])
    boxes = torch.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], dim=1)
    return {"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES + 1, (count,), generator=g)}


# ------------------------------------------------------------------------------------------- models
def detres_model_config(args: argparse.Namespace) -> Config:
    """The detector's ``model`` config tree (defaults: Appendix A VOC settings) at the requested depth."""
    overrides = [
        f"model.depth={args.depth}",
        "model.weights=null",
        f"model.rpn.post_nms_top_n_test={args.proposals}",
        # torchvision's sampler has no lower background bound: sample both from IoU [0, 0.5).
        "model.roi_heads.bg_iou_thresh_lo=0.0",
    ]
    cfg = load_config(args.config, overrides, task="det")
    return cfg.model


def _is_detres(model: nn.Module) -> bool:
    return hasattr(model, "trunk")


def c4_features(model: nn.Module, image: Image) -> torch.Tensor:
    """The trunk's C4 map of one image, through the model's own normalisation and padding."""
    with torch.inference_mode():
        if _is_detres(model):
            return model.trunk(model.preprocess([image])[0])
        return model.backbone(model.transform([image])[0].tensors)


def calibrate_rpn(head: nn.Module, features: torch.Tensor, seed: int) -> None:
    """RPN objectness logits of std ~RPN_LOGIT_STD and box deltas of std ~0.2 (the 0.01 init makes all anchors tie)."""
    with torch.inference_mode():
        hidden = F.relu(head.conv(features))  # torchvision's conv already ends in ReLU: idempotent
    rms = max(float(hidden.pow(2).sum(1).mean().sqrt()), 1e-6)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for layer, std in ((head.cls_logits, RPN_LOGIT_STD), (head.bbox_pred, 0.2)):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (std / rms))


def _heads_view(model: nn.Module) -> Any:
    """The (pooler, box_head, predictor) triple bench_roi_head.calibrate_scores expects, for either model."""
    if _is_detres(model):
        return model.roi_heads
    heads = model.roi_heads
    return types.SimpleNamespace(
        box_head=heads.box_head,
        predictor=heads.box_predictor,
        pooler=lambda f, boxes: heads.box_roi_pool({"0": f}, boxes, None),
    )


def randomise(model: nn.Module, image: Image, boxes: torch.Tensor, seed: int) -> nn.Module:
    """Seeded frozen-BN statistics (so folding matters) and calibrated RPN / class logits (realistic NMS loads)."""
    with torch.no_grad():
        _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    features = c4_features(model, image)
    calibrate_rpn(model.rpn.head, features, seed)
    calibrate_scores(_heads_view(model), features, [boxes], seed)
    return model.eval()


def test_scale_of(image: Image) -> dict[str, int]:
    """An ``input`` tree whose test scale is ``image``'s own size: both detectors resize it by exactly 1."""
    return {"min_size_test": int(min(image.shape[1:])), "max_size_test": int(max(image.shape[1:]))}


def torchvision_peer(model_cfg: Config, image: Image) -> nn.Module:
    """The torchvision assembly of ``model_cfg``, normalising as detres does and resizing ``image`` by exactly 1."""
    mean, std = model_normalization(model_cfg)
    return build_torchvision_c4(
        model_cfg,
        num_classes=NUM_CLASSES,
        pixel_mean=mean,
        pixel_std=std,
        min_size=image.shape[1],
        max_size=max(image.shape[1:]),
    )


def build_model(name: str, args: argparse.Namespace, image: Image, boxes: torch.Tensor) -> nn.Module:
    """One model alone (for the peak-RSS children): seeded, randomised and calibrated the same way."""
    model_cfg = detres_model_config(args)
    torch.manual_seed(args.seed)
    if name == "detres":
        model = build_detector(model_cfg, input_cfg=test_scale_of(image), num_classes=NUM_CLASSES)
    else:
        model = torchvision_peer(model_cfg, image)
    return randomise(model, image, boxes, args.seed)


def build_pair(args: argparse.Namespace, image: Image, boxes: torch.Tensor) -> dict[str, nn.Module]:
    """detres's detector and the torchvision assembly carrying exactly its weights."""
    detres_model = build_model("detres", args, image, boxes)
    peer = torchvision_peer(detres_model_config(args), image)
    return {"detres": detres_model, "torchvision": load_detres_weights(peer, detres_model).eval()}


def for_inference(models: dict[str, nn.Module], fold_bn: bool) -> dict[str, nn.Module]:
    """The models inference is measured on: with ``fold_bn``, detres through its fast path (a folded copy;
    training keeps the original), torchvision as built."""
    if not fold_bn:
        return models
    from detres.inference.fast_path import prepare_for_inference

    return dict(models, detres=prepare_for_inference(models["detres"]))


def set_proposals(model: nn.Module, count: int) -> None:
    """Test-time RPN post-NMS top-n of an already built model (neither library has a public setter)."""
    if _is_detres(model):
        model.rpn._post_nms_top_n["test"] = int(count)
    else:
        model.rpn._post_nms_top_n["testing"] = int(count)


def set_input_size(model: nn.Module, image: Image) -> None:
    """Make torchvision's internal resize an identity for this image (detres resizes in the data pipeline)."""
    if not _is_detres(model):
        model.transform.min_size = (int(image.shape[1]),)
        model.transform.max_size = int(max(image.shape[1:]))


# ------------------------------------------------------------------------------------------- agreement
def _roi_inputs(model: nn.Module) -> tuple[list, Callable[[], None]]:
    """Record the proposals the model's RoI heads receive; returns (store, remove)."""
    store: list = []
    handle = model.roi_heads.register_forward_pre_hook(lambda _m, a: store.append([p.clone() for p in a[1]]))
    return store, handle.remove


def _compare(det: dict, ref: dict) -> dict[str, Any]:
    """Count / label / score / box differences of detres's detections ``det`` against torchvision's ``ref``."""
    entry = {
        "detections_detres": int(det["scores"].numel()),
        "detections_torchvision": int(ref["scores"].numel()),
        "labels_equal": False,
        "max_abs_score_diff": math.inf,
        "max_abs_box_diff": math.inf,
    }
    if det["scores"].shape == ref["scores"].shape:
        entry["labels_equal"] = bool(torch.equal(det["labels"], ref["labels"]))
        if det["scores"].numel():
            entry["max_abs_score_diff"] = float((det["scores"] - ref["scores"]).abs().max())
            entry["max_abs_box_diff"] = float((det["boxes"] - ref["boxes"]).abs().max())
        else:
            entry["max_abs_score_diff"] = entry["max_abs_box_diff"] = 0.0
    entry["passed"] = entry["labels_equal"] and entry["max_abs_box_diff"] <= AGREE_PX
    return entry


def check_agreement(models: dict[str, nn.Module], image: Image) -> dict[str, Any]:
    """Run both models once on ``image``; compare proposals and detections. If the RPNs disagree, also feed
    detres's proposals to both RoI heads and compare those detections (``mode`` says which comparison counts)."""
    hooks = {name: _roi_inputs(m) for name, m in models.items()}
    with torch.inference_mode():
        outs = {name: m([image])[0] for name, m in models.items()}
    for _, remove in hooks.values():
        remove()
    props = {name: store[0][0] for name, (store, _) in hooks.items()}
    same_props = props["detres"].shape == props["torchvision"].shape and (
        props["detres"].numel() == 0 or float((props["detres"] - props["torchvision"]).abs().max()) <= AGREE_PX
    )
    report = {
        "proposals_detres": int(props["detres"].shape[0]),
        "proposals_torchvision": int(props["torchvision"].shape[0]),
        "proposals_equal": bool(same_props),
        "full_pipeline": _compare(outs["detres"], outs["torchvision"]),
        "mode": "full pipeline",
    }
    if not same_props:
        report["same_proposals"] = _heads_on_same_proposals(models, image, props["detres"])
        report["mode"] = "same proposals fed to both RoI heads (the RPNs differ)"
    final = report["same_proposals"] if not same_props else report["full_pipeline"]
    report.update(
        passed=final["passed"],
        max_abs_box_diff=final["max_abs_box_diff"],
        max_abs_score_diff=final["max_abs_score_diff"],
        labels_equal=final["labels_equal"],
    )
    return report


def _heads_on_same_proposals(models: dict[str, nn.Module], image: Image, proposals: torch.Tensor) -> dict:
    """Both RoI heads on detres's C4 features and proposals (the trunks carry the same weights)."""
    detres_model, peer = models["detres"], models["torchvision"]
    features = c4_features(detres_model, image)
    sizes = [tuple(image.shape[1:])]
    with torch.inference_mode():
        ours = detres_model.roi_heads(features, [proposals], sizes)[0][0]
        theirs = peer.roi_heads({"0": features}, [proposals], sizes)[0][0]
    return _compare(ours, theirs)


# ------------------------------------------------------------------------------------------- timing
def clock_for(threads: int) -> Callable[[], float]:
    """Process CPU time for 1 thread (the machine is shared: wall time would count waits for a core); wall otherwise."""
    return time.process_time if threads == 1 else time.perf_counter


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The sub-modules whose forward calls make up the stages (RoI heads = pool + head + predictor/postprocess)."""
    if _is_detres(model):
        heads = model.roi_heads
        return {
            "trunk": model.trunk,
            "rpn": model.rpn,
            "roi_heads": heads,
            "roi_pool": heads.pooler,
            "conv5_head": heads.box_head,
        }
    heads = model.roi_heads
    return {
        "trunk": model.backbone,
        "rpn": model.rpn,
        "roi_heads": heads,
        "roi_pool": heads.box_roi_pool,
        "conv5_head": heads.box_head,
    }


class StageClock:
    """Forward hooks that add up, per stage, the clock time spent inside those modules (chunked calls summed)."""

    def __init__(self, model: nn.Module, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.spent: dict[str, float] = {}
        self.handles = []
        for stage, module in stage_modules(model).items():
            starts: list[float] = []
            self.handles.append(module.register_forward_pre_hook(lambda *_a, s=starts: s.append(self.clock())))
            self.handles.append(
                module.register_forward_hook(lambda *_a, s=starts, k=stage: self._add(k, self.clock() - s.pop()))
            )

    def _add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def stages(self, total: float) -> dict[str, float]:
        """The reported stages of one call: preprocess (normalise/pad/resize, the rest) and heads' remainder derived."""
        s = self.spent
        get = lambda k: s.get(k, 0.0)  # noqa: E731
        return {
            "preprocess": total - get("trunk") - get("rpn") - get("roi_heads"),
            "trunk": get("trunk"),
            "rpn": get("rpn"),
            "roi_pool": get("roi_pool"),
            "conv5_head": get("conv5_head"),
            "predictor_postprocess": get("roi_heads") - get("roi_pool") - get("conv5_head"),
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed_call(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def interleaved(
    fns: dict[str, Callable[[], object]],
    clock: Callable[[], float],
    rounds: int,
    on_call: Callable[[str, float], None] | None = None,
) -> dict[str, list[float]]:
    """One warm-up call each, then ``rounds`` rounds calling every fn once, order reversed every other round so
    that load drifting in from other jobs hits both alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in list(fns) if r % 2 == 0 else list(reversed(list(fns))):
            times[name].append(timed_call(fns[name], clock))
            if on_call is not None:
                on_call(name, times[name][-1])
    return times


def paired_speedup(times: dict[str, list[float]]) -> tuple[float, list[float]]:
    """Median over rounds of torchvision time / detres time (> 1: detres is faster); robust to load between rounds."""
    ratios = [t / d for d, t in zip(times["detres"], times["torchvision"])]
    return statistics.median(ratios), ratios


def time_inference(models: dict[str, nn.Module], image: Image, threads: int, rounds: int) -> dict[str, Any]:
    """Full inference (preprocess -> detections) per model with stage breakdown, interleaved rounds."""
    clock = clock_for(threads)
    clocks = {name: StageClock(m, clock) for name, m in models.items()}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in models}

    def fn_for(name: str) -> Callable[[], object]:
        def call() -> object:
            clocks[name].spent = {}
            with torch.inference_mode():
                return models[name]([image])

        return call

    def record(name: str, total: float) -> None:
        stages[name].append(clocks[name].stages(total))

    try:
        times = interleaved({n: fn_for(n) for n in models}, clock, rounds, record)
    finally:
        for c in clocks.values():
            c.remove()
    speedup, ratios = paired_speedup(times)
    result: dict[str, Any] = {
        "speedup_vs_torchvision": speedup,
        "round_ratios": ratios,
        "clock": "process" if threads == 1 else "wall",
    }
    for name in models:
        med = statistics.median(times[name])
        st = {k: statistics.median(s[k] for s in stages[name]) for k in STAGES}
        result[name] = {
            "median_s": med,
            "round_s": times[name],
            "stages_s": st,
            "stage_fraction": {k: v / med for k, v in st.items()},
        }
    return result


def _best_gflops(fn: Callable[[], object], flop: float, threads: int, repeats: int) -> float:
    clock = clock_for(threads)
    fn()
    return flop / min(timed_call(fn, clock) for _ in range(repeats)) / 1e9


def matmul_peak_gflops(threads: int, n: int, repeats: int) -> float:
    """Best fp32 GFLOP/s of an n x n x n torch.mm at the current thread count (the issue's floor denominator)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return _best_gflops(lambda: torch.mm(a, b), 2.0 * n**3, threads, repeats)


def conv_peak_gflops(threads: int, repeats: int) -> float:
    """Best fp32 GFLOP/s of a 1x1 convolution shaped like conv5_1's first layer on 32 RoIs (1024 -> 512, 14x14).

    The convs run in oneDNN, torch.mm in MKL; on a CPU where the two reach different speeds (MKL on AMD)
    the matmul is no upper bound for the network, so the floor is also given against the faster one.
    """
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 1024, 14, 14, generator=g), torch.randn(512, 1024, 1, 1, generator=g)
    return _best_gflops(lambda: F.conv2d(x, w), 2.0 * 32 * 1024 * 512 * 14 * 14, threads, repeats)


# ------------------------------------------------------------------------------------------- FLOPs
def count_flops(model: nn.Module, image: Image) -> dict[str, Any]:
    """FLOPs (2 per multiply-add) of one inference, total and by stage, via torch's FlopCounterMode.

    Counted at the dispatcher, so convs that detres runs functionally (frozen BN folded on the fly,
    detres.models.backbones.conv_norm) count too, whatever module (if any) issued them.
    """
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model([image])
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    names = (
        {"trunk": "trunk", "predictor": "roi_heads.predictor"}
        if _is_detres(model)
        else {"trunk": "backbone", "predictor": "roi_heads.box_predictor"}
    )
    names.update(rpn="rpn", conv5_head="roi_heads.box_head")
    total = int(counter.get_total_flops())
    by_stage = {stage: int(per_module.get(f"FasterRCNN.{name}", 0)) for stage, name in names.items()}
    by_stage["other"] = total - sum(by_stage.values())
    return {"total": total, "by_stage": by_stage}


# ------------------------------------------------------------------------------------------- training
def _rois_seen(model: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """Record how many RoIs reach the conv5 head per call (the sampled mini-batch in training)."""
    seen: list[int] = []
    handle = stage_modules(model)["conv5_head"].register_forward_pre_hook(lambda _m, a: seen.append(int(a[0].shape[0])))
    return seen, handle.remove


def train_step_fn(model: nn.Module, image: Image, target: Target, seed: int, losses: list[float]) -> Callable[[], None]:
    """One SGD step (forward with losses, backward, update) on one image; same sampling seed for both models."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)  # small lr: stays finite

    def step() -> None:
        torch.manual_seed(seed)
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    return step


def time_training(
    models: dict[str, nn.Module], image: Image, target: Target, threads: int, steps: int, seed: int
) -> dict[str, Any]:
    """Median training-step time per model over interleaved steps (frozen BN: train mode changes nothing there)."""
    clock = clock_for(threads)
    losses: dict[str, list[float]] = {name: [] for name in models}
    seen = {name: _rois_seen(m) for name, m in models.items()}
    for m in models.values():
        m.train()
    try:
        fns = {name: train_step_fn(m, image, target, seed, losses[name]) for name, m in models.items()}
        times = interleaved(fns, clock, steps)
    finally:
        for m in models.values():
            m.eval()
        for _, remove in seen.values():
            remove()
    speedup, ratios = paired_speedup(times)
    result: dict[str, Any] = {
        "speedup_vs_torchvision": speedup,
        "round_ratios": ratios,
        "clock": "process" if threads == 1 else "wall",
    }
    for name in models:
        result[name] = {
            "median_s": statistics.median(times[name]),
            "step_s": times[name],
            "rois_per_step": seen[name][0][-1] if seen[name][0] else 0,
            "losses_finite": all(math.isfinite(x) for x in losses[name]),
        }
    return result


# ------------------------------------------------------------------------------------------- peak RSS
def _rss_peak_mb() -> float:
    """This process's peak RSS (MB): /proc's VmHWM, else ru_maxrss.

    On Linux ru_maxrss survives fork + exec (a child started from this big process would report the
    parent's size), while VmHWM belongs to the child's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _reset_rss_peak() -> bool:
    """Restart the VmHWM high-water mark at the current RSS (Linux clear_refs 5), so each phase gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build one model, run inference, then (unless --skip-train) one training step; the
    peak RSS of each phase (MB, whole process: weights, libraries and activations). Only this model ever lived
    in the process, so the two models' peaks do not mix."""
    torch.set_num_threads(1)
    image, target = make_image(args.size, args.seed), make_targets(args.size, args.seed)
    model = build_model(args.rss_child, args, image, target["boxes"])
    gc.collect()
    out: dict[str, Any] = {"build_mb": _rss_peak_mb(), "phases_reset": _reset_rss_peak()}
    with torch.inference_mode():
        model([image])
    out["inference_mb"] = _rss_peak_mb()
    if not args.skip_train:
        _reset_rss_peak()
        model.train()
        train_step_fn(model, image, target, args.seed, [])()
        out["train_mb"] = _rss_peak_mb()
    return out


def measure_peak_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of each model, each in its own subprocess (this script with --rss-child), both run at once:
    VmHWM is per process, so running side by side does not mix the peaks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    children = {}
    for name in MODELS:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rss-child",
            name,
            "--depth",
            str(args.depth),
            "--size",
            str(args.size),
            "--proposals",
            str(args.proposals),
            "--seed",
            str(args.seed),
        ]
        cmd += ["--skip-train"] if args.skip_train else []
        cmd += ["--config", str(args.config)] if args.config else []
        children[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result: dict[str, Any] = {}
    for name, child in children.items():
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"peak-RSS child for {name} failed:\n{stderr[-2000:]}")
        result[name] = json.loads(stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------------- data pipeline
def _pipeline_samples(num: int, tmp: Path, seed: int) -> tuple[list[dict[str, Any]], str]:
    """(annotation-only samples, source): BCCD's VOC photos from ../shared when present, else synthetic JPEGs."""
    if (BCCD_ROOT / "ImageSets" / "Main" / "trainval.txt").is_file():
        from detres.data.datasets.voc import VocDetection

        with warnings.catch_warnings():  # BCCD's two known zero-area boxes: dropped, as training drops them
            warnings.simplefilter("ignore", UserWarning)
            dataset = VocDetection(BCCD_ROOT, "trainval")
        return [dataset.annotation(i) for i in range(min(num, len(dataset)))], f"BCCD trainval ({BCCD_ROOT})"
    import cv2

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num):
        path = tmp / f"synthetic_{i}.jpg"
        pixels = cv2.resize(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (640, 480))
        cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
        samples.append(
            {
                "boxes": np.array([[40.0, 30.0, 300.0, 260.0]], dtype=np.float32),
                "labels": np.array([1]),
                "file_name": str(path),
                "orig_size": (480, 640),
                "image_id": i,
            }
        )
    return samples, "synthetic 640x480 JPEGs"


def measure_data_pipeline(size: int, num: int, seed: int) -> dict[str, Any]:
    """Images/s of detres's detection training data path in this process (decode, resize to ``size``, flip,
    to tensors: what one DataLoader worker does per image), by process CPU time and by wall time."""
    # Imported here: albumentations is slow to import and the peak-RSS children never need it.
    from detres.data.image_io import read_image_rgb
    from detres.data.transforms.detection import build_det_transforms, finalize_sample

    transform = build_det_transforms(train=True, min_size=size, max_size=image_hw(size)[1], flip_prob=0.5, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        samples, source = _pipeline_samples(num, Path(tmp), seed)

        def one(sample: dict[str, Any]) -> None:
            finalize_sample(dict(sample, image=read_image_rgb(sample["file_name"]), scale=1.0), transform)

        one(samples[0])  # warm-up (albumentations / cv2 first-call set-up)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for sample in samples:
            one(sample)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "source": source,
        "images": len(samples),
        "images_per_cpu_s": len(samples) / cpu,
        "images_per_wall_s": len(samples) / wall,
    }


# ------------------------------------------------------------------------------------------- cost curves
def _seconds_per_image(model: nn.Module, image: Image, repeats: int) -> float:
    clock = clock_for(1)
    with torch.inference_mode():
        model([image])  # warm-up: new shapes set up new kernels
        return statistics.median(timed_call(lambda: model([image]), clock) for _ in range(repeats))


def cost_curves(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per image (1 thread, process CPU time) vs RPN proposals (both models) and vs shorter side (detres)."""
    torch.set_num_threads(1)
    image = make_image(args.size, args.seed)
    prop_rows = []
    for count in args.proposal_points:
        row: dict[str, Any] = {"proposals": count}
        for name, model in models.items():
            set_proposals(model, count)
            set_input_size(model, image)
            store, remove = _roi_inputs(model)
            row[f"{name}_s"] = _seconds_per_image(model, image, args.curve_repeats)
            remove()
            row[f"{name}_actual_proposals"] = int(store[-1][0].shape[0])
        prop_rows.append(row)
        print(f"  curve proposals={count}: " + "  ".join(f"{n} {row[f'{n}_s']:.3f} s" for n in models), flush=True)
    for model in models.values():
        set_proposals(model, args.proposals)
    size_rows = []
    for size in args.size_points:
        img = make_image(size, args.seed)
        store, remove = _roi_inputs(models["detres"])
        size_rows.append(
            {
                "shorter_side": size,
                "image_hw": list(img.shape[1:]),
                "detres_s": _seconds_per_image(models["detres"], img, args.curve_repeats),
            }
        )
        remove()
        # Small images have fewer anchors: fewer than --proposals may survive the RPN's NMS.
        size_rows[-1]["detres_actual_proposals"] = int(store[-1][0].shape[0])
        print(f"  curve shorter side={size}: detres {size_rows[-1]['detres_s']:.3f} s", flush=True)
    return {
        "clock": "process",
        "threads": 1,
        "proposals": prop_rows,
        "shorter_side": size_rows,
        "proposals_image_hw": list(image.shape[1:]),
        "shorter_side_proposals": args.proposals,
    }


def plot_curves(curves: dict[str, Any], path: Path, title: str) -> None:
    """The two cost curves side by side as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, marker in zip(MODELS, ("o", "s")):
        rows = curves["proposals"]
        left.plot([r["proposals"] for r in rows], [r[f"{name}_s"] for r in rows], marker=marker, label=name)
    left.set(xlabel="RPN proposals per image", ylabel="seconds per image", title="vs proposals")
    left.legend()
    rows = curves["shorter_side"]
    right.plot([r["shorter_side"] for r in rows], [r["detres_s"] for r in rows], marker="o", label="detres")
    right.set(
        xlabel="shorter image side (px, 4:3)",
        ylabel="seconds per image",
        title=f"vs input size ({curves['shorter_side_proposals']} proposals)",
    )
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- report
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.1f}"


def _row(label: str, detres_s: float, torchvision_s: float | None = None, rest: str = "") -> str:
    tv = _ms(torchvision_s) if torchvision_s is not None else ""
    return f"{label:<34}{_ms(detres_s)}{tv:>16}{rest}"


def _print_agreement(a: dict[str, Any]) -> None:
    full = a["full_pipeline"]
    print(
        f"{'agreement':<34}{a['mode']}: proposals {a['proposals_detres']}/{a['proposals_torchvision']} "
        f"(equal: {a['proposals_equal']}), detections {full['detections_detres']}/{full['detections_torchvision']}, "
        f"|dbox| {a['max_abs_box_diff']:.1e} px, |dscore| {a['max_abs_score_diff']:.1e}, "
        f"labels equal {a['labels_equal']}"
    )


def _print_inference(threads: str, inf: dict[str, Any]) -> None:
    d, v = inf["detres"], inf["torchvision"]
    rounds = " ".join(f"{x:.2f}" for x in inf["round_ratios"])
    print(
        _row(
            f"inference, {threads} thread(s) ({inf['clock']})",
            d["median_s"],
            v["median_s"],
            f"{inf['speedup_vs_torchvision']:>9.2f}  {rounds}",
        )
    )
    for stage in STAGES:
        share = f"   ({d['stage_fraction'][stage] * 100:4.1f}% / {v['stage_fraction'][stage] * 100:4.1f}%)"
        print(_row(f"  {stage}", d["stages_s"][stage], v["stages_s"][stage], share))
    for label, peak, floor, key in (
        ("matmul", "matmul_peak_gflops", "floor_s", "floor_ratio"),
        ("1x1-conv", "conv1x1_peak_gflops", "floor_s_best_peak", "floor_ratio_best_peak"),
    ):
        print(
            f"{'  ' + label + ' peak GFLOP/s, floor ms':<34}{inf[peak]:10.1f}{_ms(inf[floor]):>16}   "
            f"{key} detres {inf[key + '_detres']:.2f}, torchvision {inf[key + '_torchvision']:.2f}"
        )


def _print_extras(res: dict[str, Any]) -> None:
    """Training, peak RSS, data pipeline and curve rows."""
    for t, tr in res.get("train", {}).items():
        print(
            _row(
                f"train step, {t} thread(s) ({tr['clock']})",
                tr["detres"]["median_s"],
                tr["torchvision"]["median_s"],
                f"{tr['speedup_vs_torchvision']:>9.2f}  RoIs/step "
                f"{tr['detres']['rois_per_step']}/{tr['torchvision']['rois_per_step']}",
            )
        )
    for name, rss in res.get("peak_rss_mb", {}).items():
        print(
            f"{'peak RSS MB, ' + name:<34}"
            + "  ".join(f"{k[:-3]} {v:.0f}" for k, v in rss.items() if k.endswith("_mb"))
        )
    if "data_pipeline" in res:
        dp = res["data_pipeline"]
        print(
            f"{'data pipeline images/s (1 core)':<34}{dp['images_per_cpu_s']:10.1f}   detres "
            f"({dp['model_threads']} thread(s)): inference {dp['model_inference_images_per_s']:.2f}, training "
            f"{dp.get('model_train_images_per_s', math.nan):.2f} images/s ({dp['source']})"
        )
    for row in res.get("curves", {}).get("proposals", []):
        print(_row(f"curve, {row['proposals']} proposals", row["detres_s"], row["torchvision_s"]))
    for row in res.get("curves", {}).get("shorter_side", []):
        print(_row(f"curve, shorter side {row['shorter_side']}", row["detres_s"]))


def print_report(res: dict[str, Any]) -> None:
    """Everything as one table: a row per measurement, detres and torchvision side by side."""
    cfg = res["config"]
    folded = ", detres inference with BN folded" if cfg["detres_bn_folded"] else ""
    print(f"\n== ResNet-{cfg['depth']} C4, image {cfg['image_hw']}, {cfg['proposals']} proposals, fp32 CPU{folded}")
    _print_agreement(res["agreement"])
    print(f"{'':<34}{'detres ms':>10}{'torchvision ms':>16}{'speedup':>9}  per-round speedups")
    for threads, inf in res["inference"].items():
        _print_inference(threads, inf)
    fl = res["flops"]
    print(
        f"{'GFLOP per image':<34}{fl['detres']['total'] / 1e9:10.1f}{fl['torchvision']['total'] / 1e9:16.1f}   "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in fl["detres"]["by_stage"].items())
    )
    _print_extras(res)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="det config YAML (default: the det defaults, VOC settings)")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth (50; 18 with --quick)")
    p.add_argument("--size", type=int, default=None, help="shorter image side, 4:3 image (600; 320 with --quick)")
    p.add_argument("--proposals", type=int, default=None, help="RPN proposals at test time (300; 100 with --quick)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    p.add_argument("--rounds", type=int, default=None, help="interleaved inference rounds (3; 2 with --quick)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per model (3; 2 with --quick)")
    p.add_argument("--curve-repeats", type=int, default=1, help="timed calls per curve point (after a warm-up)")
    p.add_argument(
        "--proposal-points",
        type=int,
        nargs="+",
        default=None,
        help="proposals curve points (100 300 600 1000; 50 100 with --quick)",
    )
    p.add_argument(
        "--size-points",
        type=int,
        nargs="+",
        default=None,
        help="shorter-side curve points (200 400 600 800 1000; 200 320 with --quick)",
    )
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 fp32 matmul giving the peak")
    p.add_argument("--data-images", type=int, default=None, help="images through the data pipeline (30; 8 quick)")
    p.add_argument("--quick", action="store_true", help="ResNet-18, 320 px, 100 proposals, fewer repeats: < 2 min")
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="time detres's inference after detres.inference.fast_path (frozen BN folded into the convs)",
    )
    p.add_argument("--skip-train", action="store_true", help="no training-step timing")
    p.add_argument("--skip-curves", action="store_true", help="no cost curves (and no PNG)")
    p.add_argument("--skip-rss", action="store_true", help="no peak-RSS subprocesses")
    p.add_argument("--skip-data", action="store_true", help="no data-pipeline timing")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: GPU inference / training-step times only (gpu_timing.py); exits 0 without a GPU",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="with --device cuda: also time float16 autocast inference, and train with autocast + "
        "GradScaler (CPU runs stay fp32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="write every figure to this JSON file")
    p.add_argument("--png", type=Path, default=None, help="cost-curve plot (default: the JSON path with .png)")
    p.add_argument("--rss-child", choices=MODELS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "depth": (18, 50),
        "size": (320, 600),
        "proposals": (100, 300),
        "rounds": (2, 3),
        "train_steps": (2, 3),
        "data_images": (8, 30),
    }
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.proposal_points is None:
        args.proposal_points = list(QUICK_PROPOSAL_POINTS if quick else PROPOSAL_POINTS)
    if args.size_points is None:
        args.size_points = list(QUICK_SIZE_POINTS if quick else SIZE_POINTS)
    if min(args.threads + [args.rounds, args.train_steps, args.curve_repeats, args.proposals, args.size]) < 1:
        p.error("--threads, --rounds, --train-steps, --curve-repeats, --proposals and --size must be >= 1")
    if args.amp and args.device != "cuda":
        p.error("--amp needs --device cuda (CPU runs stay fp32)")
    if args.png is None and args.json_out is not None:
        args.png = args.json_out.with_suffix(".png")
    return args


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "os_cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def run_timings(
    models: dict[str, nn.Module],
    trainable: dict[str, nn.Module],
    args: argparse.Namespace,
    image: Image,
    target: Target,
    flops: int,
) -> tuple[dict, dict]:
    """Inference (with floor) and training at every requested thread count."""
    inference, train = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"timing inference at {threads} thread(s) ...", flush=True)
        inf = time_inference(models, image, threads, args.rounds)
        repeats = 3 if args.quick else 5
        inf["matmul_peak_gflops"] = matmul_peak_gflops(threads, args.matmul_size, repeats)
        inf["conv1x1_peak_gflops"] = conv_peak_gflops(threads, repeats)
        best = max(inf["matmul_peak_gflops"], inf["conv1x1_peak_gflops"])
        inf["floor_s"] = flops / (inf["matmul_peak_gflops"] * 1e9)  # the issue's definition
        inf["floor_s_best_peak"] = flops / (best * 1e9)
        for name in MODELS:
            inf[f"floor_ratio_{name}"] = inf[name]["median_s"] / inf["floor_s"]
            inf[f"floor_ratio_best_peak_{name}"] = inf[name]["median_s"] / inf["floor_s_best_peak"]
        inference[str(threads)] = inf
    if not args.skip_train:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"timing training steps at {threads} thread(s) ...", flush=True)
            train[str(threads)] = time_training(trainable, image, target, threads, args.train_steps, args.seed)
    torch.set_num_threads(1)
    return inference, train


def data_vs_model(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """Data-pipeline images/s beside detres's own images/s (1 thread when timed, else the first thread count)."""
    threads = "1" if "1" in res["inference"] else str(args.threads[0])
    out = measure_data_pipeline(args.size, args.data_images, args.seed)
    out["model_threads"] = int(threads)
    out["model_inference_images_per_s"] = 1.0 / res["inference"][threads]["detres"]["median_s"]
    if res["train"]:
        out["model_train_images_per_s"] = 1.0 / res["train"][threads]["detres"]["median_s"]
    return out


def measure_all(args: argparse.Namespace, image: Image, target: Target) -> dict[str, Any]:
    """Every section in turn; ``section_wall_s`` records how long each took."""
    res: dict[str, Any] = {
        "config": {
            "depth": args.depth,
            "image_hw": list(image.shape[1:]),
            "proposals": args.proposals,
            "num_classes": NUM_CLASSES,
            "detres_bn_folded": args.fold_bn,
        },
        "section_wall_s": {},
    }

    def section(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        res["section_wall_s"][name] = time.perf_counter() - start
        return out

    trainable = section("build", lambda: build_pair(args, image, target["boxes"]))
    models = for_inference(trainable, args.fold_bn)
    res["agreement"] = section("agreement", lambda: check_agreement(models, image))
    if not res["agreement"]["passed"]:
        print(
            f"WARNING: detres and torchvision detections differ (> {AGREE_PX} px or labels): "
            f"{json.dumps(res['agreement'])}",
            file=sys.stderr,
            flush=True,
        )
    res["flops"] = section("flops", lambda: {name: count_flops(m, image) for name, m in models.items()})
    if not args.skip_curves:
        print("cost curves (1 thread) ...", flush=True)
        res["curves"] = section("curves", lambda: cost_curves(models, args))
    res["inference"], res["train"] = section(
        "timings", lambda: run_timings(models, trainable, args, image, target, res["flops"]["detres"]["total"])
    )
    models.clear(), trainable.clear()  # the peak-RSS children and the data pipeline need neither
    if not args.skip_rss:
        print("peak RSS (one subprocess per model) ...", flush=True)
        res["peak_rss_mb"] = section("peak_rss", lambda: measure_peak_rss(args))
    if not args.skip_data:
        res["data_pipeline"] = section("data_pipeline", lambda: data_vs_model(args, res))
    return res


def summarise(res: dict[str, Any]) -> None:
    """The headline keys, per thread count."""
    res["inference_speedup_vs_torchvision"] = {t: v["speedup_vs_torchvision"] for t, v in res["inference"].items()}
    res["floor_ratio"] = {t: v["floor_ratio_detres"] for t, v in res["inference"].items()}
    res["floor_ratio_best_peak"] = {t: v["floor_ratio_best_peak_detres"] for t, v in res["inference"].items()}
    if res["train"]:
        res["train_speedup_vs_torchvision"] = {t: v["speedup_vs_torchvision"] for t, v in res["train"].items()}


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--device cuda`` path: the same two models on the GPU (no CPU-only sections: threads, FLOP floor, RSS)."""
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the --device cuda benchmark", flush=True)
        return {"skipped": "no CUDA device"}
    from gpu_timing import print_cuda_report, time_on_cuda

    start = time.perf_counter()
    image, target = make_image(args.size, args.seed), make_targets(args.size, args.seed)
    models = build_pair(args, image, target["boxes"])  # built and calibrated on the CPU, as in the CPU path
    res = {
        "config": {
            "depth": args.depth,
            "image_hw": list(image.shape[1:]),
            "proposals": args.proposals,
            "num_classes": NUM_CLASSES,
        },
        "cuda": time_on_cuda(
            models,
            image,
            target,
            rounds=args.rounds,
            train_steps=args.train_steps,
            amp=args.amp,
            train=not args.skip_train,
            seed=args.seed,
        ),
        "machine": machine_info(),
        "wall_time_s": time.perf_counter() - start,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print_cuda_report(res["cuda"])
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json_out}")
    return res


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda":
        return run_cuda(args)
    if args.rss_child:
        print(json.dumps(peak_rss_child(args)))
        return {}
    start = time.perf_counter()
    machine = machine_info()
    torch.set_num_threads(1)
    image, target = make_image(args.size, args.seed), make_targets(args.size, args.seed)
    print(
        f"torch {torch.__version__}  torchvision {torchvision.__version__}  cpus={os.cpu_count()}  "
        f"load(1m)={machine['load_avg_1m_at_start']:.2f}  ResNet-{args.depth}  image {tuple(image.shape[1:])}  "
        f"{args.proposals} proposals",
        flush=True,
    )
    res = measure_all(args, image, target)
    summarise(res)
    res["machine"] = dict(machine, load_avg_1m_at_end=os.getloadavg()[0])
    res["wall_time_s"] = time.perf_counter() - start
    res["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print_report(res)
    if "curves" in res and args.png is not None:
        plot_curves(res["curves"], args.png, f"ResNet-{args.depth} C4 Faster R-CNN, 1 thread, fp32 CPU")
        print(f"wrote {args.png}")
    print(
        f"\ntotal wall time {res['wall_time_s']:.1f} s  ("
        + ", ".join(f"{k} {v:.1f}" for k, v in res["section_wall_s"].items())
        + ")"
    )
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json_out}")
    return res


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        main()
