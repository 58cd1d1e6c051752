"""ResNet-18 + projection head: sizes, parameter counts, init, normalisation, registry."""

import math

import pytest
import torch
from torch import nn

from fastacl.models import (
    MODEL_PRESETS,
    DualBatchNorm,
    build_model,
    dual_bn_modules,
    resnet18_acl,
)


def conv_parameters(c_in, c_out, k):
    return c_in * c_out * k * k


def cifar_resnet18_backbone_counts(width=64, in_channels=3):
    """(conv weights, BN channels) of the CIFAR ResNet-18 without its classifier."""
    convs = conv_parameters(in_channels, width, 3)
    bn_channels = width
    in_planes = width
    for planes, stride in zip((width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2), strict=True):
        for block in range(2):
            block_in = in_planes if block == 0 else planes
            convs += conv_parameters(block_in, planes, 3) + conv_parameters(planes, planes, 3)
            bn_channels += 2 * planes
            if block == 0 and (stride != 1 or block_in != planes):
                convs += conv_parameters(block_in, planes, 1)  # 1x1 shortcut
                bn_channels += planes
        in_planes = planes
    return convs, bn_channels


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_backbone_parameter_count_matches_the_standard_cifar_resnet18():
    convs, bn_channels = cifar_resnet18_backbone_counts()
    standard = convs + 2 * bn_channels  # one (gamma, beta) pair per BN channel
    # The well-known count: 11,173,962 with the 10-class classifier (512 * 10 + 10) removed.
    assert standard == 11_173_962 - (512 * 10 + 10) == 11_168_832
    single = resnet18_acl(dual_bn=False)
    assert count(single.backbone) == standard
    dual = resnet18_acl(dual_bn=True)
    # Dual BN adds exactly one more (gamma, beta) pair per BN channel, nothing else.
    assert count(dual.backbone) == standard + 2 * bn_channels == 11_168_832 + 2 * 4_800
    head_linear = (512 * 512 + 512) + 2 * (512 * 512)
    assert count(dual.head) == head_linear + 2 * (2 * 3 * 512)
    assert count(single.head) == head_linear + 2 * 3 * 512
    # Normalisation constants are buffers, not parameters.
    assert {name for name, _ in dual.backbone.normalize.named_buffers()} == {"mean", "std"}


@torch.no_grad()
def test_forward_shapes_full_width_cifar_and_stl():
    model = resnet18_acl(stem="cifar").eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x, branch="adv").shape == (2, 512)
    assert model(x, branch="normal", return_features=True).shape == (2, 512)
    model = resnet18_acl(stem="stl").eval()
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.stride == (2, 2)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    x = torch.rand(2, 3, 96, 96)
    stem_output = model.backbone.maxpool(model.backbone.conv1(x))
    assert stem_output.shape == (2, 64, 24, 24)  # 96 / 2 (conv) / 2 (max-pool)
    assert model(x, branch="adv").shape == (2, 512)


@torch.no_grad()
def test_forward_shapes_small_models():
    model = build_model("resnet18-small", in_channels=1).eval()
    assert model.feature_dim == 128 and model.out_dim == 128
    x = torch.rand(3, 1, 28, 28)
    assert model(x, branch="adv").shape == (3, 128)
    assert model(x, branch="normal", return_features=True).shape == (3, 128)
    model = resnet18_acl(width=8, head_dim=16, stem="stl").eval()
    assert model(torch.rand(2, 3, 96, 96), branch="normal").shape == (2, 16)


def test_cifar_stem_keeps_the_resolution():
    backbone = resnet18_acl(width=4, head_dim=8).backbone
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    strides = [backbone.get_submodule(f"layer{i}")[0].conv1.stride for i in range(1, 5)]
    assert strides == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert isinstance(backbone.layer1[0].shortcut, nn.Identity)
    assert backbone.layer2[0].shortcut.conv.kernel_size == (1, 1)


def test_demo_model_is_much_cheaper_than_the_paper_model():
    assert count(build_model("resnet18")) > 10 * count(build_model("resnet18-small"))


def test_initialisation():
    model = resnet18_acl()
    conv = model.backbone.layer4[1].conv2.weight  # 512 x 512 x 3 x 3: a tight std estimate
    expected_std = math.sqrt(2.0 / (512 * 3 * 3))  # Kaiming normal, fan_out, relu
    assert abs(conv.std().item() / expected_std - 1) < 0.01
    for layer in dual_bn_modules(model):
        for branch in (layer.normal, layer.adv):
            assert torch.all(branch.weight == 1) and torch.all(branch.bias == 0)


def test_projection_head_structure():
    head = resnet18_acl(width=4, head_dim=8).head
    assert head.fc1.bias is not None and head.fc2.bias is None and head.fc3.bias is None
    assert isinstance(head.bn3, DualBatchNorm)
    z = head(torch.randn(16, 32), branch="normal")
    assert (z < 0).any()  # no ReLU after the last BN


@torch.no_grad()
def test_forward_is_backbone_then_head():
    model = resnet18_acl(width=4, head_dim=8).eval()
    x = torch.rand(2, 3, 8, 8)
    h = model.backbone(x, branch="adv")
    assert torch.equal(model(x, branch="adv", return_features=True), h)
    assert torch.equal(model(x, branch="adv"), model.head(h, branch="adv"))


@torch.no_grad()
def test_normalisation_is_inside_the_model():
    model = resnet18_acl(width=4, head_dim=8)
    torch.testing.assert_close(model.backbone.normalize.mean, torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.backbone.normalize.std, torch.tensor([0.229, 0.224, 0.225]))
    mnist = resnet18_acl(width=4, head_dim=8, in_channels=1)
    torch.testing.assert_close(mnist.backbone.normalize.mean, torch.tensor([0.1307]))
    torch.testing.assert_close(mnist.backbone.normalize.std, torch.tensor([0.3081]))
    x = torch.rand(1, 3, 4, 4)
    expected = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.backbone.normalize(x), expected)


def test_bad_arguments_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'imagenet'.*\('cifar', 'stl'\)|stem must be one of"):
        resnet18_acl(stem="imagenet")
    with pytest.raises(ValueError, match="in_channels=2"):
        resnet18_acl(in_channels=2)
    assert resnet18_acl(in_channels=2, mean=[0.5, 0.5], std=[0.5, 0.5], width=4, head_dim=8)
    with pytest.raises(ValueError, match="resnet101.*resnet18"):
        build_model("resnet101")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\(2, 1, 8, 8\)"):
        resnet18_acl(width=4, head_dim=8)(torch.rand(2, 1, 8, 8), branch="adv")


def test_spec_rebuilds_the_same_model():
    assert set(MODEL_PRESETS) >= {"resnet18", "resnet18-small"}
    model = build_model("resnet18-small", in_channels=1, stem="stl", dual_bn=False)
    assert model.spec == {
        "name": "resnet18-small",
        "kwargs": {"stem": "stl", "in_channels": 1, "width": 16, "head_dim": 128,
                   "dual_bn": False, "mean": [0.1307], "std": [0.3081]},
    }
    rebuilt = build_model(model.spec["name"], **model.spec["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert rebuilt.spec == model.spec
