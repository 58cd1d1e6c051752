"""fastacl.optim.build_optimizer: LARS on every tensor (as published), AdamW with its weight decay
on the weight matrices only, and the config defaults that go with each."""

import pytest
import torch

from fastacl.config import TrainConfig
from fastacl.models import build_model
from fastacl.optim import LARS, build_optimizer


def _tiny_vit():
    torch.manual_seed(0)
    return build_model("vit-tiny", dim=16, depth=1, heads=2, mlp_dim=32, head_dim=8)


def test_adamw_decays_the_weight_matrices_only():
    model = _tiny_vit()
    optimizer = build_optimizer(model.named_parameters(), "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, undecayed = optimizer.param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.bias",
            "backbone.norm.adv.weight", "head.fc1.bias"} <= undecayed_names
    assert {"backbone.patch_embed.weight", "backbone.blocks.0.attn.qkv.weight",
            "head.fc2.weight"} <= decayed_names
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert len(decayed_names) + len(undecayed_names) == len(list(model.parameters()))


def test_lars_takes_every_tensor_and_unknown_names_fail():
    model = _tiny_vit()
    optimizer = build_optimizer(model.named_parameters(), "lars", lr=5.0, weight_decay=1e-6)
    assert isinstance(optimizer, LARS) and len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="'lars' or 'adamw'"):
        build_optimizer(model.named_parameters(), "sgd", lr=0.1, weight_decay=0.0)


def test_each_optimizer_gets_its_own_default_lr_and_weight_decay():
    lars = TrainConfig.from_options(model="vit-tiny").resolve().optim
    adamw = TrainConfig.from_options(model="vit-tiny", optimizer="adamw").resolve().optim
    given = TrainConfig.from_options(optimizer="adamw", lr=3e-4, weight_decay=0.1).resolve().optim
    assert (lars.lr, lars.weight_decay) == (5.0, 1e-6)
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.05)
    assert (given.lr, given.weight_decay) == (3e-4, 0.1)
    with pytest.raises(Exception, match="optimizer"):
        TrainConfig.from_options(optimizer="adam").resolve()
