"""torch.compile (inductor, freezing) against eager on ResNet-50's conv5 head for one chunk of RoIs, CPU, fp32.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile_head.py [--rois 32] [--threads 1] [--repeats 10]

Prints the compile time, the largest output difference and the per-call CPU time of each (two rounds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detres.models.backbones.resnet import resnet50  # noqa: E402
from detres.models.backbones.resnet_c4 import ResNetC5Head  # noqa: E402


def per_call_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        fn(x)
        start = time.process_time()
        for _ in range(repeats):
            fn(x)
    return (time.process_time() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rois", type=int, default=32, help="RoIs per call (detres's CPU chunk at 1 thread)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: conv + folded BN + ReLU fusions
    torch.manual_seed(0)
    head = ResNetC5Head(resnet50()).eval()
    x = torch.randn(args.rois, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    start = time.time()
    compiled = torch.compile(head)
    with torch.no_grad():
        diff = float((head(x) - compiled(x)).abs().max())
    print(f"compile {time.time() - start:.1f} s, max |eager - compiled| {diff:.2e}")
    for _ in range(2):
        eager_s, compiled_s = per_call_seconds(head, x, args.repeats), per_call_seconds(compiled, x, args.repeats)
        print(f"eager {eager_s:.4f} s  compiled {compiled_s:.4f} s  speed-up {eager_s / compiled_s:.2f}x")


if __name__ == "__main__":
    main()
