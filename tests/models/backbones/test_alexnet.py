"""Tests for detres/models/backbones/alexnet.py: the paper's LRN formula, parameter counts, geometry, grouping, init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from detres.models.backbones.alexnet import ALEXNET_MIN_INPUT, TORCHVISION_CHANNELS, AlexNet, alexnet, paper_lrn


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lrn_is_the_papers_formula():
    """Sec. 3.3: b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta,
    k=2, n=5, alpha=1e-4, beta=0.75, computed by hand in numpy."""
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 30.0, size=(2, 7, 3, 4))  # large activations so the denominator matters
    N = a.shape[1]
    b = np.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - 5 // 2), min(N - 1, i + 5 // 2)
        b[:, i] = a[:, i] / (2.0 + 1e-4 * (a[:, lo : hi + 1] ** 2).sum(axis=1)) ** 0.75
    lrn = paper_lrn()
    assert (lrn.size, lrn.k, lrn.beta) == (5, 2.0, 0.75) and lrn.alpha == pytest.approx(5e-4)  # n * 1e-4
    out = lrn(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(out, b, rtol=1e-10)
    assert np.abs(b - a / 2.0**0.75).max() > 1e-2  # the neighbourhood sum is not negligible here


def test_parameter_counts():
    # single-GPU form (groups=1):
    #   conv1 11*11*3*96 + 96 = 34,944        conv2 5*5*96*256 + 256 = 614,656
    #   conv3 3*3*256*384 + 384 = 885,120     conv4 3*3*384*384 + 384 = 1,327,488
    #   conv5 3*3*384*256 + 256 = 884,992     (convs: 3,747,200)
    #   fc6 6*6*256*4096 + 4096 = 37,752,832  fc7 4096*4096 + 4096 = 16,781,312   fc8 4096*1000 + 1000 = 4,097,000
    #   total 62,378,344
    assert _count(alexnet()) == 62_378_344
    # the paper's two-GPU connectivity (groups=2): conv2, conv4, conv5 see half their inputs
    #   conv2 5*5*48*256 + 256 = 307,456   conv4 3*3*192*384 + 384 = 663,936   conv5 3*3*192*256 + 256 = 442,624
    #   62,378,344 - (614,656 - 307,456) - (1,327,488 - 663,936) - (884,992 - 442,624) = 60,965,224
    #   = the paper's "60 million parameters" (Sec. 4)
    assert _count(alexnet(groups=2)) == 60_965_224
    # torchvision's variant: 64/192/384/256/256 channels, no LRN -> 61,100,840, as torchvision.models.alexnet
    tv_like = AlexNet(channels=TORCHVISION_CHANNELS, lrn=False)
    assert _count(tv_like) == _count(torchvision.models.alexnet(weights=None)) == 61_100_840
    assert not any(isinstance(m, torch.nn.LocalResponseNorm) for m in tv_like.modules())
    assert _count(alexnet(num_classes=10)) == 62_378_344 - 4_097_000 + 4096 * 10 + 10


def test_layers_follow_the_paper():
    net = alexnet()
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == [
        "Conv2d",
        "ReLU",
        "LocalResponseNorm",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "LocalResponseNorm",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
    ]
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (96, 11, 4),
        (256, 5, 1),
        (384, 3, 1),
        (384, 3, 1),
        (256, 3, 1),
    ]
    assert all((p.kernel_size, p.stride) == (3, 2) for p in net.features if isinstance(p, torch.nn.MaxPool2d))
    assert [m.p for m in net.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    grouped = [c.groups for c in (m for m in alexnet(groups=2).features if isinstance(m, torch.nn.Conv2d))]
    assert grouped == [1, 2, 1, 2, 2]  # conv3 (and the fc layers) connect to both GPUs' kernel maps
    conv2 = alexnet(groups=2).features[4]
    assert conv2.weight.shape == (256, 48, 5, 5)  # each GPU's 128 kernels see that GPU's 48 conv1 maps
    x = torch.randn(1, 96, 13, 13)
    y = x.clone()
    y[:, 48:] = 0.0  # the second GPU's conv1 maps do not reach the first GPU's conv2 kernels
    with torch.no_grad():
        torch.testing.assert_close(conv2(x)[:, :128], conv2(y)[:, :128])


def test_paper_init():
    """Sec. 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden fc layers, 0 elsewhere."""
    torch.manual_seed(0)
    net = alexnet()
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [float(m.bias.detach().unique()) for m in layers] == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    fc6 = layers[5].weight.detach()
    assert abs(float(fc6.std()) - 0.01) < 1e-4 and abs(float(fc6.mean())) < 1e-4


@pytest.mark.parametrize("groups", [1, 2])
def test_shapes_at_224_and_227(groups):
    net = alexnet(groups=groups).eval()
    conv1 = net.features[0]
    with torch.no_grad():
        for size, conv1_side in ((224, 55), (227, 56)):  # the paper: 224 input -> 55x55x96
            x = torch.randn(2, 3, size, size)
            assert conv1(x).shape == (2, 96, conv1_side, conv1_side)
            assert net.features(x).shape == (2, 256, 6, 6)  # the 6x6x256 map fc6 sees, no resampling
            assert net(x).shape == (2, 1000)
            f = net.forward_features(x)
            assert f.shape == (2, 4096, 1, 1)
            torch.testing.assert_close(net.fc(f[:, :, 0, 0]), net(x))


def test_minimum_input_size_is_named_and_tight():
    net = alexnet(num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, ALEXNET_MIN_INPUT, ALEXNET_MIN_INPUT)).shape == (1, 10)
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10)
        with pytest.raises(ValueError, match="AlexNet needs inputs of at least 63x63 pixels, got 62x64"):
            net(torch.randn(1, 3, 62, 64))
        with pytest.raises(ValueError, match="at least 63x63"):
            net.forward_features(torch.randn(1, 3, 32, 32))
        with pytest.raises(RuntimeError):  # without the check, torch fails in the last pool
            net.features(torch.randn(1, 3, 62, 64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        AlexNet(groups=3)
    with pytest.raises(ValueError, match="dropout"):
        AlexNet(dropout=1.0)
