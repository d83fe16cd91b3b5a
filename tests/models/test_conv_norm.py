"""conv -> frozen BN folded on the fly: same values and gradients as the two layers, other norms untouched."""
from __future__ import annotations

import torch
from torch import nn

from detres.models.conv_norm import apply_conv_norm, apply_shortcut
from detres.models.frozen_bn import FrozenBatchNorm2d
from detres.models.resnet_blocks import Bottleneck, ZeroPadShortcut


def _frozen(channels: int) -> FrozenBatchNorm2d:
    norm = FrozenBatchNorm2d(channels)
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.2, 3.0)
    return norm


def test_frozen_bn_folds_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), _frozen(8)
    x = torch.randn(2, 6, 11, 9, requires_grad=True)
    fused = apply_conv_norm(conv, norm, x)
    fused.square().sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone())
    x.grad, conv.weight.grad = None, None
    reference = norm(conv(x))
    reference.square().sum().backward()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], conv.weight.grad, rtol=1e-4, atol=1e-4)
    # the fold records no BN node of its own: the graph is conv (+ the weight scaling), nothing on the activations
    assert "Mul" not in type(fused.grad_fn).__name__ and "Add" not in type(fused.grad_fn).__name__


def test_other_norms_and_biased_convs_run_unchanged():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    conv, bn = nn.Conv2d(3, 5, 1, bias=False), nn.BatchNorm2d(5).train()
    out = apply_conv_norm(conv, bn, x)
    assert torch.equal(out, nn.BatchNorm2d(5).train()(conv(x)))  # batch statistics, as the module computes them
    assert bn.num_batches_tracked.item() == 1  # and its running statistics were updated
    biased, frozen = nn.Conv2d(3, 5, 1, bias=True), _frozen(5)
    assert torch.equal(apply_conv_norm(biased, frozen, x), frozen(biased(x)))
    assert torch.equal(apply_conv_norm(conv, nn.Identity(), x), conv(x))


def test_shortcut_kinds():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    assert apply_shortcut(None, x) is x
    projection = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), _frozen(8))
    torch.testing.assert_close(apply_shortcut(projection, x), projection(x), rtol=1e-5, atol=1e-5)
    pad = ZeroPadShortcut(in_channels=4, out_channels=8, stride=2)
    assert torch.equal(apply_shortcut(pad, x), pad(x))


def test_bottleneck_with_frozen_bn_matches_the_layer_by_layer_computation():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), _frozen(32))
    block = Bottleneck(16, 8, stride=2, downsample=down, norm_layer=_frozen).eval()
    x = torch.randn(2, 16, 10, 10)
    expected = block.relu(block.bn1(block.conv1(x)))
    expected = block.relu(block.bn2(block.conv2(expected)))
    expected = block.relu(block.bn3(block.conv3(expected)) + down[1](down[0](x)))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_a_hooked_conv_still_runs_its_hooks():
    """FLOP counters (detres.models.complexity) and feature probes hook the conv module: the fold must not bypass it."""
    from detres.models.complexity import count_multiply_adds

    block = Bottleneck(16, 4, norm_layer=_frozen).eval()
    seen = []
    handle = block.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    block(torch.randn(1, 16, 6, 6))
    handle.remove()
    assert seen == [torch.Size([1, 4, 6, 6])]
    assert count_multiply_adds(block, (1, 16, 6, 6)) == 36 * (16 * 4 + 4 * 4 * 9 + 4 * 16)
