"""Benchmark RoI max pooling: torchvision.ops.roi_pool (serial CPU kernel) against detres's fast_roi_pool, same inputs.

Variants: ``torchvision``; ``fast`` (contiguous output); ``fast_channels_last`` (channels-last output, what
RoIPooler asks for), both under ``single_thread_roi_pool()`` as the command-line tools run them;
``fast_channels_last_caller_threads`` without it (the per-RoI loop at ``--threads``; the same as
``fast_channels_last`` at 1 thread). Every variant's output is checked equal to torchvision's before timing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torchvision.ops import roi_pool

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detres.models.detection.fast_roi_pool import fast_roi_pool, single_thread_roi_pool  # noqa: E402


def _single_thread_loop(*args: object, channels_last: bool = False) -> torch.Tensor:
    with single_thread_roi_pool():
        return fast_roi_pool(*args, channels_last=channels_last)


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "torchvision": roi_pool,
    "fast": _single_thread_loop,
    "fast_channels_last": lambda *a: _single_thread_loop(*a, channels_last=True),
    "fast_channels_last_caller_threads": lambda *a: fast_roi_pool(*a, channels_last=True),
}

PoolFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A post-ReLU C4-like map [1,C,H,W] and [R,5] RoIs shaped like RPN proposals (sides 16..600 px, log-uniform)."""
    g = torch.Generator().manual_seed(args.seed)
    features = torch.randn(1, args.channels, args.height, args.width, generator=g).relu()
    img_h, img_w = args.height * args.stride, args.width * args.stride
    side = torch.exp(torch.empty(args.rois).uniform_(math.log(16.0), math.log(600.0), generator=g))
    aspect = torch.exp(torch.empty(args.rois).uniform_(math.log(0.5), math.log(2.0), generator=g))
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(args.rois, generator=g) * img_w, torch.rand(args.rois, generator=g) * img_h
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    # Proposals are clipped to the image, as the RPN does; those at the far edge round one cell past the map.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img_w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img_h - 1)
    return features, torch.cat([torch.zeros(args.rois, 1), boxes], dim=1)


def pool_all(fn: PoolFn, features: torch.Tensor, rois: torch.Tensor, args: argparse.Namespace) -> list[torch.Tensor]:
    """All RoIs in one call, or in chunks of ``--chunk`` as RoIHeads does at CPU inference (each chunk
    goes to the head on its own there, so the timed calls do not concatenate them)."""
    chunk = args.chunk if args.chunk > 0 else max(rois.shape[0], 1)
    scale = 1.0 / args.stride
    return [fn(features, rois[i : i + chunk], args.output_size, scale) for i in range(0, rois.shape[0], chunk)]


def clock(kind: str, threads: int) -> Callable[[], float]:
    """Process CPU time with one thread on a shared machine (wall time would count waiting for a core)."""
    if kind == "process" or (kind == "auto" and threads == 1):
        return time.process_time
    return time.perf_counter


def measure(fns: dict[str, Callable[[], object]], repeat: int, now: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved repeat by repeat so that load drifts hit both alike."""
    for fn in fns.values():  # warm-up: allocator, page faults, lazy init
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append(now() - start)
    return times


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rois", type=int, default=300, help="RoIs (one image)")
    p.add_argument("--channels", type=int, default=1024, help="feature channels (ResNet-50 C4: 1024)")
    p.add_argument("--height", type=int, default=38, help="feature-map height (600 px / 16)")
    p.add_argument("--width", type=int, default=50, help="feature-map width (800 px / 16)")
    p.add_argument("--stride", type=int, default=16, help="feature stride: spatial_scale = 1/stride")
    p.add_argument("--output-size", type=int, default=14, help="pooled side")
    p.add_argument("--chunk", type=int, default=0, help="RoIs per call (0: all at once; RoIHeads uses 32 on CPU)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats (median), after one warm-up call")
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "process"),
        default="auto",
        help="auto: process CPU time with 1 thread, else wall time",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="write the measurements to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features, rois = make_inputs(args)
    with torch.inference_mode():
        reference = torch.cat(pool_all(roi_pool, features, rois, args))
        for name, fn in VARIANTS.items():
            ours = torch.cat(pool_all(fn, features, rois, args))
            if not torch.equal(ours, reference):
                raise AssertionError(f"{name} differs from roi_pool in {(ours != reference).sum().item()} values")
        fns = {name: (lambda fn=fn: pool_all(fn, features, rois, args)) for name, fn in VARIANTS.items()}
        times = measure(fns, args.repeat, clock(args.clock, args.threads))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = {name: median["torchvision"] / median[name] for name in VARIANTS if name != "torchvision"}
    print(
        f"roi_pool {args.rois} RoIs, {args.channels}x{args.height}x{args.width}, "
        f"{args.output_size}x{args.output_size}, "
        f"chunk {args.chunk or 'all'}, {args.threads} thread(s): outputs equal"
    )
    for name, value in median.items():
        runs = [round(t * 1e3, 2) for t in times[name]]
        print(f"  {name:18s} {value * 1e3:9.2f} ms  (median of {args.repeat}: {runs})")
    for name, value in ratio.items():
        print(f"  speed-up torchvision / {name} = {value:.2f}x")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "platform": platform.platform(),
            "seconds": times,
            "median_seconds": median,
            "speedup": ratio,
            "outputs_equal": True,
        }
        args.json_out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
