"""Tests for the config → model-arguments step (classifier and detector builders) and rebuilding a detector from its
checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detres.config.load import load_config
from detres.models.backbones.backbone_config import (
    backbone_normalization,
    check_backbone_checkpoint,
    model_normalization,
    trunk_from_config,
)
from detres.models.backbones.resnet import build_resnet
from detres.models.build import (
    build_classifier,
    build_detector,
    classifier_kwargs_from_config,
    detector_state,
    load_detector,
)
from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.box_head import FastRCNNPredictor
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.roi_pooler import RoIPooler
from detres.models.detection.rpn import RegionProposalNetwork
from detres.models.detection.rpn_head import RPNHead
from detres.utils.torch_files import save_checkpoint


def test_classifier_kwargs_follow_the_config():
    cfg = load_config(None, ["model.depth=34", "model.shortcut=A", "model.base_width=16"], task="cls")
    kwargs = classifier_kwargs_from_config(cfg.model, num_classes=7)
    model = build_classifier(**kwargs)
    assert kwargs["num_classes"] == 7 and model.fc.out_features == 7
    assert model.conv1.out_channels == 16 and model.layer4[0].conv1.out_channels == 128
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_cifar_arch_ignores_imagenet_only_options():
    cfg = load_config(None, ["model.arch=cifar", "model.depth=20", "model.shortcut=A"], task="cls")
    model = build_classifier(**classifier_kwargs_from_config(cfg.model, num_classes=10))
    assert sum(p.numel() for p in model.parameters()) == 269_722  # ResNet-20 of Sec. 4.2
    with pytest.raises(ValueError, match="model.arch"):
        build_classifier(arch="vgg", depth=16, num_classes=10)


def test_base_width_scales_every_stage():
    half = build_resnet(18, base_width=32, num_classes=10)
    full = build_resnet(18, num_classes=10)
    assert [m.out_channels for m in (half.conv1, half.layer1[0].conv2, half.layer4[1].conv2)] == [32, 32, 256]
    # conv weights scale with in*out channels, so a half-width net has about a quarter of the parameters
    ratio = sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.24 < ratio < 0.26
    with pytest.raises(ValueError, match="base_width"):
        build_resnet(18, base_width=0)


def _cls_checkpoint(path, *, mean=(10.0, 20.0, 30.0), std=None, depth=18, base_width=16, bn_recomputed=True):
    model = build_resnet(depth, base_width=base_width, num_classes=3)
    save_checkpoint(
        path,
        {
            "bn_recomputed": bn_recomputed,
            "model": model.state_dict(),
            "model_args": {
                "arch": "imagenet",
                "depth": depth,
                "num_classes": 3,
                "shortcut": "B",
                "plain": False,
                "zero_init_residual": False,
                "stride_in_1x1": False,
                "base_width": base_width,
            },
            "data_stats": {"channel_mean": torch.tensor(mean), "fixed_mean": None, "std": std},
        },
    )
    return model


def test_detector_takes_pixel_mean_from_a_train_cls_checkpoint(tmp_path):
    _cls_checkpoint(tmp_path / "cls.pt", std=[2.0, 2.0, 2.0])
    cfg = load_config(
        None, [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18", "model.base_width=16"], task="det"
    )
    assert model_normalization(cfg.model) == ([10.0, 20.0, 30.0], [2.0, 2.0, 2.0])
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=4)
    assert (
        model.transform.pixel_mean.flatten().tolist() == [10.0, 20.0, 30.0]
        and model.transform.pixel_std.flatten().tolist() == [2.0] * 3
    )
    assert model.roi_heads.predictor.cls_score.out_features == 5
    assert model.rpn.nms_thresh == 0.7 and model.roi_heads.postprocess.nms_thresh == 0.3
    assert model.roi_heads.positive_fraction == 0.25 and model.rpn.post_nms_top_n("test") == 300
    over = load_config(
        None,
        [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18", "model.base_width=16", "model.pixel_mean=[1, 2, 3]"],
        task="det",
    )
    assert model_normalization(over.model)[0] == [1.0, 2.0, 3.0]


def test_detector_loads_the_backbone_weights(tmp_path):
    source = _cls_checkpoint(tmp_path / "cls.pt")
    cfg = load_config(
        None, [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18", "model.base_width=16"], task="det"
    )
    detector = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    assert torch.equal(detector.trunk.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    # BN statistics come across into the frozen BN buffers unchanged
    assert torch.equal(detector.trunk.layer2[1].bn2.running_var, source.layer2[1].bn2.running_var)
    # A rebuild (load_weights=False) does not read the backbone file: the checkpoint's state_dict fills it.
    (tmp_path / "cls.pt").unlink()
    rebuilt = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2, load_weights=False)
    assert set(rebuilt.state_dict()) == set(detector.state_dict())


def test_backbone_architecture_mismatch_is_named(tmp_path):
    _cls_checkpoint(tmp_path / "cls.pt", base_width=16)
    cfg = load_config(None, [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18"], task="det")
    with pytest.raises(ValueError, match=r"base_width=16.*model\.base_width=64"):
        check_backbone_checkpoint(cfg.model["weights"], cfg.model)
    with pytest.raises(ValueError, match=r"base_width=16.*model\.base_width=64"):
        build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)


def test_foreign_weights_and_random_init_default_to_imagenet_normalisation(tmp_path):
    torch.save(build_resnet(18).state_dict(), tmp_path / "tv.pth")
    cfg = load_config(None, [f"model.weights={tmp_path / 'tv.pth'}", "model.depth=18"], task="det")
    mean, std = model_normalization(cfg.model)
    assert mean == pytest.approx([123.675, 116.28, 103.53])
    assert std == pytest.approx([58.395, 57.12, 57.375])
    # One rule for every network built on a backbone: no checkpoint = ImageNet's statistics too.
    assert backbone_normalization(None) == (pytest.approx(mean), pytest.approx(std))


def test_detector_config_refuses_a_backbone_without_recomputed_bn(tmp_path):
    from detres.models.backbones.weights import UnrecomputedBNError

    _cls_checkpoint(tmp_path / "last.pt", bn_recomputed=False)
    base = [f"model.weights={tmp_path / 'last.pt'}", "model.depth=18", "model.base_width=16"]
    cfg = load_config(None, base, task="det")
    assert cfg.model.allow_unrecomputed_bn is False
    with pytest.raises(UnrecomputedBNError, match=r"last\.pt.*model\.allow_unrecomputed_bn"):
        build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    allowed = load_config(None, [*base, "model.allow_unrecomputed_bn=true"], task="det")
    with pytest.warns(UserWarning, match="not recomputed"):
        build_detector(allowed.model, input_cfg=allowed.input, num_classes=2)


def _tiny_det_config(*overrides: str):
    return load_config(None, ["model.depth=18", "model.base_width=8", *overrides], task="det")


def test_each_config_value_reaches_its_component_in_one_step():
    cfg = _tiny_det_config(
        "model.anchor_sizes=[24, 48]",
        "model.aspect_ratios=[1.0]",
        "model.rpn.allowed_border=5",
        "model.rpn.crowd_iof_thresh=0.6",
        "model.rpn.min_size=2.0",
        "model.rpn.pre_nms_top_n_test=321",
        "model.rpn.batch_size_per_image=64",
        "model.roi_heads.crowd_iof_thresh=0.5",
        "model.roi_heads.bg_iou_thresh_lo=0.0",
        "model.roi_heads.pooler_type=roi_align",
        "model.roi_heads.pooler_resolution=6",
        "model.roi_heads.sampling_ratio=2",
        "model.roi_heads.detections_per_img=17",
        "model.roi_heads.bbox_reg_weights=[1.0, 2.0, 3.0, 4.0]",
        "model.freeze_at=1",
    )
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    assert model.rpn.anchor_generator.sizes == (24.0, 48.0) and model.rpn.anchor_generator.aspect_ratios == (1.0,)
    assert model.rpn.allowed_border == 5 and model.rpn.crowd_iof_thresh == 0.6 and model.rpn.min_size == 2.0
    assert model.rpn.pre_nms_top_n("test") == 321 and model.rpn.sampler.batch_size_per_image == 64
    heads = model.roi_heads
    assert (
        heads.crowd_iof_thresh == 0.5 and heads.bg_iou_thresh_lo == 0.0 and heads.postprocess.detections_per_img == 17
    )
    assert (heads.pooler.pooler_type, heads.pooler.output_size, heads.pooler.sampling_ratio) == ("roi_align", 6, 2)
    assert tuple(heads.box_coder.weights) == (1.0, 2.0, 3.0, 4.0)
    assert any(p.requires_grad for p in model.trunk.layer1.parameters())  # freeze_at=1: conv1 only
    assert not any(p.requires_grad for p in model.trunk.conv1.parameters())


def test_each_component_has_a_from_config_taking_its_own_sub_tree():
    cfg = _tiny_det_config("model.rpn.allowed_border=5", "model.roi_heads.score_thresh=0.25")
    anchors = AnchorGenerator.from_config(cfg.model, stride=16)
    assert anchors.sizes == tuple(float(s) for s in cfg.model.anchor_sizes) and anchors.stride == 16
    rpn = RegionProposalNetwork.from_config(
        cfg.model.rpn, anchor_generator=anchors, head=RPNHead(8, anchors.num_anchors_per_location())
    )
    assert rpn.allowed_border == 5
    pooler = RoIPooler.from_config(cfg.model.roi_heads, spatial_scale=1 / 16)
    assert pooler.output_size == cfg.model.roi_heads.pooler_resolution
    predictor = FastRCNNPredictor.from_config(cfg.model.roi_heads, in_features=10, num_classes=3)
    assert predictor.cls_score.in_features == 10
    context = FastRCNNPredictor.from_config(
        dict(cfg.model.roi_heads, global_context=True), in_features=10, num_classes=3
    )
    assert context.cls_score.in_features == 20  # [region | context]
    heads = RoIHeads.from_config(cfg.model.roi_heads, pooler=pooler, box_head=nn.Identity(), predictor=predictor)
    assert heads.postprocess.score_thresh == 0.25
    trunk, head, dim = trunk_from_config(cfg.model, pooler_resolution=14)
    assert trunk.stride == 16 and dim == head.out_channels


def test_detector_checkpoint_is_its_config_tree_and_rebuilds_the_same_detections(tmp_path):
    cfg = _tiny_det_config("model.roi_heads.score_thresh=0.0", "model.rpn.post_nms_top_n_test=20")
    torch.manual_seed(0)
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2).eval()
    state = detector_state(model, config=cfg, meta={"class_names": ["a", "b"]})
    assert set(state) == {"model", "config", "meta"} and state["config"] == cfg.to_dict()
    save_checkpoint(tmp_path / "det.pt", {**state, "iter": 3})
    loaded, meta = load_detector(tmp_path / "det.pt")
    assert meta["class_names"] == ["a", "b"] and meta["config"] == cfg.to_dict()
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert a["boxes"].shape[0] > 0 and all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_load_detector_names_what_is_wrong_with_a_checkpoint(tmp_path):
    cfg = _tiny_det_config()
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    bad_key = dict(cfg.to_dict(), model=dict(cfg.to_dict()["model"], depht=18))
    save_checkpoint(tmp_path / "key.pt", detector_state(model, config=bad_key, meta={"class_names": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"key\.pt: its config: .*depht"):
        load_detector(tmp_path / "key.pt")
    save_checkpoint(tmp_path / "names.pt", detector_state(model, config=cfg, meta={"class_names": "ab"}))
    with pytest.raises(ValueError, match=r"names\.pt: meta\.class_names"):
        load_detector(tmp_path / "names.pt")
    save_checkpoint(tmp_path / "three.pt", detector_state(model, config=cfg, meta={"class_names": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match=r"three\.pt: 'model' weights do not fit"):
        load_detector(tmp_path / "three.pt")


def test_detector_config_carries_the_crowd_thresholds():
    cfg = load_config(None, ["model.roi_heads.crowd_iof_thresh=0.5", "model.rpn.crowd_iof_thresh=0.6"], task="det")
    model = build_detector(dict(cfg.model, depth=18, base_width=8), input_cfg=cfg.input, num_classes=2)
    assert model.roi_heads.crowd_iof_thresh == 0.5 and model.rpn.crowd_iof_thresh == 0.6
    assert load_config(None, [], task="det").model.roi_heads.crowd_iof_thresh == 0.7


def test_load_detector_rejects_other_checkpoints(tmp_path):
    save_checkpoint(
        tmp_path / "cls.pt", {"model": {}, "model_args": {"arch": "imagenet"}, "class_names": ["a"], "data_stats": {}}
    )
    with pytest.raises(ValueError, match=r"cls\.pt.*not a train_det checkpoint.*model.weights"):
        load_detector(tmp_path / "cls.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_detector(tmp_path / "missing.pt")


def test_postprocess_options_go_from_config_to_the_roi_heads_and_back_from_a_checkpoint(tmp_path):
    from detres.inference.test_config import TestConfig

    defaults = load_config(None, [], task="det").model.roi_heads
    assert {k: defaults[k] for k in ("nms_method", "soft_nms_sigma", "soft_nms_score_thresh", "box_voting")} == {
        "nms_method": "nms",
        "soft_nms_sigma": 0.5,
        "soft_nms_score_thresh": 0.001,
        "box_voting": False,
    }
    assert defaults["box_voting_iou"] == 0.5
    cfg = _tiny_det_config(
        "model.roi_heads.nms_method=soft_linear",
        "model.roi_heads.box_voting=true",
        "model.roi_heads.box_voting_iou=0.6",
    )
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    post = model.roi_heads.postprocess
    assert (post.nms_method, post.voting, post.voting_iou) == ("soft_linear", True, 0.6)
    # A config tree written before these options existed rebuilds with the defaults.
    old_tree = cfg.to_dict()
    for key in ("nms_method", "soft_nms_sigma", "soft_nms_score_thresh", "box_voting", "box_voting_iou"):
        del old_tree["model"]["roi_heads"][key]
    save_checkpoint(tmp_path / "old.pt", detector_state(model, config=old_tree, meta={"class_names": ["a", "b"]}))
    old, _ = load_detector(tmp_path / "old.pt")
    assert (old.roi_heads.postprocess.nms_method, old.roi_heads.postprocess.voting) == ("nms", False)
    # Test-time overrides (what tools/test_det.py and tools/infer.py take from flags) leave the model as it is;
    # None keeps the model's own value.
    test_cfg = TestConfig(voting=True, soft_nms_sigma=0.2)
    over = test_cfg.postprocess_of(old.roi_heads.postprocess)
    assert (over.nms_method, over.voting, over.soft_nms_sigma) == ("nms", True, 0.2)
    assert (old.roi_heads.postprocess.voting, old.roi_heads.postprocess.soft_nms_sigma) == (False, 0.5)
    with pytest.raises(ValueError, match="nms_method"):
        TestConfig(nms_method="fast")
    with pytest.raises(ValueError, match="voting_iou"):
        TestConfig(voting_iou=-1.0).postprocess_of(old.roi_heads.postprocess)
