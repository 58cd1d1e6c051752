"""Dual BN: routing of running statistics, the converter, and the single-BN encoder copy."""

import pytest
import torch
from torch import nn

from fastacl.models import (
    BRANCHES,
    DualBatchNorm,
    DualBatchNorm1d,
    DualBatchNorm2d,
    bn_branch,
    convert_to_dual_bn,
    dual_bn_modules,
    encoder_from_branch,
    resnet18_acl,
)


def tiny_model(dual_bn=True):
    return resnet18_acl(width=4, head_dim=8, dual_bn=dual_bn)


def images(n=4, channels=3, size=8):
    return torch.rand(n, channels, size, size)


def snapshot_statistics(module):
    """(branch, layer index) -> (running_mean, running_var, num_batches_tracked), cloned."""
    return {
        (branch, i): tuple(getattr(layer, branch).get_buffer(name).clone()
                           for name in ("running_mean", "running_var", "num_batches_tracked"))
        for i, layer in enumerate(dual_bn_modules(module))
        for branch in BRANCHES
    }


def assert_only_branch_updated(before, after, updated_branch):
    for (branch, index), old in before.items():
        new = after[(branch, index)]
        if branch == updated_branch:
            assert new[2] == old[2] + 1, f"layer {index}: {branch} did not count the batch"
            assert not torch.equal(new[0], old[0]), f"layer {index}: {branch} mean unchanged"
        else:
            for old_tensor, new_tensor in zip(old, new, strict=True):
                assert torch.equal(old_tensor, new_tensor), f"layer {index}: {branch} changed"


class UserEncoder(nn.Module):
    """A user's module whose forward knows nothing about branches."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(self.features(x).mean(dim=(2, 3))))


def randomise_bn(module, seed=1):
    """Non-trivial affine parameters and running statistics in every plain BN layer."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for tensor in (layer.weight, layer.bias, layer.running_mean):
                tensor.data = torch.randn(tensor.shape, generator=generator)
            layer.running_var.data = torch.rand(layer.running_var.shape, generator=generator) + 0.5


@pytest.mark.parametrize("branch", BRANCHES)
def test_train_forward_updates_only_the_routed_branch(branch):
    model = tiny_model().train()
    assert len(dual_bn_modules(model)) == 20 + 3  # backbone incl. 3 shortcuts, then head
    before = snapshot_statistics(model)
    model(images(), branch=branch)
    assert_only_branch_updated(before, snapshot_statistics(model), branch)


def test_eval_forward_updates_no_statistics():
    model = tiny_model().eval()
    before = snapshot_statistics(model)
    for branch in BRANCHES:
        model(images(), branch=branch)
    after = snapshot_statistics(model)
    for key, old in before.items():
        assert all(torch.equal(a, b) for a, b in zip(old, after[key], strict=True)), key


@pytest.mark.parametrize("branch", BRANCHES)
def test_converted_user_module_routes_the_same_way(branch):
    user = convert_to_dual_bn(UserEncoder()).train()
    assert [type(m) for m in dual_bn_modules(user)] == [DualBatchNorm2d, DualBatchNorm1d]
    before = snapshot_statistics(user)
    with bn_branch(user, branch):
        user(images())
    assert_only_branch_updated(before, snapshot_statistics(user), branch)
    # Routing is undone after the block.
    assert all(layer.active_branch is None for layer in dual_bn_modules(user))


def test_converted_module_starts_from_the_original_on_both_branches():
    original = UserEncoder()
    randomise_bn(original)
    original.eval()
    x = images()
    expected = original(x)
    converted = convert_to_dual_bn(original)  # in place: `original` is converted too
    for branch in BRANCHES:
        with bn_branch(converted, branch):
            torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    layers = dual_bn_modules(converted)
    assert layers[0].normal.weight is not layers[0].adv.weight  # two copies, nothing shared


def test_convert_a_batch_norm_itself_and_converting_twice():
    batch_norm = nn.BatchNorm2d(3, eps=1e-3, momentum=0.3)
    dual = convert_to_dual_bn(batch_norm)
    assert isinstance(dual, DualBatchNorm2d)
    assert dual.adv.eps == 1e-3 and dual.normal.momentum == 0.3
    again = convert_to_dual_bn(nn.Sequential(dual))
    assert again[0] is dual and isinstance(again[0].normal, nn.BatchNorm2d)


def test_dual_bn_without_a_routed_branch_raises():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="no active branch"):
        model(images())


def test_unknown_branch_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"'pgd'.*\('normal', 'adv'\)|\('normal', 'adv'\).*'pgd'"):
        tiny_model()(images(), branch="pgd")
    with pytest.raises(ValueError, match="'pgd'"):
        tiny_model(dual_bn=False)(images(), branch="pgd")


def test_bn_branch_nests_and_restores_after_an_exception():
    model = tiny_model().eval()
    layers = dual_bn_modules(model)
    with bn_branch(model, "adv"):
        with bn_branch(model, "normal"):
            assert {layer.active_branch for layer in layers} == {"normal"}
        assert {layer.active_branch for layer in layers} == {"adv"}
        with bn_branch(model, None):  # None leaves the outer routing alone
            assert {layer.active_branch for layer in layers} == {"adv"}
        with pytest.raises(ZeroDivisionError), bn_branch(model, "normal"):
            raise ZeroDivisionError
        assert {layer.active_branch for layer in layers} == {"adv"}
        # A forward with branch=None uses the enclosing routing.
        x = images()
        assert torch.equal(model(x), model(x, branch="adv"))
    assert {layer.active_branch for layer in layers} == {None}


def test_branches_are_really_different_parameters():
    model = tiny_model().eval()
    with torch.no_grad():
        for layer in dual_bn_modules(model):
            layer.adv.weight.mul_(2.0)
    x = images()
    assert not torch.allclose(model(x, branch="normal"), model(x, branch="adv"))


def test_single_bn_model_accepts_and_ignores_the_branch():
    model = tiny_model(dual_bn=False).eval()
    assert not dual_bn_modules(model)
    x = images()
    reference = model(x)
    for branch in BRANCHES:
        assert torch.equal(model(x, branch=branch), reference)


@pytest.mark.parametrize("branch", BRANCHES)
def test_encoder_from_branch_equals_the_model_features_on_that_branch(branch):
    model = tiny_model().train()
    # Give the two branches different statistics and parameters.
    model(images(), branch="normal")
    model(images() * 0.5, branch="adv")
    randomise_bn(model, seed=2)
    model.eval()
    encoder = encoder_from_branch(model, branch).eval()
    assert not any(isinstance(m, DualBatchNorm) for m in encoder.modules())
    assert not any(isinstance(m, nn.Linear) for m in encoder.modules())  # head dropped
    assert isinstance(encoder.bn1, nn.BatchNorm2d)
    x = images()
    assert torch.equal(encoder(x), model(x, branch=branch, return_features=True))
    # A copy: training the encoder leaves the model alone.
    assert encoder.conv1.weight.data_ptr() != model.backbone.conv1.weight.data_ptr()


def test_encoder_from_branch_of_a_converted_user_module():
    user = convert_to_dual_bn(UserEncoder())
    randomise_bn(user)
    user.eval()
    encoder = encoder_from_branch(user, "adv").eval()
    x = images()
    with bn_branch(user, "adv"):
        assert torch.equal(encoder(x), user(x))


def test_encoder_from_branch_of_a_single_bn_model():
    model = tiny_model(dual_bn=False).eval()
    x = images()
    assert torch.equal(encoder_from_branch(model, "normal")(x), model(x, return_features=True))
    with pytest.raises(ValueError, match="only branch is 'normal'"):
        encoder_from_branch(model, "adv")


@pytest.mark.slow
def test_routing_compiles_into_one_graph():
    """torch.compile traces the routing (attribute set / restore) without a graph break."""
    model = tiny_model().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        model.head.bn3.adv.running_mean.fill_(1.0)  # make the two branches differ
        x = images()
        for branch in BRANCHES:
            assert torch.equal(compiled(x, branch=branch), model(x, branch=branch))
    assert {layer.active_branch for layer in dual_bn_modules(model)} == {None}
