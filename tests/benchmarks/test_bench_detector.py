"""The whole-detector benchmark's machinery at the smallest settings: figures present and sane, detections agree (not
speed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("_bench_detector", ROOT / "benchmarks" / "bench_detector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    """One run: ResNet-18, 128 px, 50 proposals, 1 thread, 1 round / step, one point per curve, peak RSS in
    subprocesses."""
    out = tmp_path_factory.mktemp("bench_detector") / "bench.json"
    bench = _load_bench()
    bench.main(
        [
            "--depth",
            "18",
            "--size",
            "128",
            "--proposals",
            "50",
            "--threads",
            "1",
            "--rounds",
            "1",
            "--train-steps",
            "1",
            "--data-images",
            "2",
            "--matmul-size",
            "512",
            "--proposal-points",
            "20",
            "--size-points",
            "96",
            "--json-out",
            str(out),
        ]
    )
    return json.loads(out.read_text()), out


def test_required_keys_are_positive_per_thread_count(tiny_run):
    res, _ = tiny_run
    for key in ("inference_speedup_vs_torchvision", "floor_ratio", "train_speedup_vs_torchvision"):
        assert set(res[key]) == {"1"}, key
        assert _positive_finite(res[key]["1"]), (key, res[key])
    inf = res["inference"]["1"]
    for name in ("detres", "torchvision"):
        assert _positive_finite(inf[name]["median_s"])
        assert set(inf[name]["stages_s"]) == {
            "preprocess",
            "trunk",
            "rpn",
            "roi_pool",
            "conv5_head",
            "predictor_postprocess",
        }
        assert _positive_finite(inf[name]["stages_s"]["conv5_head"])
        assert _positive_finite(res["train"]["1"][name]["median_s"])
        assert res["train"]["1"][name]["losses_finite"]
        assert _positive_finite(res["peak_rss_mb"][name]["inference_mb"])
        assert _positive_finite(res["peak_rss_mb"][name]["train_mb"])
    assert _positive_finite(inf["matmul_peak_gflops"]) and _positive_finite(inf["floor_s"])
    assert _positive_finite(res["data_pipeline"]["images_per_cpu_s"])


def test_detections_agree_and_flops_match(tiny_run):
    res, _ = tiny_run
    agreement = res["agreement"]
    assert agreement["passed"], agreement
    assert agreement["max_abs_box_diff"] < 1e-3 and agreement["labels_equal"]
    assert agreement["full_pipeline"]["detections_detres"] > 0  # the comparison is not vacuous
    flops = res["flops"]
    assert flops["detres"]["total"] == flops["torchvision"]["total"] > 0  # same network, same proposals
    assert flops["detres"]["by_stage"]["conv5_head"] > flops["detres"]["by_stage"]["trunk"] > 0


def test_cost_curves_and_png(tiny_run):
    res, out = tiny_run
    curves = res["curves"]
    assert [r["proposals"] for r in curves["proposals"]] == [20]
    row = curves["proposals"][0]
    assert _positive_finite(row["detres_s"]) and _positive_finite(row["torchvision_s"])
    assert row["detres_actual_proposals"] == row["torchvision_actual_proposals"] <= 20
    assert [r["shorter_side"] for r in curves["shorter_side"]] == [96]
    assert curves["shorter_side"][0]["image_hw"] == [96, 128]
    assert 0 < curves["shorter_side"][0]["detres_actual_proposals"] <= 50
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- --device cuda
def test_amp_without_cuda_device_is_refused():
    with pytest.raises(SystemExit) as exc:
        _load_bench().parse_args(["--amp"])  # CPU runs stay fp32
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_device_cuda_without_a_gpu_skips_cleanly(tmp_path, capsys):
    out = tmp_path / "cuda.json"
    assert _load_bench().main(["--device", "cuda", "--amp", "--quick", "--json-out", str(out)]) == {
        "skipped": "no CUDA device"
    }
    assert "no CUDA device" in capsys.readouterr().out and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_with_amp_times_autocast_inference_and_training(tmp_path):
    out = tmp_path / "cuda.json"
    _load_bench().main(
        [
            "--device",
            "cuda",
            "--amp",
            "--depth",
            "18",
            "--size",
            "128",
            "--proposals",
            "50",
            "--rounds",
            "2",
            "--train-steps",
            "1",
            "--json-out",
            str(out),
        ]
    )
    res = json.loads(out.read_text())["cuda"]
    for name in ("detres", "torchvision"):
        entry = res[name]
        for key in ("inference_fp32", "inference_amp", "train_step"):
            assert _positive_finite(entry[key]["median_s"]), (name, key)
        assert entry["amp_vs_fp32"]["detections_amp"] > 0
    assert _positive_finite(res["inference_speedup_vs_torchvision"])


def test_resnet50_fast_paths_agree_with_torchvision_at_one_thread(one_thread):
    """ResNet-50 is where the CPU fast paths act together: channels-last trunk, 1x1 convs on oneDNN (1 thread),
    frozen BN folded, fast RoI pool, chunked conv5. Its detections must still equal the torchvision assembly's."""
    bench = _load_bench()
    args = bench.parse_args(["--depth", "50", "--size", "160", "--proposals", "40"])
    image, target = bench.make_image(args.size, args.seed), bench.make_targets(args.size, args.seed)
    models = bench.build_pair(args, image, target["boxes"])
    for fold_bn in (False, True):
        agreement = bench.check_agreement(bench.for_inference(models, fold_bn), image)
        assert agreement["passed"] and agreement["proposals_equal"], agreement
        assert agreement["max_abs_box_diff"] < 1e-3 and agreement["labels_equal"]
        assert agreement["full_pipeline"]["detections_detres"] > 0
    # and the trunk really took the oneDNN route: no conv on ATen's GEMM path
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        models["detres"].trunk(models["detres"].preprocess([image])[0])
    names = {e.name for e in prof.events()}
    assert "aten::mkldnn_convolution" in names and "aten::_slow_conv2d_forward" not in names
