"""conv -> frozen BN folded on the fly: same values and gradients as the two layers, other norms untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detres.models.backbones.conv_norm import apply_conv_norm, apply_shortcut, conv_forward, fold_norm_into_conv
from detres.models.backbones.cpu_execution import cpu_pointwise_onednn, routes_pointwise_to_onednn
from detres.models.backbones.frozen_bn import FrozenBatchNorm2d
from detres.models.backbones.resnet_blocks import Bottleneck, ZeroPadShortcut


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


def test_fold_norm_into_conv_known_answer_with_a_conv_bias_and_no_affine():
    eps = 1e-5
    weight, bias = fold_norm_into_conv(
        torch.full((1, 1, 1, 1), 2.0),
        torch.tensor([1.0]),
        running_mean=torch.tensor([0.5]),
        running_var=torch.tensor([4.0 - eps]),  # sqrt(var + eps) = 2
        eps=eps,
        norm_weight=None,
        norm_bias=None,
    )
    # (2x + 1 - 0.5) / 2 = x + 0.25
    torch.testing.assert_close(weight, torch.full((1, 1, 1, 1), 1.0))
    torch.testing.assert_close(bias, torch.tensor([0.25]))


def test_other_norms_and_biased_convs_run_unchanged():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5).train()
    out = apply_conv_norm(conv, bn, x)
    assert torch.equal(out, nn.BatchNorm2d(5).train()(conv(x)))  # batch statistics, as the module computes them
    assert bn.num_batches_tracked.item() == 1  # and its running statistics were updated
    biased, frozen = nn.Conv2d(3, 5, 3, padding=1, bias=True), _frozen(5)
    assert torch.equal(apply_conv_norm(biased, frozen, x), frozen(biased(x)))
    assert torch.equal(apply_conv_norm(conv, nn.Identity(), x), conv(x))


def _kernels_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_pointwise_convs_go_through_onednn_with_the_same_values_and_gradients(one_thread):
    """A 1x1 stride-1 conv on one image at 1 thread: ATen's default is its GEMM path; conv_forward takes oneDNN."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(32, 16, 1, bias=False), _frozen(16)
    x = torch.randn(1, 32, 24, 30).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert "aten::_slow_conv2d_forward" in _kernels_run(lambda: conv(x))  # the route this replaces
    kernels = _kernels_run(lambda: apply_conv_norm(conv, norm, x).square().sum().backward())
    assert "aten::mkldnn_convolution" in kernels and "aten::_slow_conv2d_forward" not in kernels
    assert "aten::_slow_conv2d_backward" not in " ".join(kernels)
    # float64 reference, layer by layer: sums over 720 pixels differ in float32 rounding between the two routes
    conv64, norm64 = copy.deepcopy(conv).double(), copy.deepcopy(norm).double()
    x64 = x.detach().double().requires_grad_(True)
    reference = norm64(conv64(x64))
    reference.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(apply_conv_norm(conv, norm, x).double(), reference, rtol=1e-5, atol=1e-5)
    for grad, ref in ((x.grad, x64.grad), (conv.weight.grad, conv64.weight.grad)):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # folded (inference) convs carry a bias and an Identity norm: same route, same values
    biased = nn.Conv2d(32, 16, 1, bias=True)
    with torch.no_grad():
        torch.testing.assert_close(apply_conv_norm(biased, nn.Identity(), x), biased(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv, dtype",
    [
        (nn.Conv2d(8, 4, 1, stride=2, bias=False), torch.float32),  # strided: oneDNN already
        (nn.Conv2d(8, 4, 3, padding=1, bias=False), torch.float32),
        (nn.Conv2d(8, 4, 1, padding=1, bias=False), torch.float32),  # padded: dilation would change the output size
        (nn.Conv2d(8, 4, 1, groups=2, bias=False), torch.float32),
        (nn.Conv2d(8, 4, 1, bias=False), torch.float64),  # oneDNN has no float64 convs
    ],
)
def test_other_convs_keep_their_own_route(conv, dtype, one_thread):
    conv = conv.to(dtype)
    x = torch.randn(1, 8, 60, 60, dtype=dtype)
    assert not routes_pointwise_to_onednn(conv, x)
    assert torch.equal(conv_forward(conv, x, conv.weight, conv.bias), conv(x))


def test_the_route_can_be_switched_back(one_thread):
    conv, norm = nn.Conv2d(32, 16, 1, bias=False), _frozen(16)
    x = torch.randn(1, 32, 24, 30)
    with cpu_pointwise_onednn(False):
        assert not routes_pointwise_to_onednn(conv, x)
        kernels = _kernels_run(lambda: apply_conv_norm(conv, norm, x))
        assert "aten::_slow_conv2d_forward" in kernels and "aten::mkldnn_convolution" not in kernels
        with cpu_pointwise_onednn(True):  # nested blocks: the innermost choice holds
            assert "aten::mkldnn_convolution" in _kernels_run(lambda: apply_conv_norm(conv, norm, x))
    # the block's end restores the default route
    assert routes_pointwise_to_onednn(conv, x)
    assert "aten::mkldnn_convolution" in _kernels_run(lambda: apply_conv_norm(conv, norm, x))


def test_only_the_gemm_bound_cases_are_rerouted(one_thread):
    """Small single-image maps would go to ATen's slow dilated kernel; 16+ images or several threads are oneDNN's
    already (and stay bit for bit as they were)."""
    conv = nn.Conv2d(32, 16, 1, bias=False)
    assert not routes_pointwise_to_onednn(conv, torch.randn(1, 32, 20, 32))  # 20480 values
    assert routes_pointwise_to_onednn(conv, torch.randn(1, 32, 21, 32))
    assert routes_pointwise_to_onednn(conv, torch.randn(2, 32, 2, 2))  # several images: oneDNN at any size
    assert not routes_pointwise_to_onednn(conv, torch.randn(16, 32, 2, 2))
    torch.set_num_threads(2)
    assert not routes_pointwise_to_onednn(conv, torch.randn(1, 32, 21, 32))


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
    """FLOP counters and feature probes hook the conv modules: the fold must not bypass any of them."""
    block = Bottleneck(16, 4, norm_layer=_frozen).eval()
    seen = {}
    convs = {"conv1": block.conv1, "conv2": block.conv2, "conv3": block.conv3}
    handles = [
        conv.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o.shape))
        for name, conv in convs.items()
    ]
    block(torch.randn(1, 16, 6, 6))
    for handle in handles:
        handle.remove()
    assert seen == {
        "conv1": [torch.Size([1, 4, 6, 6])],
        "conv2": [torch.Size([1, 4, 6, 6])],
        "conv3": [torch.Size([1, 16, 6, 6])],
    }
