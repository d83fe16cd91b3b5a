"""Tests for detres/models/backbones/vgg.py: torchvision parity (parameters, keys, outputs), small inputs, dense
form."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detres.models.backbones.vgg import VGG_MIN_INPUT, vgg16


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def pair():
    """Our VGG-16 with the weights of torchvision's, both in eval mode."""
    torch.manual_seed(0)
    theirs = torchvision.models.vgg16(weights=None).eval()
    ours = vgg16().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # key for key, shape for shape
    return ours, theirs


def test_parameter_count_and_keys_equal_torchvision(pair):
    ours, theirs = pair
    # 13 convs: 3*3*(3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 2*256*256 + 256*512 + 5*512*512) weights
    # = 14,710,464 + 4,224 biases = 14,714,688; fc6 25088*4096 + 4096 = 102,764,544; fc7 16,781,312;
    # fc8 4,097,000  ->  138,357,544
    assert _count(ours) == _count(theirs) == 138_357_544
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in ours.modules()) == 13
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in ours.modules()) == 5
    assert [m.p for m in ours.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


def test_batch_norm_variant_is_torchvision_vgg16_bn():
    ours, theirs = vgg16(batch_norm=True, num_classes=10), torchvision.models.vgg16_bn(weights=None, num_classes=10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg16(num_classes=10).modules())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("size", [224, 64, VGG_MIN_INPUT])
def test_same_outputs_as_torchvision(pair, size):
    ours, theirs = pair
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, theirs(x), rtol=1e-4, atol=1e-6)
    assert out.shape == (2, 1000)


def test_too_small_input_names_the_minimum(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="at least 32x32"):
        ours(torch.randn(1, 3, 31, 40))
    with pytest.raises(RuntimeError):  # the minimum is tight: a 31-px side vanishes in the fifth pool
        ours.avgpool(ours.features(torch.randn(1, 3, 31, 40)))


def test_dense_form_equals_the_net_at_the_training_size_and_slides_beyond(pair):
    ours, _ = pair
    torch.manual_seed(1)
    with torch.no_grad():
        for size in (224, 96):  # 7x7 conv5 map: fc6 as a 7x7 conv; 3x3 map: pooled up to 7x7 as in forward
            x = torch.randn(1, 3, size, size)
            f = ours.forward_features(x)
            assert f.shape == (1, 4096, 1, 1)
            torch.testing.assert_close(ours.fc(f[:, :, 0, 0]), ours(x), rtol=1e-4, atol=1e-5)
        x = torch.randn(1, 3, 256, 288)  # 8x9 conv5 map -> 2x3 windows of 7x7, each one 224-px view
        f = ours.forward_features(x)
        assert f.shape == (1, 4096, 2, 3)
        # the bottom-right window = the flattening head on the conv5 cells [1:8, 2:9]
        expected = ours.classifier(torch.flatten(ours.features(x)[:, :, 1:8, 2:9], 1))
        torch.testing.assert_close(ours.fc(f[:, :, 1, 2]), expected, rtol=1e-4, atol=1e-5)
    assert ours.fc is ours.classifier[6]
