"""Tests for detres.models.backbones.frozen_bn: FrozenBatchNorm2d, conversion, and precise BN statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detres.models.backbones.frozen_bn import FrozenBatchNorm2d, convert_frozen_batchnorm, recompute_bn_statistics
from detres.models.backbones.resnet import resnet18

torch.set_num_threads(1)


def _random_bn(channels: int = 5, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return bn


def test_frozen_bn_matches_batchnorm_eval_and_never_changes():
    bn = _random_bn().eval()
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    assert frozen.eps == bn.eps and frozen.num_features == 5
    assert list(frozen.parameters()) == []
    x = torch.randn(4, 5, 6, 7) * 3 + 1
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    out_train = frozen(x)
    torch.testing.assert_close(out_train, bn(x), rtol=1e-5, atol=1e-5)  # still the frozen statistics
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())


def test_frozen_bn_passes_no_gradient_to_its_state():
    bn = _random_bn()
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    frozen(x).sum().backward()
    # y = (x - mean) * weight / sqrt(var + eps) + bias, so d sum(y) / dx = weight / sqrt(var + eps) per channel
    # (the batch statistics play no part: train-mode BN would give a different gradient).
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    torch.testing.assert_close(x.grad, scale.view(1, 5, 1, 1).expand(2, 5, 3, 3), rtol=1e-6, atol=1e-7)
    assert all(not b.requires_grad and b.grad is None for b in frozen.buffers())


def test_frozen_bn_loads_batchnorm_state_dict():
    bn = _random_bn()
    bn.num_batches_tracked.fill_(7)
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    assert set(frozen.state_dict()) == set(bn.state_dict()) - {"num_batches_tracked"}
    frozen.load_state_dict(bn.state_dict())  # strict; num_batches_tracked dropped
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(frozen.state_dict()[key], bn.state_dict()[key])
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm2d(0)


def test_convert_frozen_batchnorm_on_resnet():
    torch.manual_seed(0)
    net = resnet18(num_classes=4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    converted = convert_frozen_batchnorm(net)
    assert converted is net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == n_bn == 20
    assert isinstance(net.layer2[0].downsample[1], FrozenBatchNorm2d)
    net.train()  # frozen layers ignore the mode
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-5)
    bn = nn.BatchNorm2d(3)
    assert isinstance(convert_frozen_batchnorm(bn), FrozenBatchNorm2d)


def _toy_batches(sizes=(5, 11, 3, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero mean and per-batch drift, so batch-size weighting matters.
    return [torch.randn(n, 2, 6, 5, generator=g) * (1 + i) + 2.0 * i for i, n in enumerate(sizes)]


def test_recompute_bn_statistics_equals_true_dataset_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    bn = nn.BatchNorm2d(3)
    net = nn.Sequential(conv, bn).eval()
    batches = _toy_batches()
    recompute_bn_statistics(net, batches)

    with torch.no_grad():
        z = F.conv2d(torch.cat(batches), conv.weight, conv.bias, padding=1)  # BN input, by hand
    flat = z.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bn.running_mean, flat.mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, flat.var(dim=1, unbiased=True), rtol=1e-5, atol=1e-5)
    assert not net.training and not bn.training
    assert bn.num_batches_tracked.item() == 0

    # The plain average of per-batch statistics (what momentum-free running stats would give)
    # is far from the truth for these uneven batches, so the check above discriminates.
    with torch.no_grad():
        per_batch = [F.conv2d(b, conv.weight, conv.bias, padding=1) for b in batches]
    naive_mean = torch.stack([p.mean(dim=(0, 2, 3)) for p in per_batch]).mean(0)
    assert (naive_mean - flat.mean(dim=1)).abs().max() > 0.01  # >> the 1e-5 tolerance above


def test_recompute_single_batch_matches_torch_batchnorm_running_var():
    # Independent reference: BN in train mode with momentum 1 stores that batch's (unbiased) stats.
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5, 5) * 2 + 3
    ours = nn.BatchNorm2d(4)
    recompute_bn_statistics(ours, [x])
    ref = nn.BatchNorm2d(4, momentum=1.0).train()
    ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_recompute_uses_batch_statistics_upstream_and_restores_modes():
    torch.manual_seed(2)
    conv1, bn1, conv2, bn2 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    drop = nn.Dropout(p=0.5)
    net = nn.Sequential(conv1, bn1, nn.ReLU(), drop, conv2, bn2)
    net.train()
    bn2.eval()  # a mixed state that must come back unchanged
    with torch.no_grad():
        bn1.running_mean.fill_(100.0)  # must not be used: bn1 normalises with batch statistics
    batches = _toy_batches(sizes=(4, 7, 2))
    recompute_bn_statistics(net, batches)

    # By hand: bn1 in train mode uses each batch's own (biased) statistics; dropout is off.
    with torch.no_grad():
        z2 = []
        for b in batches:
            z1 = conv1(b)
            h = F.relu(F.batch_norm(z1, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps))
            z2.append(conv2(h))
        flat = torch.cat(z2).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(bn2.running_mean, flat.mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn2.running_var, flat.var(dim=1), rtol=1e-5, atol=1e-5)
    assert net.training and bn1.training and drop.training and not bn2.training


def test_recompute_num_batches_and_tuple_batches():
    torch.manual_seed(3)
    batches = _toy_batches(sizes=(3, 4, 5))
    net_a, net_b = nn.Sequential(nn.BatchNorm2d(2)), nn.Sequential(nn.BatchNorm2d(2))
    recompute_bn_statistics(net_a, ((b, torch.zeros(len(b))) for b in batches), num_batches=2)
    recompute_bn_statistics(net_b, batches[:2])
    assert torch.equal(net_a[0].running_mean, net_b[0].running_mean)
    assert torch.equal(net_a[0].running_var, net_b[0].running_var)
    flat = torch.cat(batches[:2]).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(net_a[0].running_var, flat.var(dim=1), rtol=1e-5, atol=1e-6)
    # A cap larger than the data uses all of it.
    net_c = nn.Sequential(nn.BatchNorm2d(2))
    recompute_bn_statistics(net_c, batches, num_batches=10)
    everything = torch.cat(batches).transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(net_c[0].running_mean, everything.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_recompute_bad_input():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_bn_statistics(nn.Sequential(nn.Conv2d(1, 1, 1)), [torch.randn(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_bn_statistics(nn.BatchNorm2d(2), [])
    with pytest.raises(TypeError, match="expected a Tensor"):
        recompute_bn_statistics(nn.BatchNorm2d(2), [[1.0, 2.0]])
    unused = nn.ModuleDict({"used": nn.BatchNorm2d(2), "spare": nn.BatchNorm2d(2)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match="'spare' was never run"):
        recompute_bn_statistics(unused, [torch.randn(2, 2, 3, 3)])


def test_recompute_failure_leaves_statistics_untouched():
    bn = _random_bn(channels=2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match="batch 1"):  # fails after one train-mode forward
        recompute_bn_statistics(bn, [torch.randn(4, 2, 3, 3) + 5.0, "not a tensor"])
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
