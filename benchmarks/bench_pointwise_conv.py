"""Benchmark 1x1 stride-1 convs on CPU: ATen's default route (its GEMM path at 1 thread, batch < 16) against the
oneDNN route detres takes (dilation 2, the same function), on the ResNet C4 trunk's shapes, forward and backward."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detres.models.backbones.cpu_execution import ONEDNN_POINTWISE_DILATION  # noqa: E402

# (in channels, out channels, height, width): ResNet-50 C4 trunk at 600x800 (conv2_x, conv3_x, conv4_x 1x1 convs)
SHAPES = (
    (64, 256, 152, 200),
    (256, 64, 152, 200),
    (128, 512, 76, 100),
    (512, 128, 76, 100),
    (256, 1024, 38, 50),
    (1024, 256, 38, 50),
)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(shape: tuple[int, int, int, int], channels_last: bool, repeats: int, seed: int) -> dict[str, float]:
    """GFLOP/s of forward and of forward+backward (3x the forward FLOPs) for each route, after checking they agree."""
    cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, cin, h, w, generator=g).contiguous(memory_format=layout).requires_grad_(True)
    weight = (torch.randn(cout, cin, 1, 1, generator=g) / cin**0.5).requires_grad_(True)
    bias = torch.randn(cout, generator=g).requires_grad_(True)
    grad_out = torch.randn(1, cout, h, w, generator=g).contiguous(memory_format=layout)
    routes = {"aten_default": 1, "onednn": ONEDNN_POINTWISE_DILATION}
    with torch.no_grad():
        outs = {name: F.conv2d(x, weight, bias, dilation=d) for name, d in routes.items()}
    torch.testing.assert_close(outs["onednn"], outs["aten_default"], rtol=1e-4, atol=1e-4)
    flop = 2.0 * cin * cout * h * w
    result: dict[str, float] = {}
    for name, d in routes.items():

        def forward(d: int = d) -> torch.Tensor:
            return F.conv2d(x, weight, bias, dilation=d)

        def forward_backward(d: int = d) -> None:
            forward(d).backward(grad_out)

        with torch.no_grad():
            result[f"{name}_forward_gflops"] = flop / best_seconds(forward, repeats) / 1e9
        result[f"{name}_train_gflops"] = 3 * flop / best_seconds(forward_backward, repeats) / 1e9
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--contiguous", action="store_true", help="NCHW inputs instead of channels-last (the trunk's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(
        f"threads={args.threads} layout={'NCHW' if args.contiguous else 'channels-last'} "
        f"cpu={platform.processor() or platform.machine()} torch={torch.__version__}"
    )
    print(
        f"{'shape (Cin,Cout,H,W)':>24} | GFLOP/s fwd: default  oneDNN | fwd+bwd: default  oneDNN | "
        "speed-up fwd / fwd+bwd"
    )
    for shape in SHAPES:
        r = measure(shape, not args.contiguous, args.repeats, args.seed)
        rows.append({"shape": list(shape), **r})
        print(
            f"{str(shape):>24} | {r['aten_default_forward_gflops']:15.0f} {r['onednn_forward_gflops']:7.0f} | "
            f"{r['aten_default_train_gflops']:16.0f} {r['onednn_train_gflops']:7.0f} | "
            f"{r['onednn_forward_gflops'] / r['aten_default_forward_gflops']:.2f}x / "
            f"{r['onednn_train_gflops'] / r['aten_default_train_gflops']:.2f}x"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
