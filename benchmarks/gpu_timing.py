"""bench_detector's ``--device cuda`` path: inference (fp32 / float16 autocast) and training-step times on one GPU."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from detres.engine.amp import MixedPrecision
from detres.inference.detect import inference_autocast

Image = torch.Tensor
Target = dict[str, torch.Tensor]


def cuda_timed(fn: Callable[[], object], rounds: int, warmup: int = 2) -> list[float]:
    """Wall seconds of ``rounds`` calls after ``warmup`` untimed ones; synchronised, so queued kernels count."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _detect(model: nn.Module, image: Image, amp: bool) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), inference_autocast(image.device, amp):
        det = model([image])[0]
    return {k: v.float() if v.is_floating_point() else v for k, v in det.items()}


def _amp_vs_fp32(half: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How far float16 autocast moves the detections (same count and labels expected, boxes within a pixel or so)."""
    entry: dict[str, Any] = {
        "detections_fp32": int(full["scores"].numel()),
        "detections_amp": int(half["scores"].numel()),
    }
    same = half["scores"].shape == full["scores"].shape
    entry["labels_equal"] = bool(same and torch.equal(half["labels"], full["labels"]))
    entry["max_abs_box_diff"] = (
        float((half["boxes"] - full["boxes"]).abs().max())
        if same and half["boxes"].numel()
        else (0.0 if same else math.inf)
    )
    return entry


def _train_step(model: nn.Module, image: Image, target: Target, amp: MixedPrecision, seed: int) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)  # small lr: stays finite

    def step() -> None:
        torch.manual_seed(seed)
        with amp.autocast():
            loss = sum(model([image], [target]).values())
        optimizer.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, optimizer)

    return step


def _summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "round_s": times}


def time_on_cuda(
    models: dict[str, nn.Module],
    image: Image,
    target: Target,
    *,
    rounds: int,
    train_steps: int,
    amp: bool,
    train: bool,
    seed: int,
) -> dict[str, Any]:
    """Per model: fp32 inference, with ``amp`` also float16-autocast inference (and its detections against
    fp32's), and training steps (autocast + GradScaler with ``amp``). Models are moved to the GPU."""
    device = torch.device("cuda")
    image = image.to(device)
    target = {k: v.to(device) for k, v in target.items()}
    modes = ("fp32", "amp") if amp else ("fp32",)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "amp": amp,
        "clock": "wall, cuda-synchronised",
    }
    for name, model in models.items():
        model = model.to(device).eval()
        entry: dict[str, Any] = {}
        for mode in modes:
            entry[f"inference_{mode}"] = _summary(
                cuda_timed(lambda m=mode, net=model: _detect(net, image, m == "amp"), rounds)
            )
        if amp:
            entry["amp_vs_fp32"] = _amp_vs_fp32(_detect(model, image, True), _detect(model, image, False))
            entry["amp_inference_speedup"] = entry["inference_fp32"]["median_s"] / entry["inference_amp"]["median_s"]
        if train:
            model.train()
            step = _train_step(model, image, target, MixedPrecision(enabled=amp, device=device), seed)
            entry["train_step"] = _summary(cuda_timed(step, train_steps, warmup=1))
            model.eval()
        result[name] = entry
    key = "inference_amp" if amp else "inference_fp32"
    result["inference_speedup_vs_torchvision"] = (
        result["torchvision"][key]["median_s"] / result["detres"][key]["median_s"]
    )
    return result


def print_cuda_report(res: dict[str, Any]) -> None:
    print(f"\n{res['device']}  ({res['clock']})")
    for name in ("detres", "torchvision"):
        entry = res[name]
        parts = [
            f"{k.removeprefix('inference_')} {v['median_s'] * 1e3:.1f} ms"
            for k, v in entry.items()
            if k.startswith("inference_")
        ]
        if "train_step" in entry:
            parts.append(f"train step {entry['train_step']['median_s'] * 1e3:.1f} ms")
        if "amp_vs_fp32" in entry:
            parts.append(f"amp vs fp32: max box diff {entry['amp_vs_fp32']['max_abs_box_diff']:.3g} px")
        print(f"  {name:<12} " + ", ".join(parts))
    print(f"  detres speed-up vs torchvision: {res['inference_speedup_vs_torchvision']:.2f}x")
