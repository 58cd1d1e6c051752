"""fastacl.coreset (docs/rcs.md section 3) and its trainer integration: the budget, the
validation split, the gradients RCS projects, the greedy order, the random baseline, bad input,
and resumable coreset runs."""

import gc
import json
import weakref

import pytest
import torch
from torch import nn

import fastacl.coreset as coreset
from fastacl import pretrain
from fastacl.config import TrainConfig
from fastacl.coreset import (
    _chunk_budgets,
    _element_gradient,
    _head_pairs,
    _validation_projection,
    coreset_budget,
    head_linear_layers,
    random_coreset,
    rd_attack,
    representational_divergence,
    select_coreset,
    validation_split,
)
from fastacl.data import DeviceDataset, load_dataset
from fastacl.models import bn_branch, build_model, load_checkpoint
from fastacl.models.folded import folded_for_attack
from fastacl.ops import nt_xent, rcs_project
from tests.conftest import relative_error

N_IMAGES, BATCH = 96, 16
# A tiny trainer run: 128 demo images (U = 8, pool 120), batches of 16, 1 PGD step.
# The corrected setting: an exact budget of round(k N) images (the released one floors it to
# whole minibatches; tests/test_fidelity.py pins that).
TINY = dict(max_train=128, batch_size=16, attack_steps=1, evaluate=False, fidelity="corrected")


pytestmark = pytest.mark.usefixtures("one_thread")  # the CPU is shared


@pytest.fixture(scope="module")
def dataset():
    images, _ = load_dataset("mnist5k", None, split="train")
    return DeviceDataset(images[:N_IMAGES])


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18-small", in_channels=1, width=4, head_dim=16)


def _select(model, dataset, seed=0, **kwargs):
    pool, validation = validation_split(N_IMAGES, seed=seed)
    options = dict(batch_size=BATCH, eps=0.15, step_size=0.05, attack_steps=1,
                   generator=torch.Generator().manual_seed(seed),
                   attack_generator=torch.Generator().manual_seed(seed))
    options.update(kwargs)
    return pool, validation, select_coreset(model, dataset, pool, validation, 0.2, **options)


# ---- budget, split, random baseline --------------------------------------------------------------

def test_budget_and_validation_split():
    assert coreset_budget(0.2, 4950) == 990 and coreset_budget(0.05, 49500) == 2475
    assert coreset_budget(0.25, 10) == 3  # round half up: 2.5 -> 3
    pool, validation = validation_split(5000, seed=0)
    assert validation.numel() == 50 and pool.numel() == 4950  # 1%
    assert torch.equal(torch.cat([pool, validation]).sort().values, torch.arange(5000))
    again, _ = validation_split(5000, seed=0)
    other, _ = validation_split(5000, seed=1)
    assert torch.equal(pool, again) and not torch.equal(pool, other)
    assert validation_split(100, seed=0)[1].numel() == 8  # at least a handful
    assert validation_split(100, 0.0)[1].numel() == 0


def test_random_baseline_has_exactly_the_budget():
    pool = torch.arange(3, 1003)
    subset = random_coreset(pool, 0.2, torch.Generator().manual_seed(0))
    assert subset.numel() == 200 and subset.unique().numel() == 200
    assert torch.isin(subset, pool).all()
    assert torch.equal(subset, random_coreset(pool, 0.2, torch.Generator().manual_seed(0)))


# ---- one selection round -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "granularity, refresh, divergence",
    [("batch", "exact", "minmax-kl"), ("batch", "cached", "softmax-kl"),
     ("sample", "cached", "minmax-kl"), ("sample", "exact", "softmax-kl")],
)
def test_selection_returns_the_budget_unique_and_none_from_u(dataset, granularity, refresh,
                                                             divergence):
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool, validation, selection = _select(model, dataset, granularity=granularity,
                                          refresh=refresh, refresh_every=3,
                                          divergence=divergence)
    indices = selection.indices
    assert selection.budget == coreset_budget(0.2, pool.numel()) == 18
    assert indices.numel() == 18 and indices.unique().numel() == 18
    assert torch.isin(indices, pool).all() and not torch.isin(indices, validation).any()
    expected_picks = 2 if granularity == "batch" else 18  # ceil(18 / 16) minibatches
    assert len(selection.picks) == expected_picks
    # The model comes back exactly as it was: head restored, training flags and grads kept.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fold_bn", [False, True])
def test_bf16_selection_autocasts_the_pool_pass_and_keeps_the_budget(dataset, fold_bn):
    model = _model().train()
    dtypes = []
    if fold_bn:  # the round runs the folded mirrors (cached per model and branch)
        convs = [folded_for_attack(model, branch).stem for branch in ("normal", "adv")]
    else:
        convs = [next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))]
    for conv in convs:
        conv.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool, validation, selection = _select(model, dataset, autocast_dtype=torch.bfloat16,
                                          fold_bn=fold_bn)
    assert torch.bfloat16 in dtypes  # the pool pass (attack and features)
    assert torch.float32 in dtypes  # U's attack and features stay fp32
    indices = selection.indices
    assert indices.numel() == selection.budget == 18 and indices.unique().numel() == 18
    assert torch.isin(indices, pool).all() and not torch.isin(indices, validation).any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_folded_round_selects_what_the_unfolded_round_selects(dataset, granularity):
    """Folding the eval-mode BN changes only float rounding: the same gains and picks."""
    model = _model().train()
    results = [_select(model, dataset, granularity=granularity, fold_bn=fold_bn)[2]
               for fold_bn in (False, True)]
    unfolded, folded = results
    # (A sign flip of a near-zero input gradient in an attack moves the gains by ~0.2% here.)
    assert relative_error(unfolded.initial_gains, folded.initial_gains) < 1e-2
    assert unfolded.picks == folded.picks
    assert torch.equal(unfolded.indices, folded.indices)


def test_published_flooring_takes_whole_minibatches(dataset):
    model = _model()
    pool, validation = validation_split(N_IMAGES, seed=0)
    selection = select_coreset(model, dataset, pool, validation, 0.4, batch_size=BATCH,
                               eps=0.15, step_size=0.05, attack_steps=1,
                               budget_rounding="floor")
    assert selection.budget == 35 and len(selection.picks) == 2  # 35 // 16
    assert selection.indices.numel() == sum(selection.elements[e].numel()
                                            for e in selection.picks)


# ---- chunks of minibatches (the authors' ImageNet recipe) ---------------------------------------
# The pool of 88 images is 6 minibatches of 16 (the last of 8); chunks of 2 are 32, 32, 24 images.

@pytest.mark.parametrize(
    "granularity, refresh, rounding",
    [("sample", "cached", "truncate"), ("batch", "exact", "truncate"),
     ("batch", "cached", "floor")],
)
def test_one_chunk_is_the_unchunked_round(dataset, granularity, refresh, rounding):
    options = dict(granularity=granularity, refresh=refresh, refresh_every=3,
                   budget_rounding=rounding)
    fraction = 0.4 if rounding == "floor" else 0.2
    model = _model()
    pool, validation = validation_split(N_IMAGES, seed=0)

    def select(**chunking):
        return select_coreset(model, dataset, pool, validation, fraction, batch_size=BATCH,
                              eps=0.15, step_size=0.05, attack_steps=1,
                              generator=torch.Generator().manual_seed(0),
                              attack_generator=torch.Generator().manual_seed(0),
                              **options, **chunking)

    unchunked = select()
    for chunk_batches in (6, 1000):  # every minibatch in one chunk
        chunked = select(chunk_batches=chunk_batches)
        assert chunked.details["chunk_elements"] == [len(unchunked.elements)]
        assert chunked.picks == unchunked.picks
        assert torch.equal(chunked.indices, unchunked.indices)
        assert torch.equal(chunked.initial_gains, unchunked.initial_gains)
        assert list(chunked.elements) and all(
            torch.equal(a, b) for a, b in zip(chunked.elements, unchunked.elements, strict=True))


def test_chunk_budgets_add_up_to_the_budget():
    # Largest remainder: 18 x (32, 32, 24) / 88 = 6.55, 6.55, 4.91 -> 6, 6, 4 and the two
    # leftover images to the largest remainders (chunk 3, then chunk 1 before chunk 2).
    assert _chunk_budgets([32, 32, 24], [2, 2, 2], 18, 16, floor=False) == [
        (7, None), (6, None), (5, None)]
    assert _chunk_budgets([88], [6], 18, 16, floor=False) == [(18, None)]  # one chunk: all
    # No share exceeds its chunk, even for a budget of most of the pool.
    # 8 x (2, 2, 2, 3) / 9 = 1.78, 1.78, 1.78, 2.67 -> 1, 1, 1, 2 + one each to the first three.
    assert _chunk_budgets([2, 2, 2, 3], [1, 1, 1, 1], 8, 2, floor=False) == [(2, None)] * 4
    # ImageNet-1K at k = 0.05 in chunks of 100 minibatches of 512: 1,281,167 images are 2,503
    # minibatches (the last of 143), 25 chunks of 51,200 images and one of 1,167.
    images, minibatches = [51_200] * 25 + [1_167], [100] * 25 + [3]
    budget = coreset_budget(0.05, 1_281_167)
    truncated = _chunk_budgets(images, minibatches, budget, 512, floor=False)
    assert budget == 64_058 and sum(s for s, _ in truncated) == budget
    assert {s for s, _ in truncated[:25]} == {2_560} and truncated[25] == (58, None)
    # The release's flooring, int((budget / B) * (len(chunk) / len(loader))): 4 minibatches per
    # chunk and none from the last, 100 x 512 = 51,200 images (4.0% instead of 5%).
    floored = _chunk_budgets(images, minibatches, budget, 512, floor=True)
    assert [k for _, k in floored] == [4] * 25 + [0]
    assert _chunk_budgets([88], [6], 35, 16, floor=True) == [(35, 2)]  # unchunked: 35 // 16
    with pytest.raises(ValueError, match="keeps no minibatch"):
        _chunk_budgets([32, 32, 24], [2, 2, 2], 18, 16, floor=True)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_chunked_round_picks_each_chunk_share_within_the_chunk(dataset, granularity):
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool, validation, selection = _select(model, dataset, granularity=granularity,
                                          refresh="cached", refresh_every=3, chunk_batches=2)
    details = selection.details
    sizes = [32, 32, 24] if granularity == "sample" else [2, 2, 2]
    assert details["chunks"] == 3 and details["chunk_elements"] == sizes
    assert details["chunk_images"] == [7, 6, 5]  # the largest-remainder shares of 18
    assert details["chunk_picks"] == ([7, 6, 5] if granularity == "sample" else [1, 1, 1])
    indices = selection.indices
    assert indices.numel() == selection.budget == 18 and indices.unique().numel() == 18
    assert torch.isin(indices, pool).all() and not torch.isin(indices, validation).any()
    base, first, taken = 0, 0, 0
    for count, picks, added in zip(sizes, details["chunk_picks"], details["chunk_images"],
                                   strict=True):
        these = selection.picks[first : first + picks]
        assert all(base <= e < base + count for e in these)  # picks stay in their chunk
        chunk_images = torch.cat(list(selection.elements[base : base + count]))
        assert torch.isin(indices[taken : taken + added], chunk_images).all()
        # Every chunk starts from phi0 and v0: its first pick is its best initial gain.
        assert these[0] == base + int(selection.initial_gains[base : base + count].argmax())
        base, first, taken = base + count, first + picks, taken + added
    # The head comes back exactly, after every chunk and at the end.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_each_chunk_starts_from_phi0_and_v0_and_holds_only_its_pairs(dataset, monkeypatch):
    """Every chunk's pass runs at phi0 and its greedy starts from v0 (the head and U's attack
    at phi0 restored after the previous chunk's simulated steps and re-attacks); memory scales
    with the chunk: each pass sees only its minibatches, and the previous chunk's candidates
    (pairs and projections) are freed before the next pass."""
    model = _model()
    phi0 = [p.detach().clone() for p in model.head.parameters()]
    real_pass, real_greedy, passes, greedy_starts = coreset._pass_over, coreset._greedy, [], []

    def pass_spy(model, layers, bias, dataset, minibatches, **kwargs):
        gc.collect()
        assert all(ref() is None for _, ref in passes)  # the previous chunks are gone
        assert all(torch.equal(p, q) for p, q in zip(model.head.parameters(), phi0, strict=True))
        candidates = real_pass(model, layers, bias, dataset, minibatches, **kwargs)
        passes.append((len(minibatches), weakref.ref(candidates)))
        return candidates

    def greedy_spy(candidates, rd, v, *args, **kwargs):
        greedy_starts.append(torch.equal(rd.projection(), v))  # v0 is v at the restored state
        return real_greedy(candidates, rd, v, *args, **kwargs)

    monkeypatch.setattr(coreset, "_pass_over", pass_spy)
    monkeypatch.setattr(coreset, "_greedy", greedy_spy)
    _, _, selection = _select(model, dataset, granularity="sample", refresh="cached",
                              refresh_every=3, chunk_batches=2)
    assert [n for n, _ in passes] == [2, 2, 2]
    assert greedy_starts == [True, True, True]
    assert selection.details["validation_attacks"] == 1 + 2 + 1 + 1  # picks 3 and 6 re-attack
    assert len(selection.elements) == 88 and selection.initial_gains.shape == (88,)


@pytest.mark.parametrize("chunk_batches", [0, -1, 2.5, True, "100"])
def test_bad_chunk_batches_is_refused(dataset, chunk_batches):
    with pytest.raises(ValueError, match="chunk_batches must be None .* or a number of "
                                         "minibatches >= 1"):
        _select(_model(), dataset, chunk_batches=chunk_batches)


def test_projections_are_the_rowmean_of_the_true_head_gradients():
    """The hooks' (H, Delta) pairs give the autograd gradient of the ACL and RD losses with
    respect to every head Linear layer, and rcs_project of them is its row mean."""
    model = _model().eval()
    layers = head_linear_layers(model)
    bias = [layer.bias is not None for layer in layers]
    params = [p for layer in layers for p in layer.parameters()]
    b = 6
    f_adv, f_nat = torch.randn(2 * b, 32), torch.randn(2 * b, 32)

    def acl(z_adv, z_nat):
        return 0.5 * (nt_xent(z_nat[:b], z_nat[b:], 0.5) + nt_xent(z_adv[:b], z_adv[b:], 0.5))

    def rd(z_adv, z_nat):
        return representational_divergence(z_adv, z_nat, "minmax-kl")

    for loss in (acl, rd):
        _, h, delta = _head_pairs(model, layers, [(f_adv, "adv"), (f_nat, "normal")], loss)
        with bn_branch(model, "adv"):
            z_adv = model.head(f_adv)
        with bn_branch(model, "normal"):
            z_nat = model.head(f_nat)
        grads = torch.autograd.grad(loss(z_adv, z_nat), params)
        # The full gradient from the pairs (how G_e is rebuilt for the simulated step).
        weight_grads = [g for g, p in zip(grads, params, strict=True) if p.dim() == 2]
        for h_l, delta_l, g in zip(h, delta, weight_grads, strict=True):
            torch.testing.assert_close(delta_l.T @ h_l, g, atol=1e-6, rtol=1e-5)
        # The row-mean projection of the true gradient (bias block after fc1's weight block).
        expected = torch.cat([grads[0].mean(0), grads[1].mean(0, keepdim=True),
                              grads[2].mean(0), grads[3].mean(0)])
        segments = torch.zeros(4 * b, dtype=torch.int64)
        r = rcs_project(h, delta, "rowmean", bias, segment_ids=segments, num_segments=1)[0]
        torch.testing.assert_close(r, expected, atol=1e-6, rtol=1e-5)
        if loss is rd:
            v = _validation_projection(model, layers, bias, f_adv, f_nat, "minmax-kl")
            torch.testing.assert_close(v, expected, atol=1e-6, rtol=1e-5)


def test_sample_gradients_average_to_the_minibatch_gradient(dataset):
    """Each sample's gradient is its rows' contribution times the minibatch size, so their mean
    over a minibatch is the minibatch gradient (docs/rcs.md section 2); G_e rebuilds from the
    pairs."""
    from fastacl.coreset import _candidate_gradients

    model = _model().eval()
    layers = head_linear_layers(model)
    bias = [layer.bias is not None for layer in layers]
    pool = torch.arange(32)
    common = dict(batch_size=BATCH, eps=0.15, step_size=0.05, attack_steps=1, temperature=0.5,
                  strength=1.0, interpolation="bicubic")
    results = {}
    for granularity in ("batch", "sample"):
        results[granularity] = _candidate_gradients(
            model, layers, bias, dataset, pool, granularity=granularity,
            generator=torch.Generator().manual_seed(0),
            attack_generator=torch.Generator().manual_seed(0), **common)
    batch, sample = results["batch"], results["sample"]
    assert len(batch.elements) == 2 and len(sample.elements) == 32
    # each element owns its images' 4 rows
    assert batch.offsets.tolist() == [0, 4 * BATCH, 8 * BATCH]
    assert sample.offsets.tolist() == list(range(0, 4 * 32 + 1, 4))
    for e, element in enumerate(batch.elements):
        members = [i for i, s in enumerate(sample.elements) if torch.isin(s, element).all()]
        assert len(members) == BATCH
        torch.testing.assert_close(sample.projections[members].mean(0), batch.projections[e],
                                   atol=1e-6, rtol=1e-4)
        g_batch = _element_gradient(batch, e, bias)
        g_mean = [sum(_element_gradient(sample, i, bias)[layer][0] for i in members) / BATCH
                  for layer in range(3)]
        for (g, _), mean in zip(g_batch, g_mean, strict=True):
            torch.testing.assert_close(mean, g, atol=1e-6, rtol=1e-4)


def test_without_a_simulated_step_the_picks_are_the_top_gains(dataset):
    """eta' = 0 and no re-attack: v never changes, so greedy = the top-k of <r_e, v>."""
    model = _model()
    _, _, selection = _select(model, dataset, granularity="sample", refresh="cached",
                              refresh_every=10_000, simulated_lr=0.0)
    top = selection.initial_gains.argsort(descending=True, stable=True)[: len(selection.picks)]
    assert selection.picks == top.tolist()
    # With a step the validation gradient moves, and so (here) does the order of later picks.
    _, _, stepped = _select(model, dataset, granularity="sample", refresh="cached",
                            refresh_every=10_000, simulated_lr=50.0)
    assert stepped.picks[0] == selection.picks[0]
    assert stepped.picks != selection.picks


def test_doubled_step_equals_twice_the_learning_rate(dataset):
    model = _model()
    common = dict(granularity="sample", refresh="cached", refresh_every=10_000)
    _, _, twice = _select(model, dataset, simulated_lr=5.0, simulated_steps=2, **common)
    _, _, double = _select(model, dataset, simulated_lr=10.0, **common)
    assert twice.picks == double.picks


# ---- float64, the released code's options, defaults ---------------------------------------------

def _minmax_kl(z_adv, z_nat):
    """d of docs/rcs.md section 1, written from the formula: rows min-max normalised, + 1e-8."""
    def n(z):
        low, high = z.min(1, keepdim=True).values, z.max(1, keepdim=True).values
        return (z - low) / (high - low + 1e-12)

    q, p = n(z_adv) + 1e-8, n(z_nat) + 1e-8
    return (q * (q.log() - p.log())).mean()


def _rowmean(grads):
    """The authors' reduction of each head Linear gradient (docs/rcs.md section 2): the mean over
    the output units, weight block then bias block, layer by layer."""
    return torch.cat([g.mean(0).reshape(-1) for g in grads])


def test_float64_round_gains_are_the_published_objective(dataset, monkeypatch):
    """A float64 round at sample granularity: its first-pick gains are <r_e, v>, restated here
    with autograd (docs/rcs.md sections 1-3): r_e = rowmean of N_b x the gradient of the
    minibatch's ACL loss through sample e's 4 rows only (its own copy of the head's Linear
    parameters), v = rowmean of the gradient of RD(U). The attacks' images are observed, not
    recomputed."""
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
    model = _model().double()
    _, _, selection = _select(model, dataset, granularity="sample", refresh="cached",
                              refresh_every=10_000)
    assert selection.initial_gains.dtype == torch.float64

    model.eval()
    linears = [(name, m) for name, m in model.head.named_modules() if isinstance(m, nn.Linear)]
    names = [f"{name}.{p}" for name, m in linears for p, _ in m.named_parameters()]

    def features(x, branch):
        with torch.no_grad():
            return model.backbone(x, branch=branch)

    def head(f, branch, params):
        return torch.func.functional_call(model.head, params, (f,), {"branch": branch})

    shared = {n: p.detach() for n, p in model.head.named_parameters() if n in names}
    r = []
    for x1, x2, x1_adv, x2_adv in pool_attacks:
        b = x1.shape[0]
        f_adv = features(torch.cat([x1_adv, x2_adv]), "adv")
        f_nat = features(torch.cat([x1, x2]), "normal")
        copies = [{n: p.clone().requires_grad_(True) for n, p in shared.items()}
                  for _ in range(b)]
        rows = [i % b for i in range(2 * b)]  # view 1 then view 2 of each image
        z_adv = torch.cat([head(f_adv[i : i + 1], "adv", copies[s]) for i, s in enumerate(rows)])
        z_nat = torch.cat([head(f_nat[i : i + 1], "normal", copies[s])
                           for i, s in enumerate(rows)])
        loss = 0.5 * (nt_xent(z_nat[:b], z_nat[b:], 0.5) + nt_xent(z_adv[:b], z_adv[b:], 0.5))
        grads = torch.autograd.grad(loss, [c[n] for c in copies for n in names])
        r += [b * _rowmean(grads[s * len(names) : (s + 1) * len(names)]) for s in range(b)]
    x_u, x_u_adv = u_attacks[0]
    params = {n: p.clone().requires_grad_(True) for n, p in shared.items()}
    rd_u = _minmax_kl(head(features(x_u_adv, "adv"), "adv", params),
                      head(features(x_u, "normal"), "normal", params))
    v = _rowmean(torch.autograd.grad(rd_u, [params[n] for n in names]))
    gains = torch.stack(r) @ v

    assert len(r) == len(selection.elements) == 88  # every pool image, in element order
    # fp64 agreement (an fp32 round is off by ~1e-6 relative).
    assert relative_error(selection.initial_gains, gains) < 1e-10
    assert selection.picks[0] == int(gains.argmax())


def test_unclipped_rd_start_is_the_released_first_step(dataset):
    """clip_random_start=False: the first forward of the RD attack sees x + U[-eps, eps]
    unclipped; the step from there is then projected onto the eps-ball and [0, 1]."""
    model = _model().eval()
    x = dataset.fetch(torch.arange(6)).float() / 255.0
    eps, step = 0.15, 0.05
    attacked = {clip: rd_attack(model, x, eps, step_size=step, steps=1, fold_bn=False,
                                generator=torch.Generator().manual_seed(3),
                                clip_random_start=clip)
                for clip in (False, True)}

    delta = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(3))
    start = (x + delta).requires_grad_(True)
    assert start.min() < 0  # MNIST's black background: the unclipped start leaves [0, 1]
    with torch.no_grad():
        z_nat = model(x, branch="normal")
    (grad,) = torch.autograd.grad(_minmax_kl(model(start, branch="adv"), z_nat), start)
    expected = torch.minimum(torch.maximum(start.detach() + step * grad.sign(), x - eps),
                             x + eps).clamp(0, 1)
    torch.testing.assert_close(attacked[False], expected, atol=1e-6, rtol=0)
    assert (attacked[False] - attacked[True]).abs().max() > 0.01


def test_clip_random_start_reaches_both_attacks_of_the_round(dataset, monkeypatch):
    seen = []
    pgd, rd = coreset.pgd_contrastive, coreset.rd_attack

    def pgd_spy(*args, **kwargs):
        seen.append(("pool", kwargs["clip_random_start"]))
        return pgd(*args, **kwargs)

    def rd_spy(*args, **kwargs):
        seen.append(("U", kwargs["clip_random_start"]))
        return rd(*args, **kwargs)

    monkeypatch.setattr(coreset, "pgd_contrastive", pgd_spy)
    monkeypatch.setattr(coreset, "rd_attack", rd_spy)
    common = dict(granularity="sample", refresh="cached", refresh_every=10_000)
    unclipped = _select(_model(), dataset, clip_random_start=False, **common)[2]
    assert set(seen) == {("pool", False), ("U", False)}
    clipped = _select(_model(), dataset, **common)[2]
    assert relative_error(unclipped.initial_gains, clipped.initial_gains) > 1e-3


def test_released_rows_are_the_first_half_of_each_minibatch_twice():
    rows = coreset.released_validation_rows(torch.arange(11) * 10, batch_size=4)
    assert rows.tolist() == [0, 0, 10, 10, 40, 40, 50, 50, 80, 80, 90]


def test_released_half_validation_is_u_truncated_and_doubled(dataset):
    """validation_handling="released-half" computes v on the first half of each validation
    minibatch (batches of 6 here: U's 8 images as 6 + 2), each image twice: the same round as
    the default handling given that duplicated subset as U."""
    model = _model()
    pool, validation = validation_split(N_IMAGES, seed=0)
    doubled = validation[[0, 0, 1, 1, 2, 2, 6, 6]]

    def select(u, handling):
        return select_coreset(model, dataset, pool, u, 0.2, batch_size=6, eps=0.15,
                              step_size=0.05, attack_steps=1, granularity="sample",
                              refresh="cached", refresh_every=10_000,
                              validation_handling=handling,
                              generator=torch.Generator().manual_seed(0),
                              attack_generator=torch.Generator().manual_seed(0))

    released = select(validation, "released-half")
    assert released.details["validation_rows"] == 8
    on_doubled = select(doubled, "all")
    assert torch.equal(released.initial_gains, on_doubled.initial_gains)
    assert released.picks == on_doubled.picks
    every_image = select(validation, "all")
    assert not torch.equal(released.initial_gains, every_image.initial_gains)


def test_default_options_are_the_clipped_start_and_all_of_u(dataset):
    _, _, default = _select(_model(), dataset)
    _, _, explicit = _select(_model(), dataset, clip_random_start=True, validation_handling="all")
    assert default.picks == explicit.picks and torch.equal(default.indices, explicit.indices)
    assert torch.equal(default.initial_gains, explicit.initial_gains)
    assert default.initial_gains.dtype == torch.float32


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        coreset_budget(fraction, 100)


def test_budget_rounding_to_zero_and_oversized_validation_are_refused(dataset):
    with pytest.raises(ValueError, match="rounds to 0 images"):
        coreset_budget(0.004, 100)
    with pytest.raises(ValueError, match="not smaller than the 8 training images"):
        validation_split(8)
    with pytest.raises(ValueError, match="U .12 images. is not smaller than the pool .10"):
        select_coreset(_model(), dataset, torch.arange(10), torch.arange(10, 22), 0.5,
                       batch_size=4, eps=0.15, step_size=0.05)
    with pytest.raises(ValueError, match="share images"):
        select_coreset(_model(), dataset, torch.arange(20), torch.arange(15, 17), 0.5,
                       batch_size=4, eps=0.15, step_size=0.05)


def test_a_model_without_a_linear_head_is_refused(dataset):
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

    class ConvHead(NoHead):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Flatten(), nn.Identity()

    pool, validation = validation_split(N_IMAGES)
    for model, message in ((NoHead(), "needs a model with a `backbone`"),
                           (ConvHead(), "has none")):
        with pytest.raises(ValueError, match=message):
            select_coreset(model, dataset, pool, validation, 0.2, batch_size=BATCH, eps=0.15,
                           step_size=0.05)


def test_unknown_validation_handling_is_refused(dataset):
    message = "validation_handling must be one of all, released-half, got 'half'"
    with pytest.raises(ValueError, match="coreset_" + message):
        TrainConfig.from_options(coreset="rcs", coreset_validation_handling="half").resolve()
    with pytest.raises(ValueError, match=message):
        _select(_model(), dataset, validation_handling="half")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(coreset="greedy"), "coreset must be one of None, rcs, random, got 'greedy'"),
        (dict(coreset="rcs", coreset_fraction=1.0), r"coreset_fraction must be in \(0, 1\)"),
        (dict(coreset="rcs", method="cl"), "use an adversarial method"),
        (dict(coreset="rcs", coreset_refresh="lazy"), "coreset_refresh must be one of"),
        (dict(coreset="random", epochs=1), r"coreset_warmup must be in \[0, epochs"),
        (dict(coreset_validation=1.0), r"coreset_validation must be in \[0, 1\)"),
        (dict(coreset="rcs", coreset_fraction=0.1, **TINY), "smaller than batch_size 16"),
        (dict(coreset="rcs", coreset_attack_steps=-1),
         "coreset_attack_steps must be an integer >= 0"),
        (dict(coreset="rcs", coreset_precision="fp16"),
         "coreset_precision must be one of fp32, bf16"),
        (dict(coreset="rcs", coreset_precision="bf16", deterministic=True),
         "deterministic=True .* cannot be combined with .*coreset_precision='bf16'"),
    ],
)
def test_bad_coreset_config_is_a_clear_error_and_writes_nothing(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        pretrain.train(out_dir=str(out), **{"epochs": 2, **overrides})
    assert not out.exists()


# ---- the trainer ---------------------------------------------------------------------------------

def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_schedule_defaults_scale_with_the_epochs():
    cfg = TrainConfig.from_options(dataset="cifar10", coreset="rcs").resolve()
    assert (cfg.coreset.warmup, cfg.coreset.interval) == (100, 20)  # spec: W = 100, I = 20
    short = TrainConfig.from_options(coreset="random", epochs=5).resolve()
    assert (short.coreset.warmup, short.coreset.interval) == (1, 1)
    selections = [e for e in range(1, 1001) if pretrain.is_selection_epoch(cfg, e)]
    assert selections[:3] == [101, 121, 141] and len(selections) == 45
    assert cfg.coreset.attack_steps == cfg.attack.steps == 5  # the spec's pool pass
    assert cfg.coreset.precision == cfg.speed.precision == "fp32"


def test_pool_attack_steps_reach_the_selection(tmp_path, monkeypatch):
    seen = []
    original = coreset.select_coreset

    def spy(*args, **kwargs):
        seen.append((kwargs["attack_steps"], kwargs["autocast_dtype"], kwargs["fold_bn"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(coreset, "select_coreset", spy)
    pretrain.train(out_dir=str(tmp_path / "run"), epochs=2, coreset="rcs", coreset_attack_steps=1,
                   coreset_precision="bf16", fold_bn=False, **TINY)
    assert seen == [(1, torch.bfloat16, False)]


def test_released_code_options_reach_the_selection(tmp_path, monkeypatch):
    """The training attack's clip_random_start and coreset_validation_handling reach the round."""
    seen = []

    class Selected(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append((kwargs["clip_random_start"], kwargs["validation_handling"]))
        raise Selected

    monkeypatch.setattr(coreset, "select_coreset", spy)
    with pytest.raises(Selected):
        pretrain.train(out_dir=str(tmp_path / "run"), epochs=2, coreset="rcs",
                       clip_random_start=False, coreset_validation_handling="released-half",
                       **TINY)
    assert seen == [(False, "released-half")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rcs_run_records_its_selections(tmp_path, precision):
    result = pretrain.train(out_dir=str(tmp_path / "run"), epochs=2, coreset="rcs",
                            precision=precision, **TINY)
    first, second = _records(result.out_dir)
    # U (8 images) is held out: epoch 1 trains on the 120-image pool, epoch 2 on its coreset.
    assert first["train_images"] == 120 and "coreset_size" not in first
    assert second["train_images"] == second["coreset_size"] == 24
    assert second["selection_seconds"] > 0
    state = load_checkpoint(result.checkpoint)["extra"]["train_state"]
    assert state["coreset_indices"].numel() == 24


def test_random_subset_is_drawn_once_per_run(tmp_path):
    result = pretrain.train(out_dir=str(tmp_path / "run"), epochs=3, coreset="random",
                            coreset_interval=1, **TINY)
    records = _records(result.out_dir)
    assert ["coreset_size" in r for r in records] == [False, True, False]
    assert [r["train_images"] for r in records] == [120, 24, 24]


@pytest.mark.slow
def test_interrupted_coreset_run_resumes_to_the_same_weights(tmp_path):
    common = dict(epochs=3, seed=3, coreset="rcs", coreset_fraction=0.3, **TINY)
    full = pretrain.train(out_dir=str(tmp_path / "full"), **common)
    # Stop after the first step of epoch 2, the first coreset epoch (2 steps of its 36 images).
    stopped = pretrain.train(out_dir=str(tmp_path / "cut"),
                             on_step=lambda epoch, step, terms: (epoch, step) == (2, 0),
                             **common)
    assert stopped.summary == {"interrupted": True}
    state = load_checkpoint(stopped.checkpoint)["extra"]["train_state"]
    assert state["coreset_indices"].numel() == 36
    resumed = pretrain.train(resume=tmp_path / "cut")
    expected = load_checkpoint(full.checkpoint)["state_dict"]
    actual = load_checkpoint(resumed.checkpoint)["state_dict"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    records = _records(tmp_path / "cut")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    uninterrupted = _records(tmp_path / "full")
    for record, reference in zip(records, uninterrupted, strict=True):
        assert record["train_images"] == reference["train_images"]
        assert record["total"] == pytest.approx(reference["total"], abs=1e-5)
    assert [r.get("coreset_size") for r in records] == [None, 36, 36]
