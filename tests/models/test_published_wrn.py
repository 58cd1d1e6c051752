"""Import / export of the RCS authors' ImageNet-32 WideResNet checkpoints (the second layout of
fastacl/models/published.py): bn_names=['pgd', 'normal'], a two-layer head, no normalisation.

The synthetic checkpoints are written from the documented layout, and the imported model is
compared with a float64 re-statement of their forward (wrn_with_bn.py + proj_head_module), not with
fastacl's WideResNet code.
"""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from fastacl.evaluation.pretrained import load_pretrained
from fastacl.models import (
    build_model,
    build_model_from_published,
    export_published_state_dict,
    import_published_state_dict,
)

HEAD_DIM = 8
THEIR_BRANCH_INDEX = {"pgd": 0, "normal": 1}  # their bn_names order
OUR_BRANCH = {"pgd": "adv", "normal": "normal"}


def their_bn(prefix, channels, generator):
    """batch_norm_multiple(bn_names=['pgd', 'normal']): bn_list.0 (pgd) and bn_list.1 (normal)."""
    keys = OrderedDict()
    for index in (0, 1):
        p = f"{prefix}.bn_list.{index}"
        keys[f"{p}.weight"] = torch.rand(channels, generator=generator) + 0.5
        keys[f"{p}.bias"] = torch.randn(channels, generator=generator) * 0.1
        keys[f"{p}.running_mean"] = torch.randn(channels, generator=generator) * 0.1
        keys[f"{p}.running_var"] = torch.rand(channels, generator=generator) + 0.5
        keys[f"{p}.num_batches_tracked"] = torch.tensor(300 + index)
    return keys


def their_wrn_state_dict(depth=10, widen_factor=1, head_dim=HEAD_DIM, seed=0, prefix="module."):
    """The state dict of their WideResNet(depth, 1000, widen_factor, bn_names=['pgd', 'normal'])
    with `linear` replaced by proj_head_module, saved from a DataParallel ('module.')."""
    g = torch.Generator().manual_seed(seed)
    n = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    sd = OrderedDict()
    sd["conv1.weight"] = torch.randn(16, 3, 3, 3, generator=g) * (2 / 27) ** 0.5
    for group in (1, 2, 3):
        in_planes, planes = widths[group - 1], widths[group]
        for k in range(n):
            p = f"block{group}.layer.{k}"
            block_in = in_planes if k == 0 else planes
            sd.update(their_bn(f"{p}.bn1", block_in, g))
            sd[f"{p}.conv1.weight"] = torch.randn(planes, block_in, 3, 3, generator=g) * (
                2 / (9 * block_in)) ** 0.5
            sd.update(their_bn(f"{p}.bn2", planes, g))
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g) * (
                2 / (9 * planes)) ** 0.5
            if block_in != planes:  # their convShortcut exists iff the width changes
                sd[f"{p}.convShortcut.weight"] = torch.randn(planes, block_in, 1, 1,
                                                             generator=g) * (1 / block_in) ** 0.5
    sd.update(their_bn("bn1", widths[3], g))
    sd["linear.fc1.weight"] = torch.randn(head_dim, widths[3], generator=g) * widths[3] ** -0.5
    sd["linear.fc1.bias"] = torch.randn(head_dim, generator=g) * 0.1
    sd.update(their_bn("linear.bn1", head_dim, g))
    sd["linear.fc2.weight"] = torch.randn(head_dim, head_dim, generator=g) * head_dim ** -0.5
    sd.update(their_bn("linear.bn2", head_dim, g))
    return OrderedDict((prefix + key, value) for key, value in sd.items())


def their_forward(sd, x, bn_name, *, features=False):
    """Their eval-mode model(x, bn_name) (wrn_with_bn.WideResNet.forward with proj_head_module as
    `linear`), re-stated with torch.nn.functional on a state dict without the 'module.' prefix."""
    index = THEIR_BRANCH_INDEX[bn_name]

    def bn(prefix, y):
        p = f"{prefix}.bn_list.{index}"
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                            sd[f"{p}.weight"], sd[f"{p}.bias"], training=False, eps=1e-5)

    out = F.conv2d(x, sd["conv1.weight"], padding=1)  # no normalisation: [0, 1] pixels
    for group, stride in ((1, 1), (2, 2), (3, 2)):
        k = 0
        while f"block{group}.layer.{k}.conv1.weight" in sd:
            p, s = f"block{group}.layer.{k}", stride if k == 0 else 1
            activated = F.relu(bn(f"{p}.bn1", out))
            y = F.conv2d(activated, sd[f"{p}.conv1.weight"], stride=s, padding=1)
            y = F.conv2d(F.relu(bn(f"{p}.bn2", y)), sd[f"{p}.conv2.weight"], padding=1)
            shortcut = sd.get(f"{p}.convShortcut.weight")
            out = y + (out if shortcut is None else F.conv2d(activated, shortcut, stride=s))
            k += 1
    h = F.avg_pool2d(F.relu(bn("bn1", out)), 8).flatten(1)
    if features:
        return h
    z = F.relu(bn("linear.bn1", F.linear(h, sd["linear.fc1.weight"], sd["linear.fc1.bias"])))
    return bn("linear.bn2", F.linear(z, sd["linear.fc2.weight"]))


def unprefixed(sd):
    return OrderedDict((key.removeprefix("module."), value) for key, value in sd.items())


def to_float64(sd):
    return OrderedDict((k, v.double() if v.is_floating_point() else v) for k, v in sd.items())


@pytest.mark.parametrize("depth, widen_factor", [(10, 1), (16, 2)])
def test_imported_model_computes_their_forward_on_both_branches(depth, widen_factor):
    """(10, 1): no shortcut conv in group 1; (16, 2): one there, and identity blocks too."""
    theirs = their_wrn_state_dict(depth, widen_factor)
    model = build_model_from_published({"epoch": 200, "state_dict": theirs, "optim": {}})
    assert model.spec["name"] == "wrn-28-10"
    assert model.spec["kwargs"] == {
        "depth": depth, "widen_factor": widen_factor, "stem": "cifar", "in_channels": 3,
        "head_dim": HEAD_DIM, "dual_bn": True, "mean": [0.0] * 3, "std": [1.0] * 3,
        "head_layers": 2}
    model = model.double().eval()
    reference = to_float64(unprefixed(theirs))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        for bn_name in ("pgd", "normal"):
            ours = model(x, branch=OUR_BRANCH[bn_name])
            expected = their_forward(reference, x, bn_name)
            torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                model(x, branch=OUR_BRANCH[bn_name], return_features=True),
                their_forward(reference, x, bn_name, features=True), rtol=1e-12, atol=1e-12)
        # The two branches really differ (the BN order matters): swapping them would fail above.
        assert not torch.allclose(model(x, branch="adv"), model(x, branch="normal"))


def test_their_bn_order_is_pgd_first():
    theirs = unprefixed(their_wrn_state_dict())
    ours = import_published_state_dict(theirs)
    assert torch.equal(ours["backbone.bn.adv.weight"], theirs["bn1.bn_list.0.weight"])
    assert torch.equal(ours["backbone.bn.normal.running_var"], theirs["bn1.bn_list.1.running_var"])
    assert torch.equal(ours["head.bn2.adv.num_batches_tracked"], torch.tensor(300))
    assert torch.equal(ours["backbone.block2.0.shortcut.weight"],
                       theirs["block2.layer.0.convShortcut.weight"])
    assert torch.equal(ours["backbone.normalize.mean"], torch.zeros(3))
    assert torch.equal(ours["backbone.normalize.std"], torch.ones(3))


def test_export_then_import_is_the_identity_and_import_then_export_too():
    theirs = unprefixed(their_wrn_state_dict(16, 2))
    round_trip = export_published_state_dict(import_published_state_dict(theirs))
    assert list(round_trip) == list(theirs)
    for key in theirs:
        assert torch.equal(round_trip[key], theirs[key]), key

    model = build_model("wrn-28-10", depth=10, widen_factor=1, head_dim=HEAD_DIM, head_layers=2,
                        mean=[0.0] * 3, std=[1.0] * 3)
    ours = model.state_dict()
    back = import_published_state_dict(export_published_state_dict(ours))
    assert set(back) == set(ours)
    for key in ours:
        assert torch.equal(back[key], ours[key]), key


def test_a_wrn_their_code_cannot_hold_is_not_exported():
    normalised = build_model("wrn-28-10", depth=10, widen_factor=1, head_dim=HEAD_DIM,
                             head_layers=2)  # ImageNet mean / std: theirs has no normalisation
    with pytest.raises(ValueError, match="no normalisation layer"):
        export_published_state_dict(normalised.state_dict())
    three_layers = build_model("wrn-28-10", depth=10, widen_factor=1, head_dim=HEAD_DIM,
                               mean=[0.0] * 3, std=[1.0] * 3)
    with pytest.raises(ValueError, match=r"head\.fc3\.weight"):
        export_published_state_dict(three_layers.state_dict())


@pytest.mark.parametrize("extra_key", ["module.linear.fc3.weight", "module.bn1.bn_list.2.weight",
                                       "module.block4.layer.0.conv1.weight",
                                       "module.linear.weight"])
def test_keys_outside_their_layout_fail_loudly(extra_key):
    theirs = their_wrn_state_dict()
    theirs[extra_key] = torch.zeros(1)
    with pytest.raises(ValueError, match=rf"WideResNet; keys outside.*'{extra_key}'"):
        import_published_state_dict(theirs)


def test_a_key_with_and_without_the_data_parallel_prefix_is_a_duplicate():
    theirs = their_wrn_state_dict()  # 'module.' prefixes
    theirs["conv1.weight"] = theirs["module.conv1.weight"].clone()
    with pytest.raises(ValueError, match=r"conv1\.weight -> backbone\.conv1\.weight"):
        import_published_state_dict(theirs)


def test_unequal_groups_are_refused():
    theirs = unprefixed(their_wrn_state_dict(16, 1))
    for key in [key for key in theirs if key.startswith("block3.layer.1.")]:
        del theirs[key]
    with pytest.raises(ValueError, match=r"\(2, 2, 1\) blocks per group"):
        build_model_from_published(theirs)


def test_full_size_wrn_28_10_checkpoint_loads_strictly():
    """Their ACL_RCS.py model: WideResNet(28, 1000, 10) with proj_head_module(640)."""
    model = build_model_from_published(their_wrn_state_dict(28, 10, head_dim=640))
    assert model.spec["name"] == "wrn-28-10"
    assert model.spec["kwargs"]["depth"] == 28 and model.spec["kwargs"]["widen_factor"] == 10
    backbone = sum(p.numel() for p in model.backbone.parameters()) - sum(
        p.numel() for name, p in model.backbone.named_parameters() if ".normal." in name)
    assert backbone == 36_472_784  # single-branch backbone: docs/backbones.md


def test_evaluate_loads_their_file_with_the_pgd_branch(tmp_path):
    path = tmp_path / "model.pt"
    theirs = their_wrn_state_dict()
    torch.save({"epoch": 200, "state_dict": theirs, "optim": {"state": {}}}, path)
    pretrained = load_pretrained(path)
    assert pretrained.source == "published" and pretrained.encoder_branch == "adv"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            pretrained.model.eval()(x, branch="adv", return_features=True),
            their_forward(unprefixed(theirs), x, "pgd", features=True), rtol=1e-5, atol=1e-5)
