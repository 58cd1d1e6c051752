"""fastacl.attacks: PGD on NT-Xent / cross-entropy / TRADES KL, robust accuracy, AutoAttack.

Tiny models defined here (no dependency on fastacl.models): a conv net with BatchNorm, and a
dual-BN-style net whose forward takes branch= and records which branches it was called with.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastacl import attacks
from fastacl.attacks import (
    autoattack,
    frozen_eval,
    is_robust,
    pgd,
    pgd_contrastive,
    robust_accuracy,
    trades_perturb,
)
from fastacl.ops import nt_xent

EPS, ALPHA = 8 / 255, 2 / 255
ULP = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # spin-waiting made AutoAttack here 10-50x slower with 2 threads than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallConvNet(nn.Module):
    def __init__(self, out_features: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, out_features)

    def forward(self, x):
        return self.head(self.features(x))


class TinyDualBN(nn.Module):
    """Shared conv and linear weights, one BatchNorm per branch (dual BN, docs/acl-air.md
    section 2)."""

    def __init__(self, out_features: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.ModuleDict({"normal": nn.BatchNorm2d(8), "adv": nn.BatchNorm2d(8)})
        self.head = nn.Linear(8, out_features)
        self.branches_seen = []

    def forward(self, x, branch="normal"):
        self.branches_seen.append(branch)
        h = F.relu(self.bn[branch](self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def with_running_stats(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial running statistics, so eval mode differs from train mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            if isinstance(model, TinyDualBN):
                model(torch.rand(16, 3, 8, 8), branch="normal")
                model(torch.rand(16, 3, 8, 8), branch="adv")
            else:
                model(torch.rand(16, 3, 8, 8))
    return model


def views(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.rand(n, 3, 8, 8, generator=generator)
    x2 = (x1 + 0.1 * torch.randn(n, 3, 8, 8, generator=generator)).clamp(0, 1)
    return x1, x2


def assert_in_budget(x_adv, x, eps=EPS):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv.double() - x.double()).abs().max().item() <= eps + ULP


# ---- pgd_contrastive ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def contrastive_model():
    """SmallConvNet after 30 NT-Xent steps: an untrained net maps every image to nearly the
    same embedding, where NT-Xent already sits at its maximum log(2N - 1) and cannot rise."""
    torch.manual_seed(0)
    model = SmallConvNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for seed in range(30):
        x1, x2 = views(16, seed=seed)
        optimiser.zero_grad()
        nt_xent(model(x1), model(x2)).backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_pgd_contrastive_raises_nt_xent_within_budget(contrastive_model):
    model = contrastive_model
    x1, x2 = views(seed=100)
    x1_adv, x2_adv = pgd_contrastive(model, x1, x2, generator=torch.Generator().manual_seed(1))
    assert_in_budget(x1_adv, x1)
    assert_in_budget(x2_adv, x2)
    with torch.no_grad():
        clean = nt_xent(model(x1), model(x2)).item()
        adversarial = nt_xent(model(x1_adv), model(x2_adv)).item()
    assert adversarial > clean + 0.5, (clean, adversarial)


def test_pgd_contrastive_touches_no_parameter_gradient_and_restores_every_flag():
    model = with_running_stats(SmallConvNet())
    model.train()
    model.features[1].eval()  # a submodule in eval inside a training model must stay so
    model.head.bias.requires_grad_(False)  # an already frozen parameter must stay frozen
    sentinel = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = sentinel[name].clone()
    training_before = {name: m.training for name, m in model.named_modules()}
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}

    x1, x2 = views()
    pgd_contrastive(model, x1, x2, steps=2)

    for name, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[name]), name
    assert {name: m.training for name, m in model.named_modules()} == training_before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad_before
    for key, value in model.state_dict().items():  # eval mode: BN running stats untouched
        assert torch.equal(value, stats_before[key]), key


def test_flags_are_restored_when_the_attack_fails():
    model = SmallConvNet().train()

    def broken_forward(x):
        raise RuntimeError("boom")

    model.forward = broken_forward
    with pytest.raises(RuntimeError, match="boom"):
        pgd_contrastive(model, *views(), steps=1)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_input_only_gradients_compute_no_weight_gradient():
    # While frozen, autograd.grad with respect to the input builds no weight-gradient node:
    # the graph holds no AccumulateGrad (the node that would receive a parameter gradient).
    model = SmallConvNet()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with frozen_eval(model):
        out = model(x).sum()

    def accumulate_nodes(fn, seen):
        if fn is None or fn in seen:
            return []
        seen.add(fn)
        found = [fn] if type(fn).__name__ == "AccumulateGrad" else []
        for next_fn, _ in fn.next_functions:
            found += accumulate_nodes(next_fn, seen)
        return found

    leaves = [node.variable for node in accumulate_nodes(out.grad_fn, set())]
    assert len(leaves) == 1 and leaves[0] is x


def reference_pgd_contrastive(model, x1, x2, seed, steps=5, clip_start=True, branch=None):
    """Spec section 3 step by step, in plain PyTorch (parameters left trainable, as published)."""
    model.eval()
    n = x1.shape[0]
    x_nat = torch.cat([x1, x2])
    generator = torch.Generator().manual_seed(seed)
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-EPS, EPS, generator=generator)
    if clip_start:
        x_adv = x_adv.clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        z = model(x_adv) if branch is None else model(x_adv, branch=branch)
        (grad,) = torch.autograd.grad(nt_xent(z[:n], z[n:]), x_adv)
        delta = x_adv.detach() - x_nat
        delta = torch.clamp(delta + ALPHA * torch.sign(grad), -EPS, EPS)
        x_adv = torch.clamp(x_nat + delta, 0, 1)
    return x_adv[:n], x_adv[n:]


@pytest.mark.parametrize("clip_start", [True, False])
def test_pgd_contrastive_reproduces_the_reference_loop_exactly(clip_start):
    model = with_running_stats(SmallConvNet())
    x1, x2 = views()
    x1[0, 0, :2] = 0.0  # pixels at the box edge, where the unclipped start leaves [0, 1]
    expected = reference_pgd_contrastive(model, x1, x2, seed=3, clip_start=clip_start)
    model.train()
    actual = pgd_contrastive(model, x1, x2, generator=torch.Generator().manual_seed(3),
                             clip_random_start=clip_start)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_random_start_follows_the_generator():
    model = SmallConvNet()
    x1, x2 = views()
    run = lambda seed: pgd_contrastive(model, x1, x2, steps=1,
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(5)[0], run(5)[0])
    assert not torch.equal(run(5)[0], run(6)[0])
    no_start = lambda: pgd_contrastive(model, x1, x2, steps=1, random_start=False)
    assert torch.equal(no_start()[1], no_start()[1])


def test_without_random_start_the_inputs_are_untouched_and_the_budget_holds(classifier):
    model, x, y = classifier
    x1, x2 = views()
    copies = [t.clone() for t in (x, x1, x2)]
    x_adv = pgd(model, x, y, steps=8, random_start=False)
    x1_adv, x2_adv = pgd_contrastive(model, x1, x2, steps=8, random_start=False)
    for original, copy in zip((x, x1, x2), copies, strict=True):
        assert torch.equal(original, copy)
    for adversarial, clean in ((x_adv, x), (x1_adv, x1), (x2_adv, x2)):
        assert_in_budget(adversarial, clean)
        assert (adversarial - clean).abs().max() > EPS / 2  # and the attack did move


def test_published_start_is_not_clipped():
    x1 = torch.zeros(4, 3, 8, 8)  # every start pixel below 0 falls outside [0, 1] unclipped
    start = lambda clip: pgd_contrastive(SmallConvNet(), x1, x1.clone(), steps=0,
                                         clip_random_start=clip)[0]
    assert start(False).min() < 0
    assert start(True).min() >= 0


def test_dual_bn_model_gets_the_branch_and_plain_modules_are_called_plainly():
    model = with_running_stats(TinyDualBN())
    model.branches_seen.clear()
    x1, x2 = views()
    pgd_contrastive(model, x1, x2, steps=2)
    assert model.branches_seen == ["adv", "adv"]
    model.branches_seen.clear()
    x1_adv, _ = pgd_contrastive(model, x1, x2, steps=2, branch="normal",
                                generator=torch.Generator().manual_seed(0))
    assert model.branches_seen == ["normal", "normal"]
    expected, _ = reference_pgd_contrastive(model, x1, x2, seed=0, steps=2, branch="normal")
    assert torch.equal(x1_adv, expected)
    pgd_contrastive(SmallConvNet(), x1, x2, steps=1, branch="adv")  # no branch= for plain nets


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_dual_bn_is_recognised_behind_torch_compile():
    assert attacks._takes_branch(torch.compile(TinyDualBN()))  # compiles nothing until called
    assert not attacks._takes_branch(torch.compile(SmallConvNet()))
    assert attacks._takes_branch(nn.DataParallel(TinyDualBN()))


def test_bf16_autocast_attack_stays_in_budget_and_still_raises_the_loss(contrastive_model):
    model = contrastive_model
    x1, x2 = views(seed=100)
    x1_adv, x2_adv = pgd_contrastive(model, x1, x2, autocast_dtype=torch.bfloat16)
    assert_in_budget(x1_adv, x1)
    with torch.no_grad():
        assert nt_xent(model(x1_adv), model(x2_adv)) > nt_xent(model(x1), model(x2)) + 0.5
    with pytest.raises(ValueError, match="float16.*loss scaler"):
        pgd_contrastive(model, x1, x2, autocast_dtype=torch.float16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eps=8.0), r"eps must be in \(0, 1\], got 8.0: .* did you mean 8/255\?"),
        (dict(eps=0.0), r"eps must be in \(0, 1\], got 0.0"),
        (dict(steps=-1), "steps must be >= 0, got -1"),
        (dict(x1=torch.rand(8, 3, 8, 8) * 2 - 1), r"x1 must hold clean images .* in \[0, 1\], got"),
        (dict(x2=torch.full((8, 3, 8, 8), float("nan"))), "x2 must hold clean images"),
        (dict(x2=torch.rand(8, 3, 9, 9)), r"x2 has shape \(8, 3, 9, 9\) but x1 has \(8, 3, 8, 8\)"),
        (dict(x1=torch.rand(1, 3, 8, 8), x2=torch.rand(1, 3, 8, 8)), "N >= 2"),
    ],
)
def test_pgd_contrastive_rejects_bad_input(kwargs, message):
    x1, x2 = views()
    arguments = dict(model=SmallConvNet(), x1=x1, x2=x2) | kwargs
    with pytest.raises(ValueError, match=message):
        pgd_contrastive(**arguments)


def test_step_larger_than_eps_only_warns():
    with pytest.warns(UserWarning, match="larger than eps"):
        pgd_contrastive(SmallConvNet(), *views(), eps=EPS, step_size=1.25 * EPS, steps=1)


# ---- pgd (cross-entropy) and trades_perturb ----------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    """A net trained for a few steps on a separable toy task, so most points start correct;
    returns (model, x [16, 3, 8, 8], y)."""
    torch.manual_seed(0)
    model = SmallConvNet(out_features=10)
    y = torch.arange(16) % 10
    x = (0.3 + 0.4 * torch.rand(16, 3, 8, 8)) + 0.25 * (y.view(-1, 1, 1, 1) / 9 - 0.5)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x.clamp(0, 1), y


def test_pgd_raises_cross_entropy_and_reduces_accuracy(classifier):
    model, x, y = classifier
    x_adv = pgd(model, x, y, eps=EPS, step_size=ALPHA, steps=10)
    assert_in_budget(x_adv, x)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_rejects_bad_labels(classifier):
    model, x, y = classifier
    with pytest.raises(ValueError, match="y must be an integer class-index tensor"):
        pgd(model, x, y.float())
    with pytest.raises(ValueError, match=r"y must be \[N\] = \[16\]"):
        pgd(model, x, y[:3])


def test_trades_starts_at_small_gaussian_noise_and_raises_the_kl(classifier):
    model, x, _ = classifier
    start = trades_perturb(model, x, steps=0, generator=torch.Generator().manual_seed(0))
    noise = start - x
    inside = (x > 0.01) & (x < 0.99)  # where the [0, 1] clip does not cut the Gaussian
    assert math.isclose(noise[inside].std().item(), attacks.TRADES_START_STD, rel_tol=0.05)

    x_adv = trades_perturb(model, x, steps=5)
    assert_in_budget(x_adv, x)
    with torch.no_grad():
        p_natural = F.softmax(model(x), dim=1)
        kl = lambda x_: F.kl_div(F.log_softmax(model(x_), dim=1), p_natural, reduction="sum")
        assert kl(x_adv) > kl(start) + 1e-3


def test_trades_uses_the_natural_branch_for_the_target_and_adv_for_the_attack():
    model = with_running_stats(TinyDualBN(out_features=10))
    model.branches_seen.clear()
    trades_perturb(model, views()[0], steps=2)
    assert model.branches_seen == ["normal", "adv", "adv"]


# ---- robust accuracy ---------------------------------------------------------------------------

class ThresholdClassifier(nn.Module):
    """Class 1 if the mean pixel exceeds 0.5, else class 0 (two logits)."""

    def forward(self, x):
        score = x.flatten(1).mean(dim=1) - 0.5
        return torch.stack([-score, score], dim=1)


def test_a_point_is_robust_only_if_correct_clean_and_under_attack():
    model = ThresholdClassifier()
    x = torch.tensor([0.2, 0.8, 0.2, 0.8]).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    y = torch.tensor([0, 1, 1, 0])  # the last two are wrong on the clean input
    flip = lambda model, x, y: 1 - x  # an "attack" that flips every prediction
    keep = lambda model, x, y: x
    assert is_robust(model, x, y, flip(model, x, y)).tolist() == [False, False, False, False]
    assert is_robust(model, x, y, keep(model, x, y)).tolist() == [True, True, False, False]
    # The flip "fixes" the two wrong points; they still do not count: robust <= clean.
    assert robust_accuracy(model, x, y, attack=flip) == 0.0
    assert robust_accuracy(model, x, y, attack=keep, batch_size=3) == 0.5


def test_robust_accuracy_pgd20_is_at_most_clean_accuracy(classifier):
    model, x, y = classifier
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    robust = robust_accuracy(model, x, y, generator=torch.Generator().manual_seed(0))
    assert robust <= clean
    with pytest.raises(ValueError, match="attack must be 'pgd20', 'autoattack' or a callable"):
        robust_accuracy(model, x, y, attack="fgsm")


def test_robust_accuracy_takes_uint8_images_and_shows_progress(classifier):
    model, x, y = classifier
    pixels = (x * 255).round().to(torch.uint8)
    seeded = lambda: torch.Generator().manual_seed(3)
    from_uint8 = robust_accuracy(model, pixels, y, eps=EPS, batch_size=5, generator=seeded(),
                                 progress=True)
    assert from_uint8 == robust_accuracy(model, pixels.float() / 255, y, eps=EPS, batch_size=5,
                                         generator=seeded())
    # PGD-20 is 20 steps of eps / 4 from the generator's random start, chunk after chunk.
    expected = torch.cat([
        is_robust(model, xb, yb, pgd(model, xb, yb, eps=EPS, step_size=EPS / 4, steps=20,
                                     generator=generator))
        for generator in [seeded()] for xb, yb in zip((pixels.float() / 255).split(5),
                                                      y.split(5), strict=True)])
    assert from_uint8 == expected.float().mean().item()


# ---- AutoAttack --------------------------------------------------------------------------------

def test_autoattack_custom_subset_is_seeded_and_leaves_the_global_rng_alone(classifier):
    model, (x, y) = classifier[0], (t[:8] for t in classifier[1:])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run = lambda: autoattack(model, x, y, version="custom", attacks=["apgd-ce"], seed=0)
    first, second = run(), run()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.x_adv, second.x_adv)
    assert first.robust_accuracy == second.robust_accuracy
    assert list(first.per_attack) == ["apgd-ce"]
    assert_in_budget(first.x_adv, x)
    assert not (first.robust & ~is_robust(model, x, y, x)).any()  # robust implies clean-correct
    with pytest.raises(ValueError, match="attacks= is for version='custom' only"):
        autoattack(model, x, y, attacks=["apgd-ce"])


def test_autoattack_standard_on_a_tiny_model(classifier):
    # At 5/255 APGD-CE breaks some of the 8 points and leaves the rest to the later attacks.
    model, (x, y) = classifier[0], (t[:8] for t in classifier[1:])
    eps = 5 / 255
    result = autoattack(model, x, y, eps=eps, version="standard", batch_size=4)
    assert list(result.per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    figures = [result.clean_accuracy, *result.per_attack.values()]
    assert figures == sorted(figures, reverse=True)  # each attack only removes robust points
    assert figures[0] > figures[1] > 0  # the cascade really ran past the first attack
    assert result.robust_accuracy == figures[-1] == result.robust.float().mean().item()
    assert torch.equal(result.robust, is_robust(model, x, y, result.x_adv))
    assert_in_budget(result.x_adv, x, eps)


class GradientMaskedClassifier(nn.Module):
    """Provably defeats PGD but not a query attack: logits depend on x only through
    round(255 x) / 255, whose gradient is exactly 0, so PGD's sign(grad) = 0 never moves it
    from its random start. Class 1 wins once the mean pixel rises by eps / 2; a uniform random
    start moves the mean of 192 pixels by ~eps / 24 (12 standard deviations short), while the
    corner x + eps (reachable by Square Attack's +-eps patches) moves it by eps."""

    def forward(self, x):
        quantised = torch.round(x * 255) / 255
        shift = quantised.flatten(1).mean(dim=1) - 0.5
        # Class 1 is always the runner-up, so the margin Square Attack minimises tracks shift.
        logit_1 = 100 * (shift - EPS / 2)
        others = -100.0 - torch.arange(8.0).expand(x.shape[0], 8)
        return torch.cat([torch.zeros_like(logit_1)[:, None], logit_1[:, None], others], dim=1)


def test_autoattack_finds_what_pgd20_provably_cannot():
    model = GradientMaskedClassifier()
    x = 0.5 + 0.05 * (2 * torch.rand(8, 3, 8, 8) - 1)
    y = torch.zeros(8, dtype=torch.long)
    probe = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    assert torch.count_nonzero(grad) == 0  # why PGD cannot move

    pgd20 = robust_accuracy(model, x, y, attack="pgd20")
    result = autoattack(model, x, y, version="standard")
    assert pgd20 == 1.0 and result.clean_accuracy == 1.0
    assert result.robust_accuracy < pgd20
    assert result.per_attack["square"] == result.robust_accuracy == 0.0  # it was Square
    assert_in_budget(result.x_adv, x)
