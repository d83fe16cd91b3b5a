"""R-CNN stage training pieces: proposals cached per ground-truth class, RoI-centric region batches, one SGD step."""

from __future__ import annotations

import pytest
import torch

from detres.engine.tasks.rcnn_regions import cache_proposals, rcnn_train_step, sample_regions
from detres.models.localization.rcnn_localizer import RCNNLocalizer, assign_rcnn_targets
from detres.models.localization.rpn_localizer import RPNLocalizer
from tests.tiny_configs import loc_model_config


def _samples():
    torch.manual_seed(0)
    return [
        (torch.rand(3, 64, 80) * 255, torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([2])),
        (
            torch.rand(3, 72, 64) * 255,
            torch.tensor([[20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 30.0, 30.0]]),
            torch.tensor([3, 1]),
        ),
    ]


def test_cache_keeps_top_n_per_gt_class_with_their_targets():
    torch.manual_seed(0)
    rpn = RPNLocalizer.from_config(
        loc_model_config(depth=18, base_width=8, anchor_sizes=[16, 32], aspect_ratios=[1.0]), num_classes=3
    )
    samples = _samples()
    cache = cache_proposals(rpn, samples, top_n=5, nms_thresh=0.9)
    assert len(cache) == 2
    assert cache[0]["classes"].unique().tolist() == [2] and cache[0]["rois"].shape[0] <= 5
    assert sorted(cache[1]["classes"].unique().tolist()) == [1, 3] and cache[1]["rois"].shape[0] <= 10
    for entry, (_, boxes, labels) in zip(cache, samples):
        expected, _ = assign_rcnn_targets(entry["rois"], entry["classes"], boxes, labels)
        assert torch.equal(entry["labels"], expected)


def _cache():
    rois = torch.tensor([[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]])
    labels, matched = assign_rcnn_targets(rois, torch.tensor([2, 2, 2]), rois[:1], torch.tensor([2]))
    return [
        {"rois": rois, "classes": torch.tensor([2, 2, 2]), "labels": labels, "matched": matched},
        {
            "rois": rois[:2],
            "classes": torch.tensor([1, 1]),
            "labels": torch.zeros(2, dtype=torch.long),
            "matched": rois[:2].clone(),
        },
    ]


def test_region_batches_span_images_and_respect_the_fg_fraction():
    cache, gen = _cache(), torch.Generator().manual_seed(0)
    batch = sample_regions(cache, 4, generator=gen)
    assert len(batch) == 4 and len(set(batch)) == 4 and {i for i, _ in batch} <= {0, 1}
    assert len(sample_regions(cache, 9, generator=gen)) == 9  # more than the pool: with replacement
    fg_capped = sample_regions(cache, 4, generator=gen, fg_fraction=0.25)
    assert sum(int(cache[i]["labels"][j]) > 0 for i, j in fg_capped) == 1 and len(fg_capped) == 4
    assert sample_regions([{"rois": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}], 4) == []


def test_one_step_changes_the_heads_and_returns_finite_losses():
    torch.manual_seed(0)
    model = RCNNLocalizer.from_config(loc_model_config(depth=18, base_width=8, rcnn={"crop_size": 32}), num_classes=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 48, 48) * 255]
    cache = _cache()
    before = model.bbox_pred.weight.detach().clone()
    out = rcnn_train_step(model, optimizer, images, cache, [(0, 0), (0, 2), (1, 1)])
    assert set(out) == {"loss", "loss_rcnn_cls", "loss_rcnn_box"} and all(v == v for v in out.values())
    assert out["loss_rcnn_cls"] > 0 and out["loss"] == pytest.approx(out["loss_rcnn_cls"] + out["loss_rcnn_box"])
    changed = (before != model.bbox_pred.weight.detach()).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [4, 5, 6, 7]  # only the foreground class's regressor learns


def test_repeated_steps_fit_a_fixed_region_batch():
    torch.manual_seed(0)
    model = RCNNLocalizer.from_config(
        loc_model_config(depth=18, base_width=8, freeze_at=0, rcnn={"crop_size": 32}), num_classes=3
    )  # random init, BN frozen at identity: inputs scaled by the ImageNet std (the no-checkpoint normalisation)
    assert model.pixel_std.tolist() == pytest.approx([58.395, 57.12, 57.375])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, cache = [torch.rand(3, 64, 64) * 255, torch.rand(3, 48, 48) * 255], _cache()
    batch = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    losses = [rcnn_train_step(model, optimizer, images, cache, batch)["loss_rcnn_cls"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


def test_to_image_frame_divides_boxes_by_the_view_scale_and_keeps_labels():
    from detres.engine.tasks.rcnn_regions import to_image_frame

    cache = _cache()
    moved = to_image_frame(cache, [(0.5, 0.25), (2.0, 2.0)])
    torch.testing.assert_close(moved[0]["rois"], cache[0]["rois"] / torch.tensor([0.5, 0.25, 0.5, 0.25]))
    torch.testing.assert_close(moved[0]["matched"], cache[0]["matched"] / torch.tensor([0.5, 0.25, 0.5, 0.25]))
    assert torch.equal(moved[1]["labels"], cache[1]["labels"]) and torch.equal(moved[0]["classes"], cache[0]["classes"])
    with pytest.raises(ValueError):
        to_image_frame(cache, [(1.0, 1.0)])


def test_ranks_take_equal_disjoint_slices_of_the_global_region_batch(monkeypatch):
    from detres.engine.tasks import rcnn_regions

    batch = [(i % 3, i) for i in range(12)]
    assert rcnn_regions.rank_slice(batch) == batch  # one process: the whole batch
    slices = []
    for rank in range(3):
        monkeypatch.setattr(rcnn_regions, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(rcnn_regions, "get_world_size", lambda: 3)
        slices.append(rcnn_regions.rank_slice(batch))
    assert [len(s) for s in slices] == [4, 4, 4] and [p for s in slices for p in s] == batch


def test_a_region_batch_that_does_not_split_over_the_ranks_is_a_one_line_error(monkeypatch, tmp_path):
    from detres.config.load import load_config
    from detres.engine.tasks import localization_rcnn

    monkeypatch.setattr(localization_rcnn, "get_world_size", lambda: 2)  # as under torchrun --nproc_per_node=2
    cfg = load_config(
        None,
        ["task=loc", f"output_dir={tmp_path}", "model.rcnn.rpn_checkpoint=rpn.pt", "model.rcnn.regions_per_batch=7"],
    )
    with pytest.raises(ValueError, match=r"model.rcnn.regions_per_batch \(7\) must be a multiple .* processes \(2\)"):
        localization_rcnn.train_rcnn_stage(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything was written
