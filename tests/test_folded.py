"""BN folding for the attacks (fastacl.models.folded): the folded mirror computes the eval-mode
model (forward and input gradients), follows weight updates in place, also when compiled, and
the trainer's attack with it matches the attack without it."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from fastacl.attacks import pgd_contrastive
from fastacl.models import build_model, convert_to_dual_bn
from fastacl.models.folded import (
    FoldedResNet18,
    bn_scale_shift,
    can_fold,
    folded_for_attack,
)
from fastacl.pretrain import compiled_for_attack
from tests.conftest import relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_statistics(model, size, steps=3):
    """Non-trivial running statistics and BN affine parameters on both branches."""
    in_channels = model.backbone.in_channels
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.uniform_(-0.2, 0.2, generator=g)
        model.train()
        for _ in range(steps):
            for branch, scale in (("normal", 1.0), ("adv", 0.7)):
                model(scale * torch.rand(6, in_channels, size, size, generator=g), branch=branch)
    return model.eval()


# (stem, in_channels, dual BN, image size): the 28x28 demo, CIFAR 32x32, odd sizes, STL's stem.
SHAPES = [("cifar", 1, True, 28), ("cifar", 3, True, 31), ("stl", 3, True, 41),
          ("cifar", 3, False, 17)]


@pytest.mark.parametrize("stem,in_channels,dual_bn,size", SHAPES)
@pytest.mark.parametrize("branch", ["adv", "normal"])
def test_folded_forward_and_input_gradient_match_the_eval_model(stem, in_channels, dual_bn,
                                                                size, branch):
    torch.manual_seed(0)
    model = build_model("resnet18-small", width=8, head_dim=24, stem=stem,
                        in_channels=in_channels, dual_bn=dual_bn)
    model = _trained_statistics(model, size)
    x = torch.rand(5, in_channels, size, size)
    folded = FoldedResNet18(model, branch)
    with torch.no_grad():
        assert relative_error(model(x, branch=branch), folded(x)) < 1e-5
        assert relative_error(model(x, branch=branch, return_features=True),
                              folded.features(x)) < 1e-5
    # Gradients in float64: in fp32 the two roundings can put a pre-activation on different
    # sides of a ReLU's kink, which changes one pixel's gradient by a lot (seen here).
    model64 = copy.deepcopy(model).double()
    folded64 = FoldedResNet18(model64, branch)
    x64 = x.double().requires_grad_(True)
    weights = torch.randn(5, model.out_dim, dtype=torch.float64)  # grad_output != 1
    (expected,) = torch.autograd.grad((model64(x64, branch=branch) * weights).sum(), x64)
    (got,) = torch.autograd.grad((folded64(x64) * weights).sum(), x64)
    assert relative_error(expected, got) < 1e-10
    assert not list(folded.parameters())  # buffers only: the attack differentiates the input


def test_refresh_follows_weight_and_statistics_updates_in_place():
    model = _trained_statistics(build_model("resnet18-small", width=4, head_dim=8,
                                            in_channels=1), 12)
    folded = folded_for_attack(model, "adv")
    assert folded_for_attack(model, "adv") is folded  # one mirror per (model, branch)
    assert folded_for_attack(model, "normal") is not folded
    stem_weight = folded.stem.weight
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    _trained_statistics(model, 12, steps=1)  # running statistics move too
    assert folded_for_attack(model, "adv") is folded
    assert folded.stem.weight is stem_weight  # refreshed in place (compiled graphs keep it)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        assert relative_error(model(x, branch="adv"), folded(x)) < 1e-5


def test_mirror_is_rebuilt_when_the_model_changes_memory_format_and_holds_no_reference():
    model = _trained_statistics(build_model("resnet18-small", width=4, head_dim=8,
                                            in_channels=3), 12)
    folded = folded_for_attack(model, "adv")
    model = model.to(memory_format=torch.channels_last)
    rebuilt = folded_for_attack(model, "adv")
    assert rebuilt is not folded
    assert rebuilt.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert relative_error(model(x, branch="adv"), rebuilt(x)) < 1e-5
    # The cache is weak: the mirror does not keep its model alive.
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_compiled_mirror_reads_the_refreshed_weights():
    model = _trained_statistics(build_model("resnet18-small", width=4, head_dim=8,
                                            in_channels=1), 12)
    folded = folded_for_attack(model, "adv")
    compiled = compiled_for_attack(folded)
    assert compiled_for_attack(folded) is compiled and folded.compiled[None] is compiled
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x, branch="adv")) < 1e-5
        for p in model.parameters():
            p.mul_(-0.9)  # a change no stale constant could hide
        folded_for_attack(model, "adv")
        assert relative_error(compiled(x), model(x, branch="adv")) < 1e-5


def test_attack_on_the_mirror_matches_the_attack_on_the_model():
    torch.manual_seed(0)
    model = _trained_statistics(build_model("resnet18-small", width=8, head_dim=16,
                                            in_channels=1), 16)
    model.train()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.rand(8, 1, 16, 16, generator=g) for _ in range(2))
    eager = pgd_contrastive(model, x1, x2, eps=0.15, step_size=0.05, steps=3,
                            generator=torch.Generator().manual_seed(3))
    folded = pgd_contrastive(folded_for_attack(model, "adv"), x1, x2, eps=0.15, step_size=0.05,
                             steps=3, generator=torch.Generator().manual_seed(3))
    for a, b, x in zip(eager, folded, (x1, x2), strict=True):
        assert (b - x).abs().max() <= 0.15 + 1e-6
        # Same iterates up to rounding, which may flip the sign of a near-zero gradient entry.
        assert ((a - b).abs() > 1e-6).float().mean() < 0.02
    assert model.training  # the mirror's attack leaves the model alone


def test_only_fastacl_resnet_is_folded():
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    converted = convert_to_dual_bn(encoder)
    assert not can_fold(converted)
    with pytest.raises(ValueError, match="ContrastiveResNet18"):
        FoldedResNet18(converted, "adv")
    with pytest.raises(ValueError, match="track_running_stats"):
        bn_scale_shift(nn.BatchNorm2d(4, track_running_stats=False))

    class Custom(type(build_model("resnet18-small"))):
        def forward(self, x, branch=None, return_features=False):
            return super().forward(x, branch, return_features) * 2

    custom = Custom(in_channels=1, width=4, head_dim=8, mean=(0.5,), std=(0.5,))
    assert can_fold(build_model("resnet18-small")) and not can_fold(custom)


@pytest.mark.gpu
def test_folded_mirror_on_cuda_channels_last_bf16_and_compiled():
    model = _trained_statistics(build_model("resnet18-small", width=16, head_dim=32), 32)
    model = model.cuda().to(memory_format=torch.channels_last)
    x = torch.rand(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    folded = folded_for_attack(model, "adv")
    with torch.no_grad():
        expected = model(x, branch="adv")
        assert relative_error(folded(x), expected) < 1e-4  # TF32 convolutions on both sides
        compiled = compiled_for_attack(folded)
        assert relative_error(compiled(x), expected) < 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert relative_error(folded(x).float(), expected) < 5e-2


def test_the_trainer_attacks_a_mirror_of_the_current_weights(monkeypatch):
    """Each step's attack runs the folded mirror, and it computes the model as it is at that
    step (weights and BN statistics updated by the steps before), not a stale copy."""
    import fastacl.pretrain.step as step
    from fastacl.config import TrainConfig
    from fastacl.optim import LARS
    from fastacl.pretrain import loss_for, train_step

    model = build_model("resnet18-small", width=4, head_dim=8, in_channels=1).train()
    cfg = TrainConfig.from_options(method="acl", dataset="mnist5k", batch_size=8, attack_steps=1,
                                   device="cpu", evaluate=False).resolve()
    original, checked = step.pgd_contrastive, []

    def spy(attack_model, x1, x2, **kwargs):
        assert isinstance(attack_model, FoldedResNet18)
        with torch.no_grad():
            model.eval()
            expected = model(x1, branch="adv")
            model.train()
            checked.append(relative_error(attack_model(x1), expected))
        return original(attack_model, x1, x2, **kwargs)

    monkeypatch.setattr(step, "pgd_contrastive", spy)  # the step's own binding of the attack
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    loss_fn = loss_for(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x_orig, x1, x2 = (torch.rand(8, 1, 12, 12, generator=g) for _ in range(3))
        train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg, torch.Generator())
    assert len(checked) == 3 and max(checked) < 1e-5
