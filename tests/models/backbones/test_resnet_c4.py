"""Tests for the ResNet-C4 trunk / conv5 head split, BN freezing and stage freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detres.models.backbones.frozen_bn import FrozenBatchNorm2d
from detres.models.backbones.resnet import build_resnet
from detres.models.backbones.resnet_c4 import ResNetC4Trunk, ResNetC5Head, build_resnet_c4


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics and affine parameters, as a trained checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("depth,c4,c5", [(18, 256, 512), (50, 1024, 2048)])
def test_trunk_stride_16_and_head_output_dims(depth: int, c4: int, c5: int) -> None:
    torch.manual_seed(0)
    resnet = build_resnet(depth)
    trunk, head = ResNetC4Trunk(resnet), ResNetC5Head(resnet)
    assert trunk.out_channels == c4 and head.out_channels == c5
    with torch.no_grad():
        feats = trunk(torch.randn(1, 3, 64, 96))
        assert feats.shape == (1, c4, 64 // 16, 96 // 16)
        rois = torch.randn(2, c4, 14, 14)
        assert head.forward_map(rois).shape == (2, c5, 7, 7)  # conv5_1 has stride 2
        assert head(rois).shape == (2, c5)


def test_trunk_and_head_reproduce_the_eval_mode_classifier() -> None:
    """Frozen BN must use the checkpoint statistics: in train mode the split net equals the eval-mode original."""
    torch.manual_seed(0)
    resnet = build_resnet(18)
    _randomise_bn(resnet)
    reference = copy.deepcopy(resnet).eval()
    trunk, head = ResNetC4Trunk(resnet, freeze_at=0), ResNetC5Head(resnet)
    trunk.train()
    head.train()
    for part in (trunk, head):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in part.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = reference.stage_outputs(x)
        c4 = trunk(x)
        torch.testing.assert_close(c4, ref["conv4"], rtol=1e-4, atol=1e-4)
        pooled = ref["conv5"].mean(dim=(2, 3))
        torch.testing.assert_close(head(c4), pooled, rtol=1e-4, atol=1e-4)


def test_cpu_trunk_runs_channels_last_and_hands_training_a_contiguous_map() -> None:
    """Channels-last inside on CPU (a speed choice), the same values as the eval-mode classifier in NCHW; the C4
    map stays channels-last for inference and is contiguous when autograd records (the RPN / roi_pool prefer it)."""
    torch.manual_seed(0)
    resnet = build_resnet(50)
    _randomise_bn(resnet)
    reference = copy.deepcopy(resnet).double().eval()  # float64: the float32 routes differ in rounding only
    trunk = ResNetC4Trunk(resnet, freeze_at=0).train()
    x = torch.randn(1, 3, 96, 128)
    seen = []
    hook = trunk.layer2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        ref = reference.stage_outputs(x.double())["conv4"]
        inference = trunk(x)
    training = trunk(x)
    hook.remove()
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in seen)
    assert inference.is_contiguous(memory_format=torch.channels_last) and not inference.is_contiguous()
    assert training.is_contiguous() and training.requires_grad
    for out in (inference, training):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "freeze_at,frozen_prefixes",
    [(0, ()), (1, ("conv1.",)), (2, ("conv1.", "layer1."))],
)
def test_freeze_at_sets_requires_grad(freeze_at: int, frozen_prefixes: tuple[str, ...]) -> None:
    trunk = ResNetC4Trunk(build_resnet(18), freeze_at=freeze_at)
    for name, p in trunk.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name


def test_frozen_parts_do_not_change_after_an_optimizer_step() -> None:
    torch.manual_seed(0)
    resnet = build_resnet(18)
    _randomise_bn(resnet)
    trunk, head = ResNetC4Trunk(resnet, freeze_at=2), ResNetC5Head(resnet)
    model = nn.ModuleDict({"trunk": trunk, "head": head}).train()
    before_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before_buffers = {k: v.clone() for k, v in model.named_buffers()}
    # All parameters go to the optimizer, as a careless training loop would do.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        feats = trunk(torch.randn(2, 3, 64, 64))
        loss = head(feats[:, :, :2, :2].repeat(1, 1, 7, 7)).pow(2).mean() + feats.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        frozen = name.startswith(("trunk.conv1.", "trunk.layer1."))
        if frozen:
            assert p.grad is None, name
            assert torch.equal(p, before_params[name]), name
        else:
            assert not torch.equal(p, before_params[name]), f"{name} did not train"
    # BN statistics and affine terms are buffers of FrozenBatchNorm2d: untouched everywhere.
    for name, b in model.named_buffers():
        assert torch.equal(b, before_buffers[name]), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "bn" in n)


def test_unfrozen_bn_option_keeps_batchnorm() -> None:
    trunk = ResNetC4Trunk(build_resnet(18), freeze_at=0, frozen_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules())
    assert all(p.requires_grad for p in trunk.parameters())


def test_bad_arguments_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="freeze_at"):
        ResNetC4Trunk(build_resnet(18), freeze_at=3)
    with pytest.raises(ValueError, match="layer3"):
        ResNetC4Trunk(nn.Module())
    missing = tmp_path / "no_such_weights.pth"
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        build_resnet_c4(18, weights_path=missing)


def test_build_resnet_c4_loads_local_weights(tmp_path) -> None:
    torch.manual_seed(1)
    source = build_resnet(18)
    _randomise_bn(source, seed=3)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    trunk, head, dim = build_resnet_c4(18, weights_path=path, freeze_at=2)
    assert dim == 512
    torch.testing.assert_close(trunk.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.layer4[1].conv2.weight, source.layer4[1].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(trunk.layer2[0].bn1.running_var, source.layer2[0].bn1.running_var, rtol=0, atol=0)
    assert isinstance(trunk.layer2[0].bn1, FrozenBatchNorm2d)


def test_stride_in_1x1_reaches_conv5() -> None:
    _, head, _ = build_resnet_c4(50, stride_in_1x1=True)
    assert head.layer4[0].conv1.stride == (2, 2) and head.layer4[0].conv2.stride == (1, 1)
    _, head, _ = build_resnet_c4(50, stride_in_1x1=False)
    assert head.layer4[0].conv1.stride == (1, 1) and head.layer4[0].conv2.stride == (2, 2)
