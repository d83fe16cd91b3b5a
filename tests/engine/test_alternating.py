"""Tests for detres.engine.tasks.alternating's plan and per-step freezing (the runs are in test_det_trainer)."""

from __future__ import annotations

import pytest

from detres.config.load import load_config
from detres.engine.tasks.alternating import STEP_TRAINABLE, alternating_plan, set_step_trainable


def test_plan_defaults_to_max_iter_per_step_with_the_papers_drops():
    cfg = load_config(
        None, ["solver.training_scheme=alternating", "solver.alternating_images_per_batch=[8, 16, 8, 16]"], task="det"
    )
    plan = alternating_plan(cfg.solver)  # Appendix A, COCO: 240k at 0.001 + 80k at 0.0001 in each step
    assert plan.iters == (320000,) * 4 and plan.lr_steps == ((240000,),) * 4
    assert plan.images_per_batch == (8, 16, 8, 16)
    assert plan.to_dict() == {"iters": [320000] * 4, "images_per_batch": [8, 16, 8, 16], "lr_steps": [[240000]] * 4}


def test_plan_scales_the_drops_to_each_steps_length():
    cfg = load_config(
        None,
        [
            "solver.max_iter=80000",
            "solver.steps=[60000]",
            "solver.images_per_batch=2",
            "solver.alternating_iters=[80000, 40000, 80000, 40000]",
        ],
        task="det",
    )
    plan = alternating_plan(cfg.solver)
    assert plan.lr_steps == ((60000,), (30000,), (60000,), (30000,)) and plan.images_per_batch == (2, 2, 2, 2)
    for bad in (["solver.alternating_iters=[1, 2, 3]"], ["solver.alternating_images_per_batch=[1, 0, 1, 1]"]):
        with pytest.raises(ValueError, match="4 positive integers"):
            alternating_plan(load_config(None, bad, task="det").solver)


def test_each_step_trains_only_its_layers_and_keeps_freeze_at():
    from tests.tiny_configs import build_test_detector

    model = build_test_detector(2, depth=18, base_width=16, freeze_at=2)
    base = {n: p.requires_grad for n, p in model.named_parameters()}
    expected_trunk = {n for n, ok in base.items() if n.startswith("trunk.") and ok}
    assert expected_trunk and not any(n.startswith(("trunk.conv1", "trunk.layer1")) for n in expected_trunk)
    for step, parts in enumerate(STEP_TRAINABLE):
        set_step_trainable(model, step, base)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        want = {n for n, ok in base.items() if ok and n.split(".", 1)[0] in parts}
        assert trainable == want
        assert (trainable & expected_trunk == expected_trunk) == ("trunk" in parts)
    assert STEP_TRAINABLE == (("trunk", "rpn"), ("trunk", "roi_heads"), ("rpn",), ("roi_heads",))
    assert not any(p.requires_grad for p in model.trunk.parameters())  # after step 4
