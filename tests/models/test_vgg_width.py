"""Tests for the narrower VGG-16 (width, hidden): counts, config keys, checkpoint -> detector, mismatch errors."""

from __future__ import annotations

import pytest
import torch

from detres.config.load import load_config
from detres.models.backbones.vgg import vgg16
from detres.models.backbones.vgg16_split import build_vgg16_c4
from detres.models.build import (
    build_classifier,
    build_detector,
    classifier_kwargs_from_config,
)
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import det_input_config

# Width 16 (a quarter of 64), hidden 1024, 10 classes. Convs: 16,16 | 32,32 | 64,64,64 | 128,128,128 | 128,128,128.
# Conv weights 9 x (3*16 + 16*16 + 16*32 + 32*32 + 32*64 + 2*64*64 + 64*128 + 2*128*128 + 3*128*128)
# = 9 x 102,192 = 919,728, biases 2*16 + 2*32 + 3*64 + 6*128 = 1,056 -> 920,784.
# fc6 (128*7*7 = 6,272) x 1,024 + 1,024 = 6,423,552; fc7 1,024 x 1,024 + 1,024 = 1,049,600; fc8 1,024 x 10 + 10
# = 10,250. Total 920,784 + 6,423,552 + 1,049,600 + 10,250 = 8,404,186.
WIDTH16_PARAMS = 8_404_186
WIDTH16_CONVS = [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_width_16_vgg16_parameter_count_and_channels():
    model = vgg16(num_classes=10, width=16, hidden=1024)
    assert _count(model) == WIDTH16_PARAMS
    assert [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)] == WIDTH16_CONVS
    assert model.classifier[0].in_features == 128 * 7 * 7 and model.classifier[3].out_features == 1024
    assert tuple(model.eval()(torch.zeros(2, 3, 56, 56)).shape) == (2, 10)


def test_width_and_hidden_must_be_positive_integers():
    for bad in ({"width": 0}, {"hidden": 0}, {"width": 1.5}, {"hidden": True}):
        with pytest.raises(ValueError, match="positive integer"):
            vgg16(num_classes=2, **bad)


def test_config_keys_reach_the_classifier_and_defaults_record_nothing():
    cfg = load_config(None, ["model.arch=vgg16", "model.vgg_width=16", "model.vgg_hidden=1024"], task="cls")
    args = classifier_kwargs_from_config(cfg.model, num_classes=10)
    assert (args["width"], args["hidden"]) == (16, 1024)
    assert _count(build_classifier(**args)) == WIDTH16_PARAMS
    default = classifier_kwargs_from_config(load_config(None, ["model.arch=vgg16"], task="cls").model, num_classes=10)
    assert "width" not in default and "hidden" not in default


def _cls_checkpoint(path, *, width: int = 16, hidden: int = 64) -> torch.nn.Module:
    """A train_cls model.arch=vgg16 checkpoint of a narrow VGG-16 (what tools/train_cls.py writes)."""
    source = vgg16(num_classes=5, width=width, hidden=hidden)
    save_checkpoint(
        path,
        {
            "model": source.state_dict(),
            "bn_recomputed": False,
            "model_args": {
                "arch": "vgg16",
                "depth": 16,
                "num_classes": 5,
                "dropout": 0.5,
                "batch_norm": False,
                "width": width,
                "hidden": hidden,
            },
            "data_stats": {"channel_mean": torch.tensor([120.0, 110.0, 100.0]), "fixed_mean": None, "std": None},
        },
    )
    return source


def _det_config(weights, *extra: str):
    return load_config(
        None,
        [f"model.weights={weights}", "model.backbone=vgg16", "model.roi_heads.pooler_resolution=7", *extra],
        task="det",
    )


def test_width_16_checkpoint_builds_a_detector_with_its_weights(tmp_path):
    source = _cls_checkpoint(tmp_path / "cls.pt")
    cfg = _det_config(tmp_path / "cls.pt", "model.vgg_width=16", "model.vgg_hidden=64")
    assert (cfg.model.vgg_width, cfg.model.vgg_hidden) == (16, 64)
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2).eval()
    assert model.trunk.out_channels == 128 and model.roi_heads.predictor.cls_score.in_features == 64
    assert torch.equal(model.trunk.features[28].weight, source.features[28].weight)  # conv5_3
    assert torch.equal(model.roi_heads.box_head.conv5_head.classifier[3].weight, source.classifier[3].weight)  # fc7
    with torch.no_grad():
        out = model([torch.rand(3, 96, 112) * 255.0])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_size_mismatch_errors_name_the_file_and_both_values(tmp_path):
    _cls_checkpoint(tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"narrow\.pt.*width=16.*model\.vgg_width=64"):
        build_detector(_det_config(tmp_path / "narrow.pt").model, input_cfg=det_input_config(), num_classes=2)
    with pytest.raises(ValueError, match=r"narrow\.pt.*hidden=64.*model\.vgg_hidden=128"):
        build_detector(
            _det_config(tmp_path / "narrow.pt", "model.vgg_width=16", "model.vgg_hidden=128").model,
            input_cfg=det_input_config(),
            num_classes=2,
        )
    with pytest.raises(ValueError, match=r"narrow\.pt.*width=16.*asks for width=32"):
        build_vgg16_c4(weights_path=tmp_path / "narrow.pt", width=32, hidden=64)
    with pytest.raises(ValueError, match=r"narrow\.pt.*hidden=64.*asks for hidden=4096"):
        build_vgg16_c4(weights_path=tmp_path / "narrow.pt", width=16)


def test_narrow_fc_layers_keep_the_full_size_gain_at_init():
    torch.manual_seed(0)
    narrow, full = vgg16(num_classes=10, width=16, hidden=1024), vgg16(num_classes=10, width=64, hidden=64)
    # fan-ins a quarter of VGG-16's (6,272 vs 25,088; 1,024 vs 4,096): std 0.01 * sqrt(4) = 0.02
    for i in (0, 3, 6):
        assert abs(float(narrow.classifier[i].weight.detach().std()) - 0.02) < 0.001
    assert abs(float(full.classifier[0].weight.detach().std()) - 0.01) < 0.0005  # full-size fc6: torchvision's


def test_shapes_vgg16_configs_match_each_other_and_the_resnet18_cost():
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    def count_multiply_adds(model: torch.nn.Module, size: tuple[int, ...]) -> int:
        """Multiply-adds of the convs and matmuls of one eval forward (torch counts 2 FLOPs per multiply-add)."""
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.zeros(size))
        return counter.get_total_flops() // 2

    root = Path(__file__).resolve().parents[2]
    cls_cfg, det_cfg = (load_config(root / f"configs/{task}/shapes_vgg16.yaml") for task in ("cls", "det"))
    r18_cfg = load_config(root / "configs/cls/shapes_r18.yaml")
    args = classifier_kwargs_from_config(cls_cfg.model, num_classes=10)
    assert (args["width"], args["hidden"]) == (det_cfg.model.vgg_width, det_cfg.model.vgg_hidden) == (12, 768)
    assert not cls_cfg.bn_recompute.enabled and det_cfg.model.freeze_at == 2
    assert det_cfg.model.roi_heads.pooler_resolution == 7
    crop = (1, 3, cls_cfg.augment.crop, cls_cfg.augment.crop)
    vgg = count_multiply_adds(build_classifier(**args), crop)
    r18 = count_multiply_adds(build_classifier(**classifier_kwargs_from_config(r18_cfg.model, num_classes=10)), crop)
    assert (vgg, r18) == (37_947_648, 34_115_584)  # the numbers quoted in configs/cls/shapes_vgg16.yaml
