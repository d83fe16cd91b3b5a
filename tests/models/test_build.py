"""Tests for the config → model-arguments step (classifier and detector builders) and rebuilding a detector from its
checkpoint."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import load_config
from detres.models.backbones.resnet import build_resnet
from detres.models.build import (
    build_classifier,
    classifier_kwargs_from_config,
    detector_kwargs_from_config,
    load_detector,
)
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
    kwargs = detector_kwargs_from_config(cfg.model, num_classes=4)
    assert kwargs["pixel_mean"] == [10.0, 20.0, 30.0] and kwargs["pixel_std"] == [2.0, 2.0, 2.0]
    assert kwargs["num_classes"] == 4 and kwargs["rpn_nms_thresh"] == 0.7 and kwargs["nms_thresh"] == 0.3
    assert kwargs["roi_positive_fraction"] == 0.25 and kwargs["rpn_post_nms_top_n_test"] == 300
    over = load_config(
        None,
        [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18", "model.base_width=16", "model.pixel_mean=[1, 2, 3]"],
        task="det",
    )
    assert detector_kwargs_from_config(over.model, num_classes=4)["pixel_mean"] == [1.0, 2.0, 3.0]


def test_detector_loads_the_backbone_weights(tmp_path):
    from detres.models.build import build_detector

    source = _cls_checkpoint(tmp_path / "cls.pt")
    cfg = load_config(
        None, [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18", "model.base_width=16"], task="det"
    )
    detector = build_detector(**detector_kwargs_from_config(cfg.model, num_classes=2))
    assert torch.equal(detector.trunk.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    # BN statistics come across into the frozen BN buffers unchanged
    assert torch.equal(detector.trunk.layer2[1].bn2.running_var, source.layer2[1].bn2.running_var)


def test_backbone_architecture_mismatch_is_named(tmp_path):
    _cls_checkpoint(tmp_path / "cls.pt", base_width=16)
    cfg = load_config(None, [f"model.weights={tmp_path / 'cls.pt'}", "model.depth=18"], task="det")
    with pytest.raises(ValueError, match=r"base_width=16.*model\.base_width=64"):
        detector_kwargs_from_config(cfg.model, num_classes=2)


def test_foreign_weights_default_to_imagenet_normalisation(tmp_path):
    torch.save(build_resnet(18).state_dict(), tmp_path / "tv.pth")
    cfg = load_config(None, [f"model.weights={tmp_path / 'tv.pth'}", "model.depth=18"], task="det")
    kwargs = detector_kwargs_from_config(cfg.model, num_classes=2)
    assert kwargs["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert kwargs["pixel_std"] == pytest.approx([58.395, 57.12, 57.375])


def test_detector_config_refuses_a_backbone_without_recomputed_bn(tmp_path):
    from detres.models.backbones.weights import UnrecomputedBNError
    from detres.models.build import build_detector

    _cls_checkpoint(tmp_path / "last.pt", bn_recomputed=False)
    base = [f"model.weights={tmp_path / 'last.pt'}", "model.depth=18", "model.base_width=16"]
    cfg = load_config(None, base, task="det")
    kwargs = detector_kwargs_from_config(cfg.model, num_classes=2)
    assert kwargs["allow_unrecomputed_bn"] is False
    with pytest.raises(UnrecomputedBNError, match=r"last\.pt.*model\.allow_unrecomputed_bn"):
        build_detector(**kwargs)
    allowed = load_config(None, [*base, "model.allow_unrecomputed_bn=true"], task="det")
    with pytest.warns(UserWarning, match="not recomputed"):
        build_detector(**detector_kwargs_from_config(allowed.model, num_classes=2))


def test_detector_config_carries_the_crowd_thresholds():
    cfg = load_config(None, ["model.roi_heads.crowd_iof_thresh=0.5", "model.rpn.crowd_iof_thresh=0.6"], task="det")
    kwargs = detector_kwargs_from_config(cfg.model, num_classes=2)
    assert kwargs["roi_crowd_iof_thresh"] == 0.5 and kwargs["rpn_crowd_iof_thresh"] == 0.6
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
    from detres.models.build import POSTPROCESS_KEYS, build_detector, configure_postprocess

    defaults = detector_kwargs_from_config(load_config(None, [], task="det").model, num_classes=2)
    assert {k: defaults[k] for k in POSTPROCESS_KEYS} == {
        "nms_method": "nms",
        "soft_nms_sigma": 0.5,
        "soft_nms_score_thresh": 0.001,
        "box_voting": False,
        "box_voting_iou": 0.5,
    }
    cfg = load_config(
        None,
        [
            "model.depth=18",
            "model.base_width=16",
            "model.roi_heads.nms_method=soft_linear",
            "model.roi_heads.box_voting=true",
            "model.roi_heads.box_voting_iou=0.6",
        ],
        task="det",
    )
    kwargs = detector_kwargs_from_config(cfg.model, num_classes=2)
    model = build_detector(**kwargs)
    heads = model.roi_heads
    assert (heads.nms_method, heads.box_voting, heads.box_voting_iou) == ("soft_linear", True, 0.6)
    assert kwargs["nms_method"] == "soft_linear"  # build_detector does not consume the caller's dict
    # A checkpoint written before these options existed rebuilds with the defaults.
    old_args = {k: v for k, v in kwargs.items() if k not in POSTPROCESS_KEYS}
    save_checkpoint(
        tmp_path / "old.pt",
        {
            "model": model.state_dict(),
            "model_args": dict(old_args, weights_path=None),
            "meta": {"class_names": ["a", "b"]},
        },
    )
    old, _ = load_detector(tmp_path / "old.pt")
    assert (old.roi_heads.nms_method, old.roi_heads.box_voting) == ("nms", False)
    # Test-time override (what tools/test_det.py and tools/infer.py do); None leaves an option as it is.
    configure_postprocess(old, box_voting=True, nms_method=None, soft_nms_sigma=0.2)
    assert (old.roi_heads.nms_method, old.roi_heads.box_voting, old.roi_heads.soft_nms_sigma) == ("nms", True, 0.2)
    with pytest.raises(ValueError, match="nms_method"):
        configure_postprocess(old, nms_method="fast")
    with pytest.raises(ValueError, match="unknown options"):
        configure_postprocess(old, voting=True)
