"""Dual BN: routing of running statistics, the converter, and the single-BN encoder copy."""

import copy

import pytest
import torch
from torch import nn

from fastacl.models import (
    BRANCHES,
    DualBatchNorm,
    DualBatchNorm1d,
    DualBatchNorm2d,
    DualBatchNorm3d,
    DualGroupNorm,
    DualLayerNorm,
    DualNorm,
    DualRMSNorm,
    DualSyncBatchNorm,
    bn_branch,
    convert_to_dual_bn,
    dual_bn_modules,
    dual_norm_modules,
    encoder_from_branch,
    has_dual_bn,
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


# ---- LayerNorm, GroupNorm, RMSNorm, SyncBatchNorm and refused norms ----------------------------

# (plain layer, input shape): odd sizes, and a LayerNorm over two trailing dimensions.
AFFINE_NORMS = {
    "layer_norm": (lambda: nn.LayerNorm(7), (3, 5, 7)),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((5, 7)), (3, 5, 7)),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(41, bias=False), (2, 41)),
    "group_norm": (lambda: nn.GroupNorm(3, 9), (2, 9, 5, 3)),
    "group_norm_one_group": (lambda: nn.GroupNorm(1, 5), (4, 5, 7)),
    "rms_norm": (lambda: nn.RMSNorm(7, eps=1e-6), (3, 5, 7)),
}


def randomise_parameters(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                        dtype=parameter.dtype))


@pytest.mark.parametrize("kind", AFFINE_NORMS)
def test_dual_affine_norm_equals_the_plain_layer_with_that_branchs_parameters(kind):
    make, shape = AFFINE_NORMS[kind]
    original = make().double()
    randomise_parameters(original, seed=1)
    dual = convert_to_dual_bn(copy.deepcopy(original))
    assert isinstance(dual, DualNorm) and type(dual.normal) is type(original)
    randomise_parameters(dual.adv, seed=2)  # the branches now differ
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for branch in BRANCHES:
        reference = copy.deepcopy(original)
        reference.load_state_dict(dual.branch_module(branch).state_dict())
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        with bn_branch(dual, branch):
            ours = dual(x_ours)
        expected = reference(x_ref)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        # "Not last layer": grad_output != 1.
        ((ours * upstream).sum() * 2).backward()
        ((expected * upstream).sum() * 2).backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=0)
        for (name, ours_p), (_, ref_p) in zip(dual.branch_module(branch).named_parameters(),
                                              reference.named_parameters(), strict=True):
            torch.testing.assert_close(ours_p.grad, ref_p.grad, rtol=0, atol=0, msg=name)
        other = dual.branch_module("adv" if branch == "normal" else "normal")
        assert all(p.grad is None for p in other.parameters()), "gradient leaked across branches"
        dual.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", AFFINE_NORMS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_a_step_on_one_branch_leaves_the_other(kind, branch):
    make, shape = AFFINE_NORMS[kind]
    dual = convert_to_dual_bn(make())
    before = {key: value.clone() for key, value in dual.state_dict().items()}
    optimiser = torch.optim.SGD(dual.parameters(), lr=0.1)
    with bn_branch(dual, branch):
        (dual(torch.randn(shape)) ** 3).sum().backward()
    optimiser.step()
    for key, value in dual.state_dict().items():
        if key.startswith(f"{branch}."):
            assert not torch.equal(value, before[key]), f"{key} did not move"
        else:
            assert torch.equal(value, before[key]), f"{key} moved with the {branch} branch"


class MixedEncoder(nn.Module):
    """Conv + BatchNorm2d + GroupNorm, then Linear + LayerNorm: a user module, branch-blind."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 9, 3), nn.GroupNorm(3, 9), nn.GELU(),
            nn.LocalResponseNorm(2),  # no parameters: nothing for a branch to own
        )
        self.fc = nn.Linear(9, 5)
        self.norm = nn.LayerNorm(5)
        self.plain = nn.LayerNorm(5, elementwise_affine=False)

    def forward(self, x):
        return self.plain(self.norm(self.fc(self.features(x).mean(dim=(2, 3)))))


def test_mixed_model_converts_fully_and_routes():
    original = MixedEncoder()
    randomise_bn(original)
    randomise_parameters(original.features[4], seed=5)
    randomise_parameters(original.norm, seed=6)
    original.eval()
    x = images()
    expected = original(x)
    model = convert_to_dual_bn(copy.deepcopy(original))
    assert [type(m) for m in dual_norm_modules(model)] == [
        DualBatchNorm2d, DualGroupNorm, DualLayerNorm,
    ]
    assert [type(m) for m in dual_bn_modules(model)] == [DualBatchNorm2d]
    assert has_dual_bn(model)
    assert isinstance(model.features[6], nn.LocalResponseNorm)
    assert isinstance(model.plain, nn.LayerNorm)
    for branch in BRANCHES:  # both branches start as the original
        with bn_branch(model, branch):
            assert {m.active_branch for m in dual_norm_modules(model)} == {branch}
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert {m.active_branch for m in dual_norm_modules(model)} == {None}
    with pytest.raises(RuntimeError, match="no active branch"):
        model(x)
    with torch.no_grad():
        model.norm.adv.weight.mul_(3.0)  # only the LayerNorm's adv branch changes
    with bn_branch(model, "normal"):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with bn_branch(model, "adv"):
        adv = model(x)
    assert not torch.allclose(adv, expected)
    encoder = encoder_from_branch(model, "adv").eval()
    assert not dual_norm_modules(encoder) and isinstance(encoder.norm, nn.LayerNorm)
    assert torch.equal(encoder(x), adv)


def test_mixed_model_state_dict_round_trip_is_strict():
    model = convert_to_dual_bn(MixedEncoder())
    randomise_parameters(model, seed=7)
    keys = model.state_dict().keys()
    for name in ("features.1", "features.4", "norm"):
        assert {f"{name}.normal.weight", f"{name}.adv.weight", f"{name}.normal.bias",
                f"{name}.adv.bias"} <= keys
    assert "features.1.adv.running_var" in keys and "norm.weight" not in keys
    fresh = convert_to_dual_bn(MixedEncoder())
    assert fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fresh.eval()
    x = images()
    for branch in BRANCHES:
        with bn_branch(model, branch), bn_branch(fresh, branch):
            assert torch.equal(fresh(x), model(x))
    # A single-norm state dict does not load into the dual model (and says which keys).
    with pytest.raises(RuntimeError, match="norm.normal.weight"):
        fresh.load_state_dict(MixedEncoder().state_dict(), strict=True)


class MyRMSNorm(nn.Module):
    """A hand-written norm the converter does not know."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("norm, type_name", [
    (MyRMSNorm(6), "MyRMSNorm"),
    (nn.InstanceNorm1d(6, affine=True), "InstanceNorm1d"),
    (nn.InstanceNorm1d(6, track_running_stats=True), "InstanceNorm1d"),
])
def test_an_unknown_norm_is_an_error_naming_the_layer(norm, type_name):
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Sequential(Block(nn.LayerNorm(6)), Block(norm)))
    with pytest.raises(ValueError, match=rf"'1\.1\.norm' \({type_name}"):
        convert_to_dual_bn(model)
    # Refused before anything changed.
    assert not dual_norm_modules(model) and isinstance(model[0], nn.BatchNorm1d)
    with pytest.raises(ValueError, match=rf"the module itself \({type_name}"):
        convert_to_dual_bn(copy.deepcopy(norm))
    # Shared on purpose when asked.
    converted = convert_to_dual_bn(model, keep_shared=(type(norm),))
    assert converted[1][1].norm is norm
    assert [type(m) for m in dual_norm_modules(converted)] == [DualBatchNorm1d, DualLayerNorm]


def test_norms_without_state_are_left_alone():
    for layer in (nn.InstanceNorm2d(3), nn.LocalResponseNorm(2), nn.GroupNorm(1, 3, affine=False),
                  nn.LayerNorm(3, elementwise_affine=False),
                  nn.RMSNorm(3, elementwise_affine=False)):
        assert convert_to_dual_bn(layer) is layer


def test_uninitialised_lazy_batch_norm_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="'1' .*uninitialised"):
        convert_to_dual_bn(model)
    model(torch.randn(5, 3))  # materialised: a BatchNorm1d now
    assert isinstance(convert_to_dual_bn(model)[1], DualBatchNorm1d)


def test_sync_and_3d_batch_norm_convert_like_batch_norm():
    group = object()  # stands for a process group: shared by both branches, never copied
    sync = nn.SyncBatchNorm(4, momentum=0.3, process_group=group)
    randomise_bn(sync)
    dual = convert_to_dual_bn(sync)
    assert isinstance(dual, DualSyncBatchNorm) and isinstance(dual, DualBatchNorm)
    assert isinstance(dual.adv, nn.SyncBatchNorm) and dual.adv.momentum == 0.3
    assert dual.normal.process_group is group and dual.adv.process_group is group
    assert dual.normal.weight is not dual.adv.weight
    dual.eval(), sync.eval()
    x = torch.randn(2, 4, 3, 5)
    for branch in BRANCHES:
        with bn_branch(dual, branch):
            assert torch.equal(dual(x), sync(x))
    assert isinstance(DualSyncBatchNorm(4).normal, nn.SyncBatchNorm)
    assert isinstance(convert_to_dual_bn(nn.Sequential(nn.BatchNorm3d(2)))[0], DualBatchNorm3d)


def test_dual_layers_are_not_converted_again():
    dual = DualLayerNorm(5)
    assert convert_to_dual_bn(dual) is dual and isinstance(dual.normal, nn.LayerNorm)
    group = DualGroupNorm(2, 4)
    assert group.num_channels == 4 and isinstance(group.adv, nn.GroupNorm)
    assert DualRMSNorm(3).normalized_shape == (3,)
    with pytest.raises(TypeError, match="DualBatchNorm1d"):
        DualBatchNorm(4)
