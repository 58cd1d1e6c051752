"""--fidelity released: fastacl computes what the authors' released code computes.

Each test re-states the released code's computation in float64, here, from the published
formulas and the released code's documented choices (docs/fidelity.md): no code of theirs is
imported or copied. The re-statement works on the released code's layout (the two views of each
image interleaved, one 2N batch), fastacl on its own (view 1 then view 2), so agreement is not
an identity of code paths. Same weights, same views, same random starts (drawn from the same
generator), float64 throughout: losses and gradients agree to 1e-12 relative, attack iterates to
1e-12 absolute.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastacl
from fastacl import TrainConfig
from fastacl.attacks import pgd_contrastive
from fastacl.models import build_model, load_checkpoint
from fastacl.models.folded import FoldedResNet18
from fastacl.pretrain import loss_for, train_step
from fastacl.pretrain.momentum import MomentumPair
from fastacl.pretrain.schedule import dynacl_weight, learning_rate
from fastacl.pretrain.step import attack_model
from tests.conftest import relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE, T = 6, 8, 0.5
EPS, ALPHA, STEPS = 0.15, 0.05, 5


# ---- the re-statement of the released code (float64, interleaved views) ---------------------

def interleave(a, b):
    """[a_0, b_0, a_1, b_1, ...]: the released loaders' layout of a batch of pairs."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def released_nt_xent(features, t=T, subtract_self=False):
    """NT-Xent over interleaved pairs (2k, 2k + 1): the mean over the 2N anchors of
    -log(exp(s_pos / t) / sum over every other row of exp(s / t)), cosine similarities.
    subtract_self: the DynACL code's form, which sums every row and subtracts exp(1 / t) for the
    anchor itself (cos(z, z) = 1 up to rounding)."""
    z = F.normalize(features, dim=1)
    sim = z @ z.t() / t
    n = sim.shape[0]
    partner = torch.arange(n) ^ 1  # 2k <-> 2k + 1
    if subtract_self:
        denominator = sim.exp().sum(1) - torch.tensor(1 / t, dtype=sim.dtype).exp()
        return (denominator.log() - sim[torch.arange(n), partner]).mean()
    others = ~torch.eye(n, dtype=torch.bool)
    log_denominator = torch.logsumexp(sim.masked_fill(~others, float("-inf")), dim=1)
    return (log_denominator - sim[torch.arange(n), partner]).mean()


def released_pgd(forward, x, delta, steps=STEPS, loss=released_nt_xent):
    """The released PGD on the perturbation: unclipped start x + delta, then per step
    delta += alpha sign(grad), delta <- clip(delta, -eps, eps), delta <- clip(x + delta, 0, 1) - x.
    Returns every iterate x + delta (after each step)."""
    iterates = []
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(forward(x + delta)), delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
        iterates.append(x + delta)
    return iterates


def _diag_softmax(a, b, t=T):
    """softmax over the batch of the matched-pair similarities sim(a_k, b_k) / t."""
    return F.softmax((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1) / t, dim=0)


def released_air_code_loss(zi, zj, z_orig, zi_adv, zj_adv, w, lambda1, lambda2):
    """The AIR code's objective: (1 - w) NTX + (1 + w) NTX_adv + lambda1 SIR + lambda2 AIR, with
    its KL terms as F.kl_div(P_i, log P_j, log_target=True) computes them: the input is the
    probability itself, not its log, so SIR = sum P_j (log P_j - P_i), AIR likewise on
    R_u = A_u * C_u (docs/acl-air.md section 6, reference-code form)."""
    natural = released_nt_xent(interleave(zi, zj))
    adversarial = released_nt_xent(interleave(zi_adv, zj_adv))
    total = (1 - w) * natural + (1 + w) * adversarial
    p_i, p_j = _diag_softmax(zi, z_orig), _diag_softmax(zj, z_orig)
    r_i = _diag_softmax(zi_adv, z_orig) * _diag_softmax(zi_adv, zi)
    r_j = _diag_softmax(zj_adv, z_orig) * _diag_softmax(zj_adv, zj)
    sir = (p_j * (p_j.log() - p_i)).sum()
    air = (r_j * (r_j.log() - r_i)).sum()
    return total + lambda1 * sir + lambda2 * air


# ---- fixtures --------------------------------------------------------------------------------

def _model(dual_bn=True):
    torch.manual_seed(0)
    return build_model("resnet18-small", width=4, head_dim=8, in_channels=1,
                       dual_bn=dual_bn).double()


def _views(seed=1):
    g = torch.Generator().manual_seed(seed)
    x_orig, x1, x2 = (torch.rand(N, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
                      for _ in range(3))
    return x_orig, x1, x2


def _cfg(method, fidelity="released", **options):
    values = dict(method=method, fidelity=fidelity, dataset="mnist5k", batch_size=N, eps=EPS,
                  step_size=ALPHA, attack_steps=STEPS, device="cpu", evaluate=False,
                  fold_bn=False)
    return TrainConfig.from_options(**{**values, **options}).resolve()


def _start(x1, x2, seed):
    """The random start fastacl's pgd_contrastive draws from `seed`: one [2N, ...] uniform
    tensor, view 1 first."""
    return torch.empty(2 * N, 1, SIZE, SIZE, dtype=torch.float64).uniform_(
        -EPS, EPS, generator=torch.Generator().manual_seed(seed)).chunk(2)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(ours, theirs, tol=1e-10):
    """Every tensor's gradient within tol of the whole gradient's norm (head.fc1.bias feeds a
    train-mode BN: its true gradient is 0 and both sides hold rounding noise of ~1e-16)."""
    assert ours.keys() == theirs.keys()
    scale = torch.cat([g.flatten() for g in theirs.values()]).norm()
    for name, grad in theirs.items():
        assert (ours[name] - grad).norm() <= tol * max(grad.norm(), scale), name


class _NoUpdate(torch.optim.SGD):
    """An optimizer that leaves the weights alone, so the step's gradients can be read."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)


# ---- the tests -------------------------------------------------------------------------------

def test_released_and_corrected_settings():
    released, corrected = _cfg("acl-air"), _cfg("acl-air", "corrected")
    assert (released.loss.air_form, released.attack.clip_random_start) == ("reference-code", False)
    assert (corrected.loss.air_form, corrected.attack.clip_random_start) == ("exact", True)
    c = _cfg("acl", coreset="rcs").coreset
    assert (c.simulated_steps, c.budget_rounding, c.validation_handling) == (
        2, "floor", "released-half")
    dynacl = _cfg("dynacl")
    assert dynacl.model.momentum_encoder and dynacl.loss.scale == 0.5
    assert (dynacl.loss.w_timing, dynacl.optim.lr_schedule, dynacl.data.interpolation) == (
        "released", "epoch", "bilinear")
    # the AIR code's DynACL (DynACL-AIR) has none of the DynACL code's choices
    dynacl_air = _cfg("dynacl-air")
    assert not dynacl_air.model.momentum_encoder and dynacl_air.loss.scale == 1.0
    assert dynacl_air.data.interpolation == "bicubic"
    # an explicit option overrides the switch
    explicit = _cfg("acl-air", air_form="exact", clip_random_start=True)
    assert (explicit.loss.air_form, explicit.attack.clip_random_start) == ("exact", True)


def test_a_config_saved_before_the_switch_keeps_what_it_ran():
    saved = _cfg("dynacl", "corrected").to_dict()
    del saved["fidelity"]
    for section in ("model", "loss", "optim"):
        for key in ("momentum_encoder", "w_timing", "scale", "lr_schedule"):
            saved[section].pop(key, None)
    old = TrainConfig.from_dict(saved).resolve()
    assert old.fidelity == "corrected" and not old.model.momentum_encoder


@pytest.mark.parametrize("fidelity, clipped", [("released", False), ("corrected", True)])
def test_attack_iterates_are_the_released_pgd(fidelity, clipped):
    """The 5-step attack: every iterate of fastacl's attack equals the released PGD's from the
    same start (released: the start unclipped, as their code runs it)."""
    model = _model().eval()
    _, x1, x2 = _views()
    d1, d2 = _start(x1, x2, seed=7)
    cfg = _cfg("acl", fidelity)
    ours = [torch.cat(pgd_contrastive(
        model, x1, x2, eps=EPS, step_size=ALPHA, steps=k, branch="adv",
        generator=torch.Generator().manual_seed(7),
        clip_random_start=cfg.attack.clip_random_start)) for k in range(1, STEPS + 1)]
    x, delta = interleave(x1, x2), interleave(d1, d2)
    if clipped:  # the corrected start x + delta is clipped to [0, 1] first
        delta = (x + delta).clamp(0, 1) - x
    theirs = released_pgd(lambda v: model(v, branch="adv"), x, delta)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a = interleave(*a.chunk(2))
        assert (a - b).abs().max() < 1e-12, f"step {k + 1}"
    assert not clipped or ours[0].min() >= 0


@pytest.mark.parametrize("method, w", [("acl", 0.0), ("acl-air", 0.0), ("dynacl-air", 0.3)])
def test_air_code_step_losses_and_gradients(method, w):
    """ACL, ACL-AIR, DynACL-AIR as the AIR code trains them: attack from the same start, the
    three train-mode forwards, its objective; the loss and every parameter gradient agree."""
    cfg = _cfg(method)
    x_orig, x1, x2 = _views()
    ours_model, their_model = _model(), _model()
    loss_fn = loss_for(cfg)
    loss_fn.weight_w = w
    terms = train_step(ours_model.train(), loss_fn, _NoUpdate(ours_model.parameters()),
                       x_orig, x1, x2, cfg, torch.Generator().manual_seed(3))

    d1, d2 = _start(x1, x2, seed=3)
    x = interleave(x1, x2)
    their_model.eval()
    x_adv = released_pgd(lambda v: their_model(v, branch="adv"), x, interleave(d1, d2))[-1]
    their_model.train()
    features_adv = their_model(x_adv, branch="adv")
    features = their_model(x, branch="normal")
    z_orig = their_model(x_orig, branch="normal")
    lambdas = cfg.loss.lambda1, cfg.loss.lambda2
    loss = released_air_code_loss(features[0::2], features[1::2], z_orig, features_adv[0::2],
                                  features_adv[1::2], w, *lambdas)
    their_model.zero_grad()
    loss.backward()

    assert relative_error(terms["total"], loss.detach()) < 1e-12
    _assert_same_gradients(_grads(ours_model), _grads(their_model))
    for name, buffer in their_model.state_dict().items():  # BN running statistics
        assert relative_error(ours_model.state_dict()[name], buffer) < 1e-12, name


def test_dynacl_code_step_with_its_momentum_encoder():
    """DynACL as the DynACL code trains it: view 1 through the online encoder q, view 2 through
    the momentum encoder k, in the attack (eval mode) and in the two train-mode forwards; then
    k <- 0.99 k + 0.01 q; the loss ((2 - a) NTX + a NTX_adv) / 2 with a = 1 + w."""
    cfg = _cfg("dynacl")
    w = 0.4
    x_orig, x1, x2 = _views()
    pair = MomentumPair(_model(), cfg.model.momentum)
    with torch.no_grad():  # k a little apart from q, as after some training
        for p in pair.momentum.parameters():
            p.mul_(0.9)
    q, k = copy.deepcopy(pair.online), copy.deepcopy(pair.momentum)
    loss_fn = loss_for(cfg)
    loss_fn.weight_w = w
    terms = train_step(pair.train(), loss_fn, _NoUpdate(pair.online.parameters()), x_orig, x1,
                       x2, cfg, torch.Generator().manual_seed(5))

    def swap(v, branch):  # the released pair's forward of an interleaved batch
        out = torch.empty(v.shape[0], 8, dtype=v.dtype)
        out[0::2], out[1::2] = q(v[0::2], branch=branch), k(v[1::2], branch=branch)
        return out

    d1, d2 = _start(x1, x2, seed=5)
    x = interleave(x1, x2)
    q.eval(), k.eval()
    x_adv = released_pgd(lambda v: swap(v, "adv"), x, interleave(d1, d2),
                         loss=lambda f: released_nt_xent(f, subtract_self=True))[-1]
    q.train(), k.train()
    features_adv, features = swap(x_adv, "adv"), swap(x, "normal")
    with torch.no_grad():
        for p_q, p_k in zip(q.parameters(), k.parameters(), strict=True):
            p_k.copy_(p_k * 0.99 + p_q * 0.01)
    a = 1 + w
    loss = (released_nt_xent(features, subtract_self=True) * (2 - a)
            + released_nt_xent(features_adv, subtract_self=True) * a) / 2
    loss.backward()

    assert relative_error(terms["total"], loss.detach()) < 1e-12
    _assert_same_gradients(_grads(pair.online), _grads(q))
    assert all(p.grad is None for p in pair.momentum.parameters())
    for name, value in k.state_dict().items():  # momentum weights and k's own BN statistics
        assert relative_error(pair.momentum.state_dict()[name], value) < 1e-12, name


def test_attack_model_of_a_momentum_pair_folds_each_encoder():
    cfg = _cfg("dynacl", fold_bn=True)
    pair = MomentumPair(build_model("resnet18-small", width=4, head_dim=8, in_channels=1))
    _, x1, x2 = (v.float() for v in _views())
    pair.eval()
    folded = attack_model(pair, cfg)
    assert isinstance(folded.first, FoldedResNet18) and isinstance(folded.second, FoldedResNet18)
    x = torch.cat([x1, x2])
    assert relative_error(folded(x, branch="adv"), pair(x, branch="adv")) < 1e-5


def test_dynacl_code_schedules():
    """w steps at floor(e / K) (one epoch before s changes); the LR steps once per epoch:
    warm-up lr (e + 1) / W, then the cosine at (e - W) / (E - W), e = epoch - 1."""
    cfg = _cfg("dynacl", epochs=1000, dynaug_period=50, warmup_epochs=10, lr=5.0)
    strength = 1.0  # s(49) = s(50) = 1: the released w has already moved at epoch 50
    assert dynacl_weight(cfg, strength, 49) == 0.0
    assert dynacl_weight(cfg, strength, 50) == pytest.approx(2 / 3 * 50 / 1000)
    assert dynacl_weight(cfg, 0.05, 1000) == pytest.approx(2 / 3)
    paper = _cfg("dynacl", "corrected", epochs=1000, dynaug_period=50)
    assert dynacl_weight(paper, strength, 50) == 0.0
    steps = 7
    for epoch in (1, 5, 10, 11, 500, 1000):
        e = epoch - 1
        expected = (5.0 * (e + 1) / 10 if e < 10 else
                    1e-6 + (5.0 - 1e-6) * 0.5 * (1 + math.cos((e - 10) / 990 * math.pi)))
        for step in (0, 3, 6):  # constant within the epoch
            iteration = e * steps + step
            assert learning_rate(cfg, iteration, steps) == pytest.approx(expected, rel=1e-12)


def test_released_dynacl_run_keeps_k_and_resumes_exactly(tmp_path):
    """A released DynACL run keeps the momentum encoder k (the checkpoint says so; q travels in
    the train state), and an interrupted run resumes to the uninterrupted one's q and k."""
    common = dict(method="dynacl", epochs=2, seed=3, dataset="mnist5k", max_train=64,
                  batch_size=16, model="resnet18-small", attack_steps=1, evaluate=False)
    full = fastacl.train(out_dir=str(tmp_path / "full"), **common)
    checkpoint = load_checkpoint(full.checkpoint)
    assert checkpoint["extra"]["kept_encoder"] == "momentum"
    stopped = fastacl.train(out_dir=str(tmp_path / "cut"),
                            on_step=lambda epoch, step, terms: (epoch, step) == (2, 0), **common)
    assert stopped.summary == {"interrupted": True}
    resumed = load_checkpoint(fastacl.train(resume=tmp_path / "cut").checkpoint)
    online = checkpoint["extra"]["train_state"]["online_state_dict"]
    for saved, again in ((checkpoint["state_dict"], resumed["state_dict"]),
                         (online, resumed["extra"]["train_state"]["online_state_dict"])):
        assert saved.keys() == again.keys()
        for key in saved:
            torch.testing.assert_close(again[key], saved[key], rtol=0, atol=1e-6, msg=key)
    # k is not q: it trails it
    assert not torch.equal(online["head.fc1.weight"], checkpoint["state_dict"]["head.fc1.weight"])


# ---- RCS: the released selection picks the released code's minibatches ----------------------

def _rowmean(grads):
    """The released reduction of each head Linear gradient: the mean over output units."""
    return torch.cat([g.mean(0).reshape(-1) for g in grads])


def _minmax_kl(z_adv, z_nat):
    """RD's divergence: rows min-max normalised to [0, 1], + 1e-8, KL(adv || nat) averaged."""
    def normalised(z):
        low, high = z.min(1, keepdim=True).values, z.max(1, keepdim=True).values
        return (z - low) / (high - low + 1e-12)

    q, p = normalised(z_adv) + 1e-8, normalised(z_nat) + 1e-8
    return (q * (q.log() - p.log())).mean()


def test_released_rcs_picks_the_released_minibatches(monkeypatch):
    """One selection round with the released options (batch granularity, U re-attacked after
    every pick, the simulated step applied twice, the budget floored to whole minibatches, the
    first half of U's minibatch twice, unclipped starts), float64, against a re-statement of the
    released greedy: G_b = the head gradient of minibatch b's ACL loss at phi0, r_b its row-mean;
    v = the row-mean of the gradient of RD(U) at the current head; pick argmax <r_b, v>, then
    phi <- phi - eta' G_b twice, re-attack U, recompute v. The attacks' images are observed
    (they are pinned above); everything else is recomputed here."""
    import fastacl.coreset as coreset
    from fastacl.data import DeviceDataset, load_dataset

    pool_attacks, u_attacks = [], []
    pgd, rd = coreset.pgd_contrastive, coreset.rd_attack

    def pgd_spy(model, x1, x2, **kwargs):
        out = pgd(model, x1, x2, **kwargs)
        pool_attacks.append((x1, x2, *out))
        return out

    def rd_spy(model, x, **kwargs):
        out = rd(model, x, **kwargs)
        u_attacks.append((x, out))
        return out

    monkeypatch.setattr(coreset, "pgd_contrastive", pgd_spy)
    monkeypatch.setattr(coreset, "rd_attack", rd_spy)
    images, _ = load_dataset("mnist5k", None, split="train")
    dataset = DeviceDataset(images[:96])
    pool, validation = coreset.validation_split(96, seed=0)
    c = _cfg("acl", coreset="rcs", epochs=10).coreset
    batch, lr = 8, 50.0  # a large eta' so that the refreshes change the order
    torch.manual_seed(0)
    model = build_model("resnet18-small", in_channels=1, width=4, head_dim=8).double()
    selection = coreset.select_coreset(
        model, dataset, pool, validation, 0.4, batch_size=batch, eps=EPS, step_size=ALPHA,
        attack_steps=2, granularity="batch", refresh="exact", simulated_lr=lr,
        simulated_steps=c.simulated_steps, budget_rounding=c.budget_rounding,
        validation_handling=c.validation_handling, clip_random_start=False,
        generator=torch.Generator().manual_seed(0),
        attack_generator=torch.Generator().manual_seed(0), fold_bn=False, progress=False)

    model.eval()
    names = [f"{n}.{p}" for n, m in model.head.named_modules() if isinstance(m, torch.nn.Linear)
             for p, _ in m.named_parameters()]
    phi0 = {n: p.detach().clone() for n, p in model.head.named_parameters() if n in names}

    def features(x, branch):
        with torch.no_grad():
            return model.backbone(x, branch=branch)

    def head(f, branch, params):
        return torch.func.functional_call(model.head, params, (f,), {"branch": branch})

    def head_gradient(loss_of_params, params):
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        return torch.autograd.grad(loss_of_params(params), [params[n] for n in names])

    G, r = [], []
    for x1, x2, x1_adv, x2_adv in pool_attacks:
        f_adv = features(torch.cat([x1_adv, x2_adv]), "adv")
        f_nat = features(torch.cat([x1, x2]), "normal")

        def acl(params, f_adv=f_adv, f_nat=f_nat):
            z_adv, z_nat = head(f_adv, "adv", params), head(f_nat, "normal", params)
            return 0.5 * (nt_xent_ref(*z_nat.chunk(2)) + nt_xent_ref(*z_adv.chunk(2)))

        G.append(head_gradient(acl, phi0))
        r.append(_rowmean(G[-1]))
    r = torch.stack(r)
    picks_wanted = round(0.4 * pool.numel()) // batch  # the floored budget
    phi, picks = dict(phi0), []
    assert len(u_attacks) == picks_wanted  # one attack on U per pick (none after the last)
    for x_u, x_u_adv in u_attacks:
        assert x_u.shape[0] == 2 * ((validation.numel() + 1) // 2)  # first half, twice
        v = _rowmean(head_gradient(lambda params, x_u=x_u, x_u_adv=x_u_adv: _minmax_kl(
            head(features(x_u_adv, "adv"), "adv", params),
            head(features(x_u, "normal"), "normal", params)), phi))
        gains = r @ v
        gains[picks] = float("-inf")
        picks.append(int(gains.argmax()))
        for _ in range(2):  # the released code applies the simulated step twice
            phi = {n: phi[n] - lr * g for n, g in zip(names, G[picks[-1]], strict=True)}
    assert selection.picks == picks
    assert selection.indices.numel() == picks_wanted * batch
    # the refreshes matter here: the released order is not the first gains' top-k
    assert picks != selection.initial_gains.topk(picks_wanted).indices.tolist()


def nt_xent_ref(a, b, t=T):
    """NT-Xent of two view sets (row k of each a positive pair), from the formula."""
    return released_nt_xent(interleave(a, b), t)


def test_released_floored_budget_can_leave_less_than_a_batch(tmp_path):
    """The released budget floors to whole minibatches, and the pick may be the pool's short last
    one: the coreset epoch is then one smaller batch, not an empty epoch."""
    result = fastacl.train(out_dir=str(tmp_path / "run"), epochs=2, coreset="rcs", max_train=128,
                           batch_size=16, attack_steps=1, evaluate=False)
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    second = json.loads(lines[1])
    # 120-image pool, budget round(0.2 * 120) = 24, floored to 1 minibatch: the 8-image one
    assert second["coreset_size"] == second["train_images"] == 8
    assert math.isfinite(second["total"])
