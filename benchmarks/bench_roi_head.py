"""Benchmark the per-region pipeline (RoI pool -> conv5 head -> predictor -> postprocess) against a torchvision-built
equivalent."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.benchmark import Timer
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TvPredictor
from torchvision.models.detection.roi_heads import RoIHeads as TvRoIHeads
from torchvision.ops import misc as tv_misc
from torchvision.ops import roi_pool

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from detres.config.load import load_config  # noqa: E402
from detres.inference.fast_path import count_batchnorm, prepare_for_inference  # noqa: E402
from detres.models.backbones.resnet_c4 import build_resnet_c4  # noqa: E402
from detres.models.detection.fast_roi_pool import single_thread_roi_pool  # noqa: E402
from detres.models.detection.roi_heads import BoxHead, FastRCNNPredictor, RoIHeads, RoIPooler  # noqa: E402

STAGES = ("pool", "conv5_head", "predictor", "postprocess")
# ours_before: the region pipeline as it was before the optimisations (one-shot, BN unfolded);
# ours: the library default now (RoIs chunked at inference); ours_fast: + fast_path (BN folded).
DEFAULT_VARIANTS = ("torchvision", "ours_before", "ours", "ours_fast")
ALL_VARIANTS = DEFAULT_VARIANTS + ("ours_fast_channels_last", "torchvision_folded")
POOL_SIZE = 14
STRIDE = 16
SCORE_THRESH, NMS_THRESH, DETS_PER_IMG = 0.05, 0.3, 100
BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ------------------------------------------------------------------------------------------ models
def _randomise_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial frozen statistics, so folding really changes the conv weights (identity BN would not)."""
    for m in module.modules():
        if isinstance(m, tv_misc.FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def build_ours(depth: int, num_classes: int, seed: int, roi_chunk: int | None = None) -> RoIHeads:
    """detres region pipeline as FasterRCNN.from_config assembles it (roi_pool 14x14, C5 head, sibling predictor)."""
    torch.manual_seed(seed)
    _, conv5_head, dim = build_resnet_c4(depth, frozen_bn=True)
    roi_cfg = load_config(None, [], task="det").model.roi_heads  # the paper's heads (roi_pool 14x14)
    heads = RoIHeads.from_config(
        roi_cfg,
        pooler=RoIPooler.from_config(roi_cfg, spatial_scale=1.0 / STRIDE),
        box_head=BoxHead(conv5_head, out_features=dim),
        predictor=FastRCNNPredictor(dim, num_classes + 1),
        **({} if roi_chunk is None else {"inference_roi_chunk": roi_chunk}),
    )
    with torch.no_grad():
        _randomise_norms(heads, torch.Generator().manual_seed(seed + 1))
    return heads.eval()


def calibrate_scores(heads: RoIHeads, features: torch.Tensor, proposals: list[torch.Tensor], seed: int) -> None:
    """Spread the class logits (std 3) so that a realistic share of (RoI, class) pairs passes the 0.05 threshold.

    With Fast R-CNN's init (std 0.01) every softmax is ~uniform (1/21 < 0.05) and postprocess
    would time an empty NMS.
    """
    few = [p[:8] for p in proposals[:1]]
    with torch.inference_mode():
        vecs = heads.box_head(heads.pooler(features[:1], few))
    rms = float(vecs.pow(2).sum(1).mean().sqrt())
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        w = heads.predictor.cls_score.weight
        w.copy_(torch.randn(w.shape, generator=g) * (3.0 / max(rms, 1e-6)))
        b = heads.predictor.bbox_pred.weight
        b.copy_(torch.randn(b.shape, generator=g) * (0.5 / max(rms, 1e-6)))


class TorchvisionRegionPipeline(nn.Module):
    """The same computation built from torchvision parts only: ops.roi_pool, resnet.layer4 with
    ops.FrozenBatchNorm2d, avgpool, detection FastRCNNPredictor and RoIHeads.postprocess_detections
    (softmax, decode, clip, threshold, batched_nms, top-k)."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        arch = {
            18: torchvision.models.resnet18,
            34: torchvision.models.resnet34,
            50: torchvision.models.resnet50,
            101: torchvision.models.resnet101,
            152: torchvision.models.resnet152,
        }[depth]
        self.layer4 = arch(weights=None, norm_layer=tv_misc.FrozenBatchNorm2d).layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        dim = 2048 if depth >= 50 else 512  # bottleneck vs basic-block conv5 width
        self.predictor = TvPredictor(dim, num_classes + 1)
        self.post = TvRoIHeads(
            None,
            None,
            None,
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=128,
            positive_fraction=0.25,
            bbox_reg_weights=BBOX_REG_WEIGHTS,
            score_thresh=SCORE_THRESH,
            nms_thresh=NMS_THRESH,
            detections_per_img=DETS_PER_IMG,
        )

    def pool(self, features: torch.Tensor, proposals: list[torch.Tensor]) -> torch.Tensor:
        return roi_pool(features, proposals, (POOL_SIZE, POOL_SIZE), 1.0 / STRIDE)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.layer4(pooled)), 1)

    def forward(self, features: torch.Tensor, proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]]):
        logits, deltas = self.predictor(self.head(self.pool(features, proposals)))
        boxes, scores, labels = self.post.postprocess_detections(logits, deltas, proposals, image_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]


def build_torchvision(ours: RoIHeads, depth: int, num_classes: int) -> TorchvisionRegionPipeline:
    """torchvision pipeline carrying exactly our weights (layer4 and predictor keys match one-to-one)."""
    tv = TorchvisionRegionPipeline(depth, num_classes)
    tv.layer4.load_state_dict(ours.box_head.conv5_head.layer4.state_dict(), strict=True)
    tv.predictor.load_state_dict(ours.predictor.state_dict(), strict=True)
    return tv.eval()


# ------------------------------------------------------------------------------------------ inputs
def make_inputs(
    *, num_images: int, rois: int, channels: int, image_hw: tuple[int, int], device: torch.device, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]]]:
    """C4 features of a padded image batch and ``rois`` random proposals per image (sides 32..512 px)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    fh, fw = math.ceil(h / STRIDE), math.ceil(w / STRIDE)
    features = torch.randn(num_images, channels, fh, fw, generator=g).relu()
    proposals = []
    for _ in range(num_images):
        sides = torch.exp(torch.empty(rois, 2).uniform_(math.log(32), math.log(512), generator=g))
        centres = torch.rand(rois, 2, generator=g) * torch.tensor([w, h])
        boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        proposals.append(boxes.to(device))
    return features.to(device), proposals, [(h, w)] * num_images


# ------------------------------------------------------------------------------------------ variants
def _chunks(model: nn.Module, features: torch.Tensor, proposals: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(image index, boxes) pieces in the order RoIHeads.region_features processes them (-1: one shot)."""
    chunk = getattr(model, "inference_roi_chunk", 0)
    if chunk <= 0 or features.device.type != "cpu" or sum(p.shape[0] for p in proposals) <= chunk:
        return [(-1, torch.empty(0))]
    return [(i, p[s : s + chunk]) for i, p in enumerate(proposals) for s in range(0, p.shape[0], chunk)]


def stage_fns(model: nn.Module, features, proposals, sizes) -> dict[str, Callable[[], object]]:
    """Zero-argument callables for each stage, fed with the previous stage's precomputed output.

    Chunked variants are timed chunk by chunk, exactly as region_features runs them.
    """
    with torch.inference_mode():
        if isinstance(model, TorchvisionRegionPipeline):
            pool_one, head_one, predict = model.pool, model.head, model.predictor
            post = model.post.postprocess_detections
        else:
            pool_one, head_one, predict = model.pooler, model.box_head, model.predict
            post = model.postprocess_detections
        pieces = _chunks(model, features, proposals)

        def pool():
            if pieces[0][0] < 0:
                return [pool_one(features, proposals)]
            return [pool_one(features[i : i + 1], [boxes]) for i, boxes in pieces]

        pooled = pool()

        def head():
            return torch.cat([head_one(x) for x in pooled])

        vecs = head()
        logits, deltas = predict(vecs)
    return {
        "pool": pool,
        "conv5_head": head,
        "predictor": lambda: predict(vecs),
        "postprocess": lambda: post(logits, deltas, proposals, sizes),
    }


def end_to_end_fn(model: nn.Module, features, proposals, sizes) -> Callable[[], object]:
    if isinstance(model, TorchvisionRegionPipeline):
        return lambda: model(features, proposals, sizes)
    return lambda: model(features, proposals, sizes)[0]


def build_variants(
    names: Sequence[str], depth: int, num_classes: int, seed: int, roi_chunk: int | None, features, proposals, device
):
    ours = build_ours(depth, num_classes, seed, roi_chunk)
    calibrate_scores(ours, features.cpu(), [p.cpu() for p in proposals], seed)
    tv = build_torchvision(ours, depth, num_classes)
    made: dict[str, nn.Module] = {}
    for name in names:
        if name == "ours":
            made[name] = ours
        elif name == "ours_before":
            made[name] = copy.deepcopy(ours)
            made[name].inference_roi_chunk = 0
        elif name == "torchvision":
            made[name] = tv
        elif name == "ours_fast":
            made[name] = prepare_for_inference(ours)
        elif name == "ours_fast_channels_last":
            # channels_last weights make every conv run (and return) NHWC; the NCHW pooled input is converted by conv.
            made[name] = prepare_for_inference(ours).to(memory_format=torch.channels_last)
        elif name == "torchvision_folded":
            made[name] = prepare_for_inference(tv)
        else:
            raise ValueError(f"--variants: unknown variant {name!r}; choose from {ALL_VARIANTS}")
    return {k: v.to(device) for k, v in made.items()}


def check_agreement(models: dict[str, nn.Module], features, proposals, sizes) -> dict[str, dict[str, float]]:
    """Every variant must give the torchvision detections (same count, boxes/scores within fp32 noise), image by
    image."""
    with torch.inference_mode():
        outs = {n: end_to_end_fn(m, features, proposals, sizes)() for n, m in models.items()}
    ref_name = "torchvision" if "torchvision" in outs else next(iter(outs))
    report = {}
    for name, out in outs.items():
        entry = {
            "num_detections": 0,
            "reference": ref_name,
            "max_abs_score_diff": 0.0,
            "max_abs_box_diff": 0.0,
            "labels_equal": True,
        }
        for o, r in zip(out, outs[ref_name]):
            entry["num_detections"] += int(o["scores"].numel())
            if o["scores"].shape != r["scores"].shape:
                entry["labels_equal"] = False
                entry["max_abs_score_diff"] = entry["max_abs_box_diff"] = float("inf")
                continue
            if o["scores"].numel():
                entry["max_abs_score_diff"] = max(
                    entry["max_abs_score_diff"], float((o["scores"] - r["scores"]).abs().max())
                )
                entry["max_abs_box_diff"] = max(entry["max_abs_box_diff"], float((o["boxes"] - r["boxes"]).abs().max()))
                entry["labels_equal"] &= bool(torch.equal(o["labels"], r["labels"]))
        if not entry["labels_equal"] or entry["max_abs_score_diff"] > 1e-4:
            print(f"WARNING: {name} detections differ from {ref_name}: {entry}", file=sys.stderr)
        report[name] = entry
    return report


def candidate_count(model: RoIHeads, features, proposals) -> int:
    """(RoI, class) pairs above the score threshold, i.e. the NMS input size of image 0."""
    with torch.inference_mode():
        logits, _ = model.predict(model.region_features(features[:1], proposals[:1], []))
    return int((F.softmax(logits, -1)[:, 1:] > SCORE_THRESH).sum())


# ------------------------------------------------------------------------------------------ timing
def measure(fn: Callable[[], object], args: argparse.Namespace, *, label: str) -> list[float]:
    """Per-call times (s) from torch.utils.benchmark (warm-up and thread count handled by Timer)."""

    def wrapped():
        with torch.inference_mode():
            return fn()

    # Process CPU time ignores the time this single-threaded process waits for a core on a
    # machine shared with other jobs; Timer's default clock (wall, CUDA-synchronised) otherwise.
    extra = {"timer": time.process_time} if args.clock == "process" else {}
    timer = Timer(stmt="fn()", globals={"fn": wrapped}, num_threads=args.threads, label=label, **extra)
    return list(timer.blocked_autorange(min_run_time=args.min_run_time).times)


def bench_config(args, device: torch.device, depth: int) -> dict:
    channels = 1024 if depth >= 50 else 256
    features, proposals, sizes = make_inputs(
        num_images=args.images,
        rois=args.rois,
        channels=channels,
        image_hw=tuple(args.image_size),
        device=device,
        seed=args.seed,
    )
    models = build_variants(
        args.variants, depth, args.num_classes, args.seed, args.roi_chunk, features, proposals, device
    )
    agreement = check_agreement(models, features, proposals, sizes)
    ours_any = next(m for n, m in models.items() if n.startswith("ours"))
    info = {
        "device": str(device),
        "depth": depth,
        "rois_per_image": args.rois,
        "images": args.images,
        "c4_map": list(features.shape),
        "pooled_shape": [args.rois * args.images, channels, POOL_SIZE, POOL_SIZE],
        "nms_candidates_image0": candidate_count(ours_any, features, proposals),
        "batchnorm_layers": {n: count_batchnorm(m) for n, m in models.items()},
        "agreement": agreement,
    }
    e2e = {n: end_to_end_fn(m, features, proposals, sizes) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    round_medians: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.rounds):
        # Interleave variants each round so drifting load from other users hits all of them alike.
        order = list(models) if r % 2 == 0 else list(reversed(list(models)))
        for name in order:
            t = measure(e2e[name], args, label=name)
            times[name] += t
            round_medians[name].append(statistics.median(t))
    rows = []
    ref = "torchvision" if "torchvision" in models else None
    for name in models:
        row = {
            "variant": name,
            "median_s": statistics.median(times[name]),
            "calls": len(times[name]),
            "round_medians_s": round_medians[name],
        }
        if ref:
            # Paired per-round ratios are robust to load changes between rounds.
            ratios = [a / b for a, b in zip(round_medians[name], round_medians[ref])]
            row["ratio_vs_torchvision"] = statistics.median(ratios)
            row["ratio_vs_torchvision_rounds"] = ratios
        rows.append(row)
    breakdown = {}
    if not args.no_breakdown:
        for name, model in models.items():
            fns = stage_fns(model, features, proposals, sizes)
            st = {s: statistics.median(measure(f, args, label=s)) for s, f in fns.items()}
            total = sum(st.values())
            breakdown[name] = {s: {"median_s": v, "fraction": v / total} for s, v in st.items()}
    return {"info": info, "end_to_end": rows, "breakdown": breakdown}


def print_report(result: dict) -> None:
    info = result["info"]
    print(
        f"\n== {info['device']}  ResNet-{info['depth']} C4 head  "
        f"{info['rois_per_image']} RoIs x {info['images']} image(s)"
        f"  C4 map {info['c4_map']}  NMS candidates {info['nms_candidates_image0']}"
    )
    print(f"{'variant':<26}{'median ms':>12}{'ours/tv':>10}   per-round ratios")
    for row in result["end_to_end"]:
        ratio = row.get("ratio_vs_torchvision")
        rr = " ".join(f"{x:.3f}" for x in row.get("ratio_vs_torchvision_rounds", []))
        print(f"{row['variant']:<26}{row['median_s'] * 1e3:>12.1f}{(f'{ratio:.3f}' if ratio else '-'):>10}   {rr}")
    if result["breakdown"]:
        print(f"{'stage breakdown':<26}" + "".join(f"{s:>22}" for s in STAGES))
        for name, st in result["breakdown"].items():
            cells = "".join(f"{st[s]['median_s'] * 1e3:>12.2f} ms {st[s]['fraction'] * 100:>5.1f}%" for s in STAGES)
            print(f"{name:<26}{cells}")
    agree = ", ".join(
        f"{n}: {a['num_detections']} dets"
        + f" |dscore|<={a['max_abs_score_diff']:.1e} |dbox|<={a['max_abs_box_diff']:.1e}"
        + ("" if a["labels_equal"] else " LABELS DIFFER")
        for n, a in info["agreement"].items()
    )
    print(f"agreement vs {next(iter(info['agreement'].values()))['reference']}: {agree}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rois", type=int, default=None, help="RoIs per image (default 300; 32 with --quick)")
    p.add_argument(
        "--quick", action="store_true", help="32 RoIs in chunks of 16, 2 rounds, no stage breakdown: finishes in < 60 s"
    )
    p.add_argument("--depths", type=int, nargs="+", default=[50, 18], help="ResNet depths of the C4 head")
    p.add_argument("--images", type=int, default=1, help="images per batch")
    p.add_argument("--num-classes", type=int, default=20, help="object classes K (the predictor adds background)")
    p.add_argument("--image-size", type=int, nargs=2, default=[600, 800], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for every measurement)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved measurement rounds per variant (3; 2 with --quick)"
    )
    p.add_argument("--min-run-time", type=float, default=None, help="Timer.blocked_autorange window per round (s)")
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if available)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage timings")
    p.add_argument(
        "--roi-chunk",
        type=int,
        default=None,
        help="inference_roi_chunk of the ours/ours_fast variants (default: the RoIHeads default)",
    )
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "process"),
        default="auto",
        help="auto: process CPU time for CPU runs with --threads 1, wall time otherwise",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="write all measurements to this JSON file")
    args = p.parse_args(argv)
    if args.rois is None:
        args.rois = 32 if args.quick else 300
    if args.quick and args.roi_chunk is None:
        args.roi_chunk = 16  # so that 32 RoIs still take the chunked path
    if args.quick:
        args.no_breakdown = True
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.min_run_time is None:
        args.min_run_time = 0.05 if args.quick else 1.0
    if args.rois < 1 or args.images < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--rois, --images, --threads and --rounds must be >= 1")
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.clock == "auto":
        args.clock = "process" if args.threads == 1 and args.devices == ["cpu"] else "wall"
    if args.clock == "process" and (args.threads != 1 or "cuda" in args.devices):
        p.error("--clock process measures CPU time: only meaningful with --threads 1 on --devices cpu")
    for d in args.devices:
        if d not in ("cpu", "cuda"):
            p.error(f"--devices: expected cpu or cuda, got {d!r}")
        if d == "cuda" and not torch.cuda.is_available():
            p.error("--devices cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "os_cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": args.threads,
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    machine["clock"] = args.clock
    print(
        f"torch {torch.__version__}  torchvision {torchvision.__version__}  "
        f"threads={args.threads}  clock={args.clock}  "
        f"cpus={os.cpu_count()}  load(1m)={machine['load_avg_1m_at_start']}"
    )
    results = []
    for dev in args.devices:
        for depth in args.depths:
            res = bench_config(args, torch.device(dev), depth)
            print_report(res)
            results.append(res)
    elapsed = time.perf_counter() - start
    machine["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\ntotal wall time {elapsed:.1f} s")
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine,
            "wall_time_s": elapsed,
            "results": results,
        }
        args.json_out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    with single_thread_roi_pool():  # this process runs torch on one Python thread
        raise SystemExit(main())
