"""Tests for data-parallel training (detres.engine.distributed): rank-sliced batches, TensorBoard logs, sharded
evaluation, SyncBatchNorm on CPU, and train_det / train_cls under torchrun (2 CPU processes, gloo) against
one process with the same global batch."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler

from detres.data.samplers import AspectRatioGroupedBatchSampler, InfiniteSampler, RankSlicedBatchSampler
from detres.engine import logging as run_logging
from detres.engine.distributed import env_world_size, on_main, shard_batches, wrap_ddp
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.utils.dist import shard_indices, unshard

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_command(args: list[str], nproc: int) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return cmd, env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` with ``nproc`` CPU processes on a free local port."""
    cmd, env = _torchrun_command(args, nproc)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# ------------------------------------------------------------------------------------------- samplers
def _groups(n: int = 23) -> list[int]:
    return [int(i % 3 == 0 or i % 7 == 0) for i in range(n)]  # two aspect-ratio groups of unequal sizes


def _global_batches(grouped: bool, batch: int, start: int) -> BatchSampler | AspectRatioGroupedBatchSampler:
    """The single-process training stream of detection_train_loader, positioned at batch ``start``."""
    if grouped:
        return AspectRatioGroupedBatchSampler(InfiniteSampler(23, seed=5), _groups(), batch, start_batch=start)
    return BatchSampler(InfiniteSampler(23, seed=5, start=start * batch), batch, drop_last=True)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("start", [0, 7])
def test_rank_slices_are_disjoint_and_together_are_the_single_process_batch(grouped, world, start):
    batch = 6
    alone = list(itertools.islice(iter(_global_batches(grouped, batch, start)), 12))
    ranks = [
        list(itertools.islice(iter(RankSlicedBatchSampler(_global_batches(grouped, batch, start), r, world)), 12))
        for r in range(world)
    ]
    for k, global_batch in enumerate(alone):
        slices = [ranks[r][k] for r in range(world)]
        assert all(len(s) == batch // world for s in slices)
        # Rank r holds positions [r * b, (r + 1) * b) of the one-process batch: disjoint, and together all of it.
        assert list(itertools.chain(*slices)) == list(global_batch)
        if grouped:
            assert len({_groups()[i] for i in itertools.chain(*slices)}) == 1  # grouping kept across ranks
    if start:  # resuming at batch k gives the slices of the uninterrupted stream's batch k onwards
        fresh = list(
            itertools.islice(iter(RankSlicedBatchSampler(_global_batches(grouped, batch, 0), 1, world)), start + 12)
        )
        assert fresh[start:] == ranks[1]


def test_rank_slicing_refuses_a_batch_that_does_not_split_and_bad_ranks():
    with pytest.raises(ValueError, match="multiple of the world size"):
        next(iter(RankSlicedBatchSampler(_global_batches(False, 5, 0), 0, 2)))
    with pytest.raises(ValueError, match="rank/world_size"):
        RankSlicedBatchSampler([], 2, 2)


def test_single_process_helpers_change_nothing():
    assert env_world_size() == 1
    batches = _global_batches(False, 4, 0)
    assert shard_batches(batches) is batches
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, torch.device("cpu")) is model
    assert on_main(lambda x: x + 1, 1) == 2
    assert list(shard_indices(7, 1, 3)) == [1, 4]
    assert unshard([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- TensorBoard
def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_beside_metrics_jsonl_hold_the_logged_scalars(tmp_path):
    logger = JsonLinesLogger(tmp_path / "metrics.jsonl")
    for it in (10, 20, 30):
        logger.log(iter=it, loss=1.0 / it, lr=0.1, note="text is not a scalar")
    logger.log(iter=30, AP=0.25)
    logger.close()
    assert len(list(tmp_path.glob(run_logging.EVENT_GLOB))) == 1
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"loss", "lr", "AP"}
    assert [s for s, _ in scalars["loss"]] == [10, 20, 30]
    assert [v for _, v in scalars["loss"]] == pytest.approx([0.1, 0.05, 1 / 30])
    assert scalars["AP"] == [(30, pytest.approx(0.25))]
    assert [r["iter"] for r in read_json_lines(tmp_path / "metrics.jsonl")] == [10, 20, 30, 30]

    # A resumed run at iteration 20 logs iteration 30 again: TensorBoard shows the new value only.
    resumed = JsonLinesLogger(tmp_path / "metrics.jsonl", resume_from_iter=20)
    resumed.log(iter=30, loss=7.0)
    resumed.close()
    assert _scalars(tmp_path)["loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, 7.0)]
    # A fresh run in the folder deletes the old events (its own new file holds no scalar yet).
    JsonLinesLogger(tmp_path / "metrics.jsonl").close()
    assert _scalars(tmp_path) == {}


def test_logger_of_a_rank_other_than_0_touches_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logging, "is_main_process", lambda: False)
    logger = JsonLinesLogger(tmp_path / "run" / "metrics.jsonl")
    logger.log(iter=1, loss=1.0)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- 2 processes
def test_sharded_inference_gathers_the_single_process_detections(tmp_path):
    torchrun([str(WORKER), "detect", str(tmp_path)])
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["world"] == 2
    sharded, alone = result["sharded"], result["alone"]
    assert [d["image_id"] for d in sharded] == [d["image_id"] for d in alone] == [500, 501, 502, 503, 504]
    assert sum(len(d["scores"]) for d in alone) > 0  # something to compare
    for got, want in zip(sharded, alone):
        assert got["labels"].tolist() == want["labels"].tolist()
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=1e-4)


def test_gloo_sync_batchnorm_matches_batchnorm_over_the_whole_batch(tmp_path):
    torchrun([str(WORKER), "sync_bn", str(tmp_path)])
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    torch.testing.assert_close(result["input_grad"], result["expected_input_grad"], atol=1e-5, rtol=1e-4)
    for got, want in zip(result["running"], result["expected_running"]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- tools under torchrun
# The shapes world at one image size (80x80): batches pad alike however they are split, so the two runs see the
# same pixels. Every random draw (scale, flip, RPN / RoI sampling) is a function of (seed, iteration, image),
# so one process and two draw alike; RoIs with IoU in [0, 0.5) are background, so every image fills its 16
# RoIs and 64 anchors: per-image sample counts are equal, and the mean of the ranks' losses is the global one.
DET = [
    "device=cpu",
    "model.depth=18",
    "model.base_width=16",
    "model.freeze_at=0",
    "model.anchor_sizes=[16, 32, 64]",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=300",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=16",
    "model.roi_heads.pooler_resolution=8",
    "model.roi_heads.bg_iou_thresh_lo=0.0",
    "input.min_size_train=[96]",
    "input.max_size_train=160",
    "input.min_size_test=96",
    "input.max_size_test=160",
    "data.num_workers=0",
    "solver.base_lr=0.02",
    "solver.warmup_iters=0",
    "solver.images_per_batch=4",
    "solver.max_iter=3",
    "solver.log_period=1",
    "solver.eval_period=0",
    "solver.checkpoint_period=100",
    "test.vis_images=0",
]


@pytest.fixture(scope="module")
def det_world(tmp_path_factory) -> Path:
    from tests.tiny_configs import write_det_world

    return write_det_world(tmp_path_factory.mktemp("ddp_world"), train=8, val=3, size=(80, 80))


def _det_args(world: Path, out: Path, config: Path) -> list[str]:
    config.write_text("task: det\n")
    data = [
        f"data.train_images={world / 'images'}",
        f"data.train_ann={world / 'annotations' / 'instances_train.json'}",
        f"data.val_images={world / 'images'}",
        f"data.val_ann={world / 'annotations' / 'instances_val.json'}",
    ]
    return [str(REPO / "tools" / "train_det.py"), "--config", str(config), f"output_dir={out}", *DET, *data]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_train_det_in_two_processes_equals_one_process_with_the_same_global_batch(det_world, tmp_path):
    for name, nproc in (("single", 1), ("ddp", 2)):
        result = torchrun(_det_args(det_world, tmp_path / name, tmp_path / "c.yaml"), nproc=nproc)
        assert result.stdout.count('"iterations": 3') == 1  # rank 0 alone prints the summary
    single = _weights(tmp_path / "single" / "model_final.pt")
    _assert_same_weights(single, _weights(tmp_path / "ddp" / "model_final.pt"))
    # Resume under torchrun: 2 steps, then --resume to 3; every rank continues from rank 0's last.pt.
    resumed = _det_args(det_world, tmp_path / "resumed", tmp_path / "c.yaml")
    torchrun(resumed + ["solver.max_iter=2"])
    torchrun([*resumed[:3], "--resume", *resumed[3:]])
    _assert_same_weights(single, _weights(tmp_path / "resumed" / "model_final.pt"))
    # rank 0 logged the global batch's mean losses: those of the single process
    losses = [
        [r["loss"] for r in read_json_lines(tmp_path / name / "metrics.jsonl") if "loss" in r]
        for name in ("single", "ddp")
    ]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0][0] != losses[0][2]  # the weights moved: not a comparison of two untouched models
    assert (tmp_path / "ddp" / "test" / "metrics.json").is_file() and list((tmp_path / "ddp").glob("events.out.*"))
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("single", "ddp")]
    assert metrics[1]["voc"]["mAP"] == pytest.approx(metrics[0]["voc"]["mAP"], abs=1e-3)


CLS = [
    "device=cpu",
    "data.num_workers=0",
    "model.arch=cifar",
    "model.depth=8",
    "model.shortcut=A",
    "augment.scale_min=32",
    "augment.scale_max=40",
    "augment.crop=32",
    "test.resize=32",
    "test.scales=[32]",
    "test.modes=[1crop]",
    "test.batch_size=8",
    "solver.batch_size=4",
    "solver.base_lr=0.05",
    "solver.max_iter=4",
    "solver.log_period=1",
    "solver.eval_period=1000",
    "solver.checkpoint_period=1000",
    "bn_recompute.batch_size=6",
]


@pytest.fixture(scope="module")
def cls_world(tmp_path_factory) -> Path:
    from detres.data.shapes.world import generate_shapes_world

    root = tmp_path_factory.mktemp("ddp_cls")
    generate_shapes_world(
        root,
        seed=1,
        num_cls_train_per_class=2,
        num_cls_val_per_class=1,
        cls_size=(32, 40),
        num_det_train=0,
        num_det_val=0,
        num_loc_train=0,
        num_loc_val=0,
    )
    return root / "cls"


def test_train_cls_in_two_processes_with_sync_bn_equals_one_process(cls_world, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: cls\n")
    for name, nproc in (("single", 1), ("ddp", 2), ("ddp_local_bn", 2)):
        sync = "false" if name == "ddp_local_bn" else "true"
        torchrun(
            [
                str(REPO / "tools" / "train_cls.py"),
                "--config",
                str(config),
                f"output_dir={tmp_path / name}",
                f"data.train_dir={cls_world / 'train'}",
                f"data.val_dir={cls_world / 'val'}",
                *CLS,
                f"solver.sync_bn={sync}",
            ],
            nproc=nproc,
        )
    # last.pt: the weights and BN running statistics after the 4 steps (model_final.pt: after the BN recompute)
    for file in ("last.pt", "model_final.pt"):
        _assert_same_weights(_weights(tmp_path / "single" / file), _weights(tmp_path / "ddp" / file))
    losses = [
        [r["loss"] for r in read_json_lines(tmp_path / name / "metrics.jsonl") if "loss" in r]
        for name in ("single", "ddp")
    ]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0][0] != losses[0][3]
    # the validation set was split over the ranks and the error counts summed: the one-process errors
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("single", "ddp")]
    for when in ("before_bn_recompute", "after_bn_recompute"):
        assert metrics[1][when]["1crop"] == pytest.approx(metrics[0][when]["1crop"])
        assert metrics[1][when]["1crop"]["n"] == 10
    # Without SyncBatchNorm each rank normalises its own 2 images: a different result (the test can tell).
    local = _weights(tmp_path / "ddp_local_bn" / "last.pt")
    single = _weights(tmp_path / "single" / "last.pt")
    assert any(not torch.allclose(local[k], single[k], atol=1e-4) for k in single if k.endswith("running_mean"))


def test_sigterm_to_torchrun_saves_last_pt_once_and_stops_every_rank(det_world, tmp_path):
    # What a cluster does to pre-empt a job: SIGTERM to the launcher, which passes it on to every rank.
    out = tmp_path / "run"
    cmd, env = _torchrun_command(_det_args(det_world, out, tmp_path / "c.yaml") + ["solver.max_iter=400"], 2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert 1 <= saved["iter"] < 400  # stopped early, at a step boundary, with the checkpoint written
    assert "stopped by SIGTERM" in stderr
    assert not list(out.glob("*.tmp")) and not (out / "model_final.pt").exists()


def test_alternating_training_in_two_processes_equals_one_process(det_world, tmp_path):
    # The 4-step scheme trains through the model's loss methods (rpn_losses / detector_losses), not forward:
    # DDP syncs them through MethodCall; each step freezes other parts (find_unused_parameters).
    extra = ["solver.training_scheme=alternating", "solver.alternating_iters=[1, 1, 1, 1]"]
    for name, nproc in (("single", 1), ("ddp", 2)):
        torchrun(_det_args(det_world, tmp_path / name, tmp_path / "c.yaml") + extra, nproc=nproc)
    for file in ("step1_rpn.pt", "step2_fast_rcnn.pt", "model_final.pt"):
        _assert_same_weights(_weights(tmp_path / "single" / file), _weights(tmp_path / "ddp" / file))


def test_a_diverging_run_under_torchrun_stops_every_rank_with_the_one_line_error(det_world, tmp_path):
    # The ranks agree on a non-finite loss (one all-reduce per step): all stop at the same step with the error,
    # none waits forever in the next gradient all-reduce, and last.pt stays a finite, resumable state.
    out = tmp_path / "run"
    cmd, env = _torchrun_command(
        _det_args(det_world, out, tmp_path / "c.yaml")
        + ["solver.base_lr=50", "solver.max_iter=40", "solver.checkpoint_period=1"],
        2,
    )
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode != 0
    # rank 0 alone reports, with its exit status (the other rank stopped at the same step and left quietly, so
    # torchrun, which stops all processes once one fails, did not kill rank 0 while it set last.pt back)
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_det: error: iteration")]
    assert len(errors) == 1 and "training stopped" in errors[0], result.stderr[-3000:]
    root_cause = result.stderr[result.stderr.index("Root Cause") :]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)", root_cause) and "exitcode  : 1" in root_cause, root_cause
    if (out / "last.pt").exists():
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------- train_loc under torchrun
# The tiny localizer on 80x80 square images: crops of 56² from a 64..72 resize cut at most 16 pixels off a side, and
# the main object is at least 25 pixels wide there, so every crop keeps a box and every image samples its 8 anchors;
# the mean of the ranks' losses is then the global one. Scale, crop, flip and anchor sampling are all seeded by
# (seed, iteration, image), so the two ranks draw what one process draws.
LOC = [
    "model.weights=null",
    "model.depth=18",
    "model.base_width=16",
    "model.freeze_at=0",
    "model.anchor_sizes=[16,32,64]",
    "input.scale_min=64",
    "input.scale_max=72",
    "input.crop=56",
    "input.flip_prob=0.5",
    "test.scale=64",
    "test.top_n=20",
    "data.num_workers=0",
    "device=cpu",
    "solver.images_per_batch=4",
    "solver.base_lr=0.02",
    "solver.warmup_iters=0",
    "solver.max_iter=3",
    "solver.log_period=1",
    "solver.checkpoint_period=100",
    "data.max_val_images=2",
]
RCNN = ["model.rcnn.crop_size=32", "model.rcnn.regions_per_batch=8", "model.rcnn.proposals_per_class=4"]


@pytest.fixture(scope="module")
def loc_world(tmp_path_factory) -> Path:
    from detres.data.shapes.writers import write_loc_task

    root = tmp_path_factory.mktemp("ddp_loc")
    write_loc_task(root, 0, {"train": 8, "val": 2}, (80, 80))
    return root / "loc"


def _loc_args(world: Path, out: Path, config: Path, *extra: str) -> list[str]:
    config.write_text("task: loc\n")
    return [
        str(REPO / "tools" / "train_loc.py"),
        "--config",
        str(config),
        f"output_dir={out}",
        f"data.root={world}",
        *LOC,
        *extra,
    ]


def _losses_of(*runs: Path) -> list[list[float]]:
    return [[r["loss"] for r in read_json_lines(run / "metrics.jsonl") if "loss" in r] for run in runs]


def test_train_loc_rpn_stage_in_two_processes_equals_one_process(loc_world, tmp_path):
    for name, nproc in (("single", 1), ("ddp", 2)):
        result = torchrun(_loc_args(loc_world, tmp_path / name, tmp_path / "c.yaml"), nproc=nproc)
        assert result.stdout.count("iterations 3,") == 1  # rank 0 alone tests and prints the report
    single = _weights(tmp_path / "single" / "model_final.pt")
    _assert_same_weights(single, _weights(tmp_path / "ddp" / "model_final.pt"))
    losses = _losses_of(tmp_path / "single", tmp_path / "ddp")
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert losses[0][0] != losses[0][2]  # the weights moved


def test_train_loc_rcnn_stage_in_two_processes_equals_one_process_and_resumes(loc_world, tmp_path):
    from detres.config.load import load_config
    from detres.engine.tasks.localization import train_localizer

    rpn = tmp_path / "rpn"  # the RPN stage in this process: a checkpoint to take proposals from
    train_localizer(load_config(None, ["task=loc", f"output_dir={rpn}", f"data.root={loc_world}", *LOC]))
    rcnn = [*RCNN, f"model.rcnn.rpn_checkpoint={rpn / 'model_final.pt'}"]
    for name, nproc in (("single", 1), ("ddp", 2)):
        result = torchrun(
            [*_loc_args(loc_world, tmp_path / name, tmp_path / "c.yaml", *rcnn), "--stage", "rcnn"], nproc=nproc
        )
        assert result.stdout.count("iterations 3,") == 1
    # the proposals were computed on the ranks' shards and gathered in image order: the one-process cache
    caches = [torch.load(tmp_path / name / "proposals.pt", weights_only=True) for name in ("single", "ddp")]
    assert caches[0]["view_scales"] == caches[1]["view_scales"] and len(caches[0]["regions"]) == 8
    for a, b in zip(caches[0]["regions"], caches[1]["regions"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single = _weights(tmp_path / "single" / "model_final.pt")
    _assert_same_weights(single, _weights(tmp_path / "ddp" / "model_final.pt"))
    losses = _losses_of(tmp_path / "single", tmp_path / "ddp")
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4) and losses[0][0] != losses[0][2]
    # --resume under torchrun: 2 steps, then on to 3 from rank 0's last.pt (and its proposals.pt)
    resumed = [*_loc_args(loc_world, tmp_path / "resumed", tmp_path / "c.yaml", *rcnn), "--stage", "rcnn"]
    torchrun([*resumed, "solver.max_iter=2"])
    torchrun([*resumed[:3], "--resume", *resumed[3:]])
    _assert_same_weights(single, _weights(tmp_path / "resumed" / "model_final.pt"))
