"""Import / export of the ACL / DynACL / AIR / RCS authors' checkpoint layout."""

from collections import OrderedDict

import pytest
import torch

from fastacl.models import (
    build_model_from_published,
    export_published_state_dict,
    import_published_state_dict,
    load_state_dict_strict,
    resnet18_acl,
)

WIDTH, HEAD_DIM = 4, 8  # small: the layout, not the size, is the point here


def published_bn(prefix, channels, generator):
    """Their batch_norm_multiple with bn_names=['normal', 'pgd']: bn_list.0 and bn_list.1."""
    keys = OrderedDict()
    for index in (0, 1):
        p = f"{prefix}.bn_list.{index}"
        keys[f"{p}.weight"] = torch.randn(channels, generator=generator)
        keys[f"{p}.bias"] = torch.randn(channels, generator=generator)
        keys[f"{p}.running_mean"] = torch.randn(channels, generator=generator)
        keys[f"{p}.running_var"] = torch.rand(channels, generator=generator) + 0.5
        keys[f"{p}.num_batches_tracked"] = torch.tensor(100 + index)
    return keys


def synthetic_published_state_dict(width=WIDTH, head_dim=HEAD_DIM, seed=0):
    """Written from the layout documented in fastacl/models/published.py, not from its rules."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    sd["normalize.mean"] = torch.tensor([0.485, 0.456, 0.406])
    sd["normalize.std"] = torch.tensor([0.229, 0.224, 0.225])
    sd["conv1.weight"] = torch.randn(width, 3, 3, 3, generator=g)
    sd.update(published_bn("bn1", width, g))
    in_planes = width
    for layer, planes in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            block_in = in_planes if block == 0 else planes
            sd[f"{p}.conv1.weight"] = torch.randn(planes, block_in, 3, 3, generator=g)
            sd.update(published_bn(f"{p}.bn1", planes, g))
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g)
            sd.update(published_bn(f"{p}.bn2", planes, g))
            if block == 0 and layer > 1:
                sd[f"{p}.downsample.conv.weight"] = torch.randn(planes, block_in, 1, 1,
                                                                generator=g)
                sd.update(published_bn(f"{p}.downsample.bn", planes, g))
        in_planes = planes
    sd["fc.fc1.weight"] = torch.randn(head_dim, 8 * width, generator=g)
    sd["fc.fc1.bias"] = torch.randn(head_dim, generator=g)
    sd.update(published_bn("fc.bn1", head_dim, g))
    sd["fc.fc2.weight"] = torch.randn(head_dim, head_dim, generator=g)
    sd.update(published_bn("fc.bn2", head_dim, g))
    sd["fc.fc3.weight"] = torch.randn(head_dim, head_dim, generator=g)
    sd.update(published_bn("fc.bn3", head_dim, g))
    return sd


def assert_same_state(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_synthetic_published_state_dict_imports_and_loads_strictly():
    theirs = synthetic_published_state_dict()
    ours = import_published_state_dict(theirs)
    model = resnet18_acl(width=WIDTH, head_dim=HEAD_DIM)
    load_state_dict_strict(model, ours)  # every key present, no key left over
    # Spot checks of where things land: bn_list.0 is "normal", bn_list.1 is "adv".
    assert torch.equal(model.backbone.bn1.normal.weight, theirs["bn1.bn_list.0.weight"])
    assert torch.equal(model.backbone.layer3[0].shortcut.bn.adv.running_mean,
                       theirs["layer3.0.downsample.bn.bn_list.1.running_mean"])
    assert torch.equal(model.backbone.layer2[0].shortcut.conv.weight,
                       theirs["layer2.0.downsample.conv.weight"])
    assert torch.equal(model.head.fc1.bias, theirs["fc.fc1.bias"])
    assert torch.equal(model.head.bn3.adv.num_batches_tracked, torch.tensor(101))


def test_export_then_import_is_the_identity():
    model = resnet18_acl(width=WIDTH, head_dim=HEAD_DIM).train()
    model(torch.rand(4, 3, 8, 8), branch="normal")
    model(torch.rand(4, 3, 8, 8), branch="adv")
    ours = model.state_dict()
    theirs = export_published_state_dict(ours)
    assert "layer2.0.downsample.bn.bn_list.1.running_var" in theirs
    assert "fc.bn3.bn_list.0.weight" in theirs and "normalize.mean" in theirs
    assert_same_state(import_published_state_dict(theirs), ours)


def test_import_then_export_is_the_identity_on_the_canonical_layout():
    theirs = synthetic_published_state_dict()
    round_trip = export_published_state_dict(import_published_state_dict(theirs))
    assert set(round_trip) == set(theirs)
    for key in theirs:
        assert torch.equal(round_trip[key], theirs[key]), key


def test_data_parallel_prefix_checkpoint_wrapper_and_aliases():
    theirs = synthetic_published_state_dict()
    expected = import_published_state_dict(theirs)
    wrapped = {
        "epoch": 1000,
        "optim": {"state": {}, "param_groups": []},
        "state_dict": OrderedDict((f"module.{k}", v) for k, v in theirs.items()),
    }
    assert_same_state(import_published_state_dict(wrapped), expected)

    aliased = OrderedDict()
    for key, value in theirs.items():
        key = key.replace("downsample.conv", "shortcut.0").replace("downsample.bn", "shortcut.1")
        aliased[key.replace("fc.", "projector.", 1) if key.startswith("fc.") else key] = value
    assert_same_state(import_published_state_dict(aliased), expected)


@pytest.mark.parametrize(
    "extra_key",
    ["bn1.bn_list.2.weight", "fc.weight", "layer1.0.bn1.bn_list.weight", "features.0.weight",
     "layer5.0.conv1.weight"],
)
def test_keys_outside_the_layout_fail_loudly_with_their_names(extra_key):
    theirs = synthetic_published_state_dict()
    theirs[extra_key] = torch.zeros(1)
    with pytest.raises(ValueError, match=f"outside the documented layout.*'{extra_key}'"):
        import_published_state_dict(theirs)


def test_two_keys_for_one_tensor_fail():
    theirs = synthetic_published_state_dict()
    theirs["layer2.0.shortcut.0.weight"] = theirs["layer2.0.downsample.conv.weight"]
    with pytest.raises(ValueError, match="layer2.0.shortcut.0.weight -> "):
        import_published_state_dict(theirs)


def test_missing_published_keys_fail_at_the_strict_load():
    ours = import_published_state_dict(synthetic_published_state_dict())
    del ours["head.bn2.adv.running_mean"]
    with pytest.raises(RuntimeError, match="head.bn2.adv.running_mean"):
        load_state_dict_strict(resnet18_acl(width=WIDTH, head_dim=HEAD_DIM), ours)


def test_single_bn_models_cannot_be_exported():
    single = resnet18_acl(width=WIDTH, head_dim=HEAD_DIM, dual_bn=False)
    with pytest.raises(ValueError, match=r"backbone\.bn1\.weight"):
        export_published_state_dict(single.state_dict())


def test_build_model_from_a_published_file(tmp_path):
    path = tmp_path / "ACL_DS.pt"
    theirs = synthetic_published_state_dict()
    torch.save({"epoch": 1000, "state_dict": theirs}, path)
    model = build_model_from_published(path).eval()
    assert model.spec["kwargs"] == {
        "stem": "cifar", "in_channels": 3, "width": WIDTH, "head_dim": HEAD_DIM,
        "dual_bn": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }
    reference = resnet18_acl(width=WIDTH, head_dim=HEAD_DIM).eval()
    load_state_dict_strict(reference, import_published_state_dict(theirs))
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, branch="adv"), reference(x, branch="adv"))
