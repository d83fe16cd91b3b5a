"""Tests for the VGG-16 Faster R-CNN backbone (Tables 7-8): trunk/head split, weights, freezing, config round trip."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import load_config
from detres.models.backbones.backbone_config import check_backbone_checkpoint, model_normalization
from detres.models.backbones.vgg import VGG, VGG16_CFG, vgg16
from detres.models.backbones.vgg16_split import VGGFcHead, VGGTrunk, build_vgg16_c4
from detres.models.build import build_detector, detector_state, load_detector
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import build_test_detector, det_input_config, det_model_config

torchvision = pytest.importorskip("torchvision")

# Conv layers (3x3 weights + biases): conv1 1,792 + 36,928; conv2 73,856 + 147,584; conv3 295,168 + 2 x 590,080;
# conv4 1,180,160 + 2 x 2,359,808; conv5 3 x 2,359,808 -> 14,714,688.
# fc6 25,088 x 4,096 + 4,096 = 102,764,544; fc7 4,096 x 4,096 + 4,096 = 16,781,312;
# fc8 4,096 x 1,000 + 1,000 = 4,097,000.
# Trunk + head = 14,714,688 + 102,764,544 + 16,781,312 = 134,260,544 = 138,357,544 - 4,097,000.
TRUNK_PLUS_HEAD = 134_260_544


def _image(h: int = 96, w: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def _target() -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 88.0]]), "labels": torch.tensor([1, 2])}


@pytest.fixture(scope="module")
def tv_vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def tv_weights(tv_vgg16, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16_tv.pth"
    torch.save(tv_vgg16.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def detector(tv_weights):
    """One VGG-16 detector (torchvision-format weights, freeze_at=2) shared by the tests below; anchors small
    enough for a 96-px image to have inside anchors (so the RPN losses are not trivially zero)."""
    torch.manual_seed(0)
    return build_test_detector(
        3,
        backbone="vgg16",
        weights=str(tv_weights),
        anchor_sizes=[32, 64],
        pixel_std=[1.0, 1.0, 1.0],
        roi_heads={"pooler_resolution": 7},
    )


def test_parameter_count_is_vgg16_without_fc8(tv_vgg16):
    trunk, head, dim = build_vgg16_c4()
    count = sum(p.numel() for m in (trunk, head) for p in m.parameters())
    tv_total = sum(p.numel() for p in tv_vgg16.parameters())
    assert dim == head.out_channels == 4096
    assert count == TRUNK_PLUS_HEAD == tv_total - tv_vgg16.classifier[6].weight.numel() - 1000


def test_trunk_and_head_equal_torchvision_on_the_same_weights(tv_vgg16, tv_weights):
    trunk, head, _ = build_vgg16_c4(weights_path=tv_weights)
    head.eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = trunk(x)
        assert trunk.stride == 16 and trunk.out_channels == 512
        assert tuple(features.shape) == (1, 512, 96 // 16, 128 // 16)
        torch.testing.assert_close(features, tv_vgg16.features[:30](x))
        pooled = torch.randn(2, 512, 7, 7, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(head(pooled), tv_vgg16.classifier[:6](pooled.flatten(1)))
    with pytest.raises(ValueError, match=r"\[R,512,7,7\]"):
        head(torch.zeros(1, 512, 5, 5))


def test_freeze_at_freezes_conv1_x_then_conv2_x():
    small = dict(cfg=VGG16_CFG, hidden=8, num_classes=2)  # cheap fc layers: only the convs matter here
    convs = lambda t: [m for m in t.features if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    for freeze_at, frozen in ((0, 0), (1, 2), (2, 4)):
        trunk = VGGTrunk(VGG(**small), freeze_at=freeze_at)
        flags = [m.weight.requires_grad and m.bias.requires_grad for m in convs(trunk)]
        assert flags == [False] * frozen + [True] * (13 - frozen), freeze_at
    with pytest.raises(ValueError, match="freeze_at"):
        VGGTrunk(VGG(**small), freeze_at=3)
    with pytest.raises(ValueError, match="batch_norm"):
        VGGTrunk(VGG(**small, batch_norm=True))


def test_detector_loads_torchvision_weights(detector, tv_vgg16):
    trunk, box_head = detector.trunk, detector.roi_heads.box_head
    assert isinstance(trunk, VGGTrunk) and isinstance(box_head.conv5_head, VGGFcHead)
    assert torch.equal(trunk.features[0].weight, tv_vgg16.features[0].weight)
    assert torch.equal(box_head.conv5_head.classifier[0].weight, tv_vgg16.classifier[0].weight)  # fc6
    assert torch.equal(box_head.conv5_head.classifier[3].bias, tv_vgg16.classifier[3].bias)  # fc7
    assert detector.roi_heads.predictor.cls_score.in_features == 4096
    assert detector.roi_heads.pooler.output_size == 7


def test_training_step_trains_from_conv3_1_up(detector):
    detector.train()
    detector.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = detector([_image()], [_target()])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_cls"].detach().item() > 0
    sum(losses.values()).backward()
    fc6 = detector.roi_heads.box_head.conv5_head.classifier[0].weight
    conv1_1, conv3_1 = detector.trunk.features[0].weight, detector.trunk.features[10].weight
    assert fc6.grad is not None and fc6.grad.abs().sum() > 0
    assert conv3_1.grad is not None and conv3_1.grad.abs().sum() > 0
    assert conv1_1.grad is None and not conv1_1.requires_grad
    detector.zero_grad(set_to_none=True)


def test_eval_forward_returns_detections(detector):
    detector.eval()
    with torch.no_grad():
        out = detector([_image(), _image(64, 80, seed=1)])
    assert len(out) == 2
    for det, (h, w) in zip(out, ((96, 96), (64, 80))):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape[1:] == (4,) and det["scores"].shape == det["labels"].shape
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= w and float(det["boxes"][:, 3].max()) <= h


def test_vgg16_needs_a_7x7_pooler_and_a_vgg_file(tmp_path):
    with pytest.raises(ValueError, match=r"pooler_resolution=7.*got 5"):
        build_test_detector(3, backbone="vgg16", roi_heads={"pooler_resolution": 5})
    with pytest.raises(ValueError, match="backbone"):
        build_detector(dict(det_model_config(), backbone="vgg19"), input_cfg=det_input_config(), num_classes=3)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_vgg16_c4(weights_path=tmp_path / "missing.pth")
    from detres.models.backbones.resnet import build_resnet

    torch.save(build_resnet(18, base_width=8).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"r18\.pth.*not a VGG-16"):
        build_vgg16_c4(weights_path=tmp_path / "r18.pth")
    torch.save(
        {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.1.running_mean": torch.zeros(64)}, tmp_path / "bn.pth"
    )
    with pytest.raises(ValueError, match=r"bn\.pth.*batch normalisation"):
        build_vgg16_c4(weights_path=tmp_path / "bn.pth")


def test_global_context_works_with_vgg16():
    torch.manual_seed(0)
    model = build_test_detector(
        2,
        backbone="vgg16",
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"post_nms_top_n_test": 20},
        roi_heads={"pooler_resolution": 7, "global_context": True, "batch_size_per_image": 16},
    )
    assert model.roi_heads.predictor.cls_score.in_features == 2 * 4096
    losses = model([_image()], [_target()])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert set(model([_image()])[0]) == {"boxes", "scores", "labels"}


def _meta_checkpoint(path, arch: str, **args) -> None:
    """A train_cls-like checkpoint whose weights are never read (the architecture check comes first)."""
    save_checkpoint(
        path,
        {
            "model": {"w": torch.zeros(1)},
            "bn_recomputed": False,
            "model_args": {"arch": arch, "depth": 16 if arch == "vgg16" else 18, **args},
            "data_stats": {"channel_mean": torch.tensor([1.0, 2.0, 3.0]), "fixed_mean": None, "std": None},
        },
    )


def test_config_refuses_backbone_and_checkpoint_mismatches(tmp_path):
    _meta_checkpoint(tmp_path / "vgg.pt", "vgg16", batch_norm=False)
    _meta_checkpoint(tmp_path / "res.pt", "imagenet", base_width=64, stride_in_1x1=False)
    _meta_checkpoint(tmp_path / "vggbn.pt", "vgg16", batch_norm=True)
    _meta_checkpoint(tmp_path / "cifar.pt", "cifar")
    cases = (
        ("vgg.pt", "resnet", r"vgg\.pt.*'vgg16'.*model\.backbone='resnet'"),
        ("res.pt", "vgg16", r"res\.pt.*'imagenet'.*model\.backbone='vgg16'"),
        ("vggbn.pt", "vgg16", r"vggbn\.pt.*batch_norm"),
        ("cifar.pt", "vgg16", r"cifar\.pt.*'cifar'.*cannot be a detection backbone"),
    )
    for name, backbone, message in cases:
        cfg = load_config(
            None, [f"model.weights={tmp_path / name}", f"model.backbone={backbone}", "model.depth=18"], task="det"
        )
        with pytest.raises(ValueError, match=message):
            check_backbone_checkpoint(cfg.model.weights, cfg.model)
        with pytest.raises(ValueError, match=message):
            build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    # A matching vgg16 checkpoint passes; its channel mean is the detector's (std absent: none).
    cfg = load_config(None, [f"model.weights={tmp_path / 'vgg.pt'}", "model.backbone=vgg16"], task="det")
    check_backbone_checkpoint(cfg.model.weights, cfg.model)
    assert model_normalization(cfg.model) == ([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="model.backbone"):
        build_detector(
            load_config(None, ["model.backbone=vgg"], task="det").model, input_cfg=det_input_config(), num_classes=2
        )


def test_train_cls_vgg16_checkpoint_round_trips_through_config_and_load_detector(tmp_path):
    source = vgg16(num_classes=5)  # a train_cls model.arch=vgg16 checkpoint (bn_recomputed False: no BN)
    save_checkpoint(
        tmp_path / "cls.pt",
        {
            "model": source.state_dict(),
            "bn_recomputed": False,
            "model_args": {"arch": "vgg16", "depth": 16, "num_classes": 5, "dropout": 0.5, "batch_norm": False},
            "data_stats": {"channel_mean": torch.tensor([120.0, 110.0, 100.0]), "fixed_mean": None, "std": None},
        },
    )
    cfg = load_config(
        None,
        [f"model.weights={tmp_path / 'cls.pt'}", "model.backbone=vgg16", "model.roi_heads.pooler_resolution=7"],
        task="det",
    )
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2).eval()
    assert model.transform.pixel_mean.flatten().tolist() == [120.0, 110.0, 100.0]
    assert torch.equal(model.trunk.features[28].weight, source.features[28].weight)  # conv5_3
    assert torch.equal(model.roi_heads.box_head.conv5_head.classifier[0].weight, source.classifier[0].weight)
    del source
    save_checkpoint(tmp_path / "det.pt", detector_state(model, config=cfg, meta={"class_names": ["a", "b"]}))
    (tmp_path / "cls.pt").unlink()  # the rebuild reads the config tree and its own weights only
    rebuilt, meta = load_detector(tmp_path / "det.pt")
    assert isinstance(rebuilt.trunk, VGGTrunk) and meta["class_names"] == ["a", "b"]
    images = [_image(), _image(64, 80, seed=1)]
    with torch.no_grad():
        for a, b in zip(model(images), rebuilt(images)):
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(a[key], b[key])


def test_checkpoint_without_backbone_key_loads_as_resnet(tmp_path):
    from detres.models.backbones.resnet_c4 import ResNetC4Trunk

    cfg = load_config(None, ["model.depth=18", "model.base_width=8"], task="det")
    assert cfg.model.backbone == "resnet"
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2)
    tree = cfg.to_dict()
    del tree["model"]["backbone"]  # a config tree written before the option existed
    save_checkpoint(tmp_path / "old.pt", detector_state(model, config=tree, meta={"class_names": ["a", "b"]}))
    assert isinstance(load_detector(tmp_path / "old.pt")[0].trunk, ResNetC4Trunk)
