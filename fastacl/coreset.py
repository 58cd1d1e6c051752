"""fastacl.coreset: robustness-aware coreset selection (RCS) and the random-subset baseline.

Spec: docs/rcs.md. One selection round (`select_coreset`, docs/rcs.md section 3):

1. One pass over the candidate pool in shuffled, augmented minibatches of the training batch
   size: adversarial views by PGD on the contrastive loss, then the selection loss (the plain
   ACL loss: the mean of the natural and the adversarial NT-Xent) at the round's starting head
   phi0. The backbone is frozen and the whole model is in eval mode; forward hooks on the head's
   Linear layers capture their inputs H and autograd gives the gradients Delta of the loss with
   respect to their outputs, so that per layer row i contributes Delta_i (outer) H_i. Each
   element's projected gradient r_e is `fastacl.ops.rcs_project` of its rows ("rowmean").
   - granularity "sample": the element is one image; its gradient is the sum of its 4 rows (both
     views, natural and adversarial) times the minibatch size (docs/rcs.md section 2).
   - granularity "batch": the element is one minibatch; its gradient is the minibatch gradient.
2. v = the projected gradient of RD(U; phi) (the representational divergence on the validation
   set U, one mean over all its elements) with the same projection.
3. Greedy: pick e* = argmax over unpicked elements of <r_e, v> (`fastacl.ops.greedy_pick`);
   unless it was the last pick, simulate the head update phi <- phi - eta' G_e* (G_e* rebuilt from
   the cached (H, Delta) pairs, at phi0 as published) and refresh v at the new phi:
   - refresh "exact": re-attack U through the whole network after every pick (the authors' code);
   - refresh "cached": keep the frozen backbone's features f(x_U) and f(x~_U) and refresh v by a
     head-only forward/backward; re-attack U only every `refresh_every` picks.
4. Restore phi0 exactly; return the picked image indices.

Choices, stated:
- eta' (`simulated_lr`) = 0.01 applied once per pick. The authors' code applies the update twice
  to the same module (0.02 effective); `simulated_steps=2` reproduces that.
- Budget: exactly round(k N) images (N the pool, round half up). At batch granularity the greedy
  takes ceil(budget / B) minibatches and truncates the last one to the budget;
  `budget_rounding="floor"` reproduces the published flooring to budget // B whole minibatches.
- RD attack on U: PGD maximising d, 3 steps of 1.25 eps / 3 from a uniform start, the published
  "3 steps of (10/255)/3 at eps 8/255" scaled to the run's eps; h(x) through the "normal" BN and
  h(x~) through the "adv" BN, model in eval mode. U is the unaugmented images.
- Random starts (the pool pass's PGD and the RD attack): x + U[-eps, eps] clipped to [0, 1]
  before the first forward; `clip_random_start=False` reproduces the released code's unclipped
  start.
- U: every image once (`validation_handling="all"`). The released code keeps only the first
  rows of each validation minibatch, so that each minibatch of d images becomes its first
  ceil(d / 2) images, each twice (the last one once when d is odd);
  `validation_handling="released-half"` reproduces that (`released_validation_rows`).
- dtype: the round computes in the model's dtype (the head's), at least fp32: a float64 model
  gives float64 projections, v and gains. The attacks evaluate their losses in fp32
  (fastacl.attacks); their adversarial images are in the model's dtype.
- d: "minmax-kl" (the authors' CIFAR/STL code) or "softmax-kl" (their ImageNet code), see
  `representational_divergence`.
- The pool is split into minibatches of the training batch size; a last minibatch of a single
  image (NT-Xent needs two) joins the one before it, so every image is a candidate.
- Memory: the (H, Delta) pairs of every candidate row are kept, 4 rows per image: 4 x 2 x 1536
  fp32 floats per image for the paper's 512-d head (48 KiB), 2.4 GB for CIFAR-10, 63 GB for
  ImageNet-1K; plus the projections, D = 1537 floats (6 KiB) per element.
- Chunks (`chunk_batches`, the authors' ImageNet recipe, docs/rcs.md section 4): the pool's
  shuffled minibatches are split into consecutive chunks of M minibatches, and each chunk runs
  the pass and its own greedy on its own elements, with its share of the budget (largest
  remainder of budget x chunk images / pool images: the shares add up to exactly round(k N);
  "floor" gives each chunk floor(budget x its minibatches / (B x all minibatches)) whole
  minibatches, the release's formula). Every chunk's greedy starts from the same state: the
  head phi0, v0 = v(phi0) and U's attack at phi0, computed once (after the first chunk's pass);
  phi0 and that attack are restored after each chunk. Only one chunk's pairs and projections
  are alive at a time: memory scales with M x B, not with the pool. One chunk holding every
  minibatch is exactly the unchunked round. (The release computes v0 before the pass instead:
  the same v0 up to the random start of U's attack. The released ImageNet code,
  ACL_RCS/ImageNet_32/RCS.py, intends this -- it floors each chunk's share, restores the head
  and v0 -- but its reset of the chunk's state is indented inside the pick loop, so its second
  pick indexes an emptied list, and a chunk that ends without the reset fails on the next
  append: it cannot finish a round of more than one chunk; docs/rcs.md section 7.)

The validation split U (`validation_split`) is 1% of the training set, at least 8 images, drawn
by the run's seed; it is excluded from the pool and from training in every run, the full-data
baseline included. The random baseline (`random_coreset`) draws exactly round(k N) indices.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastacl.attacks import _ascend, _forward, _uniform_start, frozen_eval, pgd_contrastive
from fastacl.errors import ConfigError
from fastacl.models.dual_bn import bn_branch
from fastacl.models.folded import can_fold, folded_for_attack
from fastacl.ops import greedy_pick, nt_xent, rcs_project
from fastacl.utils import at_least_fp32, check_choice
from fastacl.utils import progress as progress_bar

__all__ = [
    "BUDGET_ROUNDINGS",
    "DIVERGENCES",
    "GRANULARITIES",
    "REFRESHES",
    "VALIDATION_HANDLINGS",
    "CoresetSelection",
    "coreset_budget",
    "head_linear_layers",
    "random_coreset",
    "rd_attack",
    "released_validation_rows",
    "representational_divergence",
    "select_coreset",
    "validation_split",
]

GRANULARITIES = ("batch", "sample")
REFRESHES = ("exact", "cached")
DIVERGENCES = ("minmax-kl", "softmax-kl")
BUDGET_ROUNDINGS = ("truncate", "floor")
VALIDATION_HANDLINGS = ("all", "released-half")

# docs/rcs.md section 1: U is 1% of the training split (0.5% on ImageNet); at least a handful of
# images so that RD is not the divergence of a single one.
VALIDATION_FRACTION = 0.01
VALIDATION_MIN_SIZE = 8
# docs/rcs.md section 1: the RD attack is 3 steps of (10/255)/3 at eps 8/255, i.e. 1.25 eps / 3.
RD_STEPS = 3
RD_STEP_RATIO = 1.25 / 3
# docs/rcs.md sections 1 and 2: constants of the min-max normalisation and of the KL.
_MINMAX_EPS = 1e-12
_KL_EPS = 1e-8


# ---- budget, validation split, random baseline ---------------------------------------------------

def _check_fraction(op: str, fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:  # also rejects NaN
        raise ConfigError(
            f"{op}: fraction must be in (0, 1) (the share of the pool to keep), got {fraction}"
        )
    return fraction


def coreset_budget(fraction: float, pool_size: int) -> int:
    """round(k N) images (half up), the size of a coreset of fraction k of a pool of N."""
    fraction = _check_fraction("coreset_budget", fraction)
    budget = math.floor(fraction * pool_size + 0.5)
    if budget < 1:
        raise ConfigError(
            f"coreset_budget: fraction {fraction} of a pool of {pool_size} images rounds to "
            f"{budget} images: choose a fraction >= {0.5 / max(pool_size, 1):.3g}"
        )
    return budget


def validation_split(num_images: int, fraction: float = VALIDATION_FRACTION, seed: int = 0,
                     min_size: int = VALIDATION_MIN_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, validation): int64 index tensors (sorted) partitioning range(num_images).

    The validation set U holds max(min_size, round(fraction N)) images drawn by `seed`
    (fraction 0: no U, the pool is everything). Deterministic: the same (N, fraction, seed)
    always gives the same split.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation_split: fraction must be in [0, 1), got {fraction}")
    size = 0 if fraction == 0 else max(int(min_size), math.floor(fraction * num_images + 0.5))
    if size >= num_images:
        raise ConfigError(
            f"validation_split: the validation set U ({size} images: max({min_size}, "
            f"{fraction} x {num_images})) is not smaller than the {num_images} training images; "
            "use more images or a smaller fraction"
        )
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919)
    order = torch.randperm(num_images, generator=generator)
    return order[size:].sort().values, order[:size].sort().values


def random_coreset(pool: torch.Tensor, fraction: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly round(k N) distinct indices of `pool`, uniformly at random (sorted, int64)."""
    pool = pool.detach().cpu().long()
    budget = coreset_budget(fraction, pool.numel())
    return pool[torch.randperm(pool.numel(), generator=generator)[:budget]].sort().values


def released_validation_rows(validation: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The rows of U that the released code attacks (docs/rcs.md section 7), as indices.

    Its validation loader yields minibatches of d images, each as its two views stacked
    [d, 2, ...] (for CIFAR both views are the unaugmented image); `view(2d, ...)` interleaves
    them (image 0, image 0, image 1, image 1, ...) and `[:d]` keeps the first d rows: the first
    ceil(d / 2) images of the minibatch, each twice (the last once when d is odd). Minibatches
    are the training batch size, over U in order (its loader does not shuffle).
    """
    return torch.cat([chunk.repeat_interleave(2)[: chunk.numel()]
                      for chunk in validation.split(batch_size)])


# ---- the model's head ----------------------------------------------------------------------------

def head_linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of `model.head` in order (fc1, fc2, fc3 for the ACL head).

    RCS differentiates only these (docs/rcs.md section 2) and needs `model.backbone` to compute the
    frozen features once: a model without both is refused.
    """
    head, backbone = getattr(model, "head", None), getattr(model, "backbone", None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"RCS needs a model with a `backbone` (the encoder f) and a `head` (the projection "
            f"head g, holding nn.Linear layers), as fastacl.models builds; got "
            f"{type(model).__name__} with backbone={type(backbone).__name__}, "
            f"head={type(head).__name__}"
        )
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError(
            f"RCS needs a projection head with nn.Linear layers (their gradients are what it "
            f"projects), but {type(model).__name__}.head ({type(head).__name__}) has none"
        )
    return layers


def _round_dtype(layers: list[nn.Linear]) -> torch.dtype:
    """The dtype the round feeds the model and computes in: the head's, at least fp32."""
    return torch.promote_types(layers[0].weight.dtype, torch.float32)


def _head(model: nn.Module, features: torch.Tensor, branch: str) -> torch.Tensor:
    with bn_branch(model, branch):
        return at_least_fp32(model.head(features))


def _on_branch(model: nn.Module, branch: str, fold_bn: bool) -> nn.Module:
    """What the round runs on `branch` (the model is in eval mode throughout): its folded mirror
    refreshed to the current weights (fastacl.models.folded: the same function without the BN
    kernels), or the model itself, routed by the caller."""
    return folded_for_attack(model, branch) if fold_bn and can_fold(model) else model


def _encoder(model: nn.Module, branch: str, fold_bn: bool):
    """h = f(x) on `branch` (eval mode): the folded mirror's features, refreshed now, or the
    model's backbone routed to `branch`. Valid while the backbone's weights do not change."""
    runner = _on_branch(model, branch, fold_bn)
    if runner is not model:
        return runner.features

    def backbone(x: torch.Tensor) -> torch.Tensor:
        with bn_branch(model, branch):
            return model.backbone(x)

    return backbone


def _features(encoder, x: torch.Tensor, batch_size: int,
              autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)
    with torch.no_grad(), autocast:
        return torch.cat([at_least_fp32(encoder(chunk)) for chunk in x.split(batch_size)])


def _head_pairs(model, layers, inputs, loss_fn):
    """Run the head on each (features, branch) of `inputs`, apply loss_fn to the outputs, and
    return (H, Delta) per Linear layer, rows in call order: H_l the layer's inputs, Delta_l the
    gradient of the loss with respect to its outputs. No parameter gradient is computed."""
    records: dict[nn.Linear, list] = {layer: [] for layer in layers}

    def hook(module, args, output):
        records[module].append((args[0].detach(), output))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            # Parameters are frozen: the features are the leaf that makes the head's outputs
            # differentiable, so that autograd can hand back Delta.
            outputs = [_head(model, f.detach().requires_grad_(True), branch)
                       for f, branch in inputs]
            loss = loss_fn(*outputs)
            flat = [output for layer in layers for _, output in records[layer]]
            grads = torch.autograd.grad(loss, flat)
    finally:
        for handle in handles:
            handle.remove()
    h, delta, k = [], [], 0
    for layer in layers:
        calls = len(records[layer])
        h.append(torch.cat([at_least_fp32(inp) for inp, _ in records[layer]]))
        delta.append(torch.cat([at_least_fp32(g) for g in grads[k : k + calls]]))
        k += calls
    return loss.detach(), h, delta


# ---- representational divergence -----------------------------------------------------------------

def _minmax(z: torch.Tensor) -> torch.Tensor:
    low = z.amin(dim=1, keepdim=True)
    high = z.amax(dim=1, keepdim=True)
    return (z - low) / (high - low + _MINMAX_EPS)


def representational_divergence(z_adv: torch.Tensor, z_nat: torch.Tensor,
                                divergence: str = "minmax-kl") -> torch.Tensor:
    """d(h(x~), h(x)) averaged over all N x d elements (docs/rcs.md section 1).

    "minmax-kl": q = n(z_adv) + 1e-8, p = n(z_nat) + 1e-8 with each row min-max normalised to
    [0, 1]; mean of q (log q - log p). "softmax-kl": KL(softmax z_nat || softmax z_adv),
    element-averaged.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence == "minmax-kl":
        q = _minmax(z_adv) + _KL_EPS
        p = _minmax(z_nat) + _KL_EPS
        return (q * (q.log() - p.log())).mean()
    log_p = torch.log_softmax(z_nat, dim=1)  # "softmax-kl"
    log_q = torch.log_softmax(z_adv, dim=1)
    return (log_p.exp() * (log_p - log_q)).mean()


def rd_attack(model: nn.Module, x: torch.Tensor, eps: float, step_size: float | None = None,
              steps: int = RD_STEPS, divergence: str = "minmax-kl",
              generator: torch.Generator | None = None, batch_size: int = 512,
              fold_bn: bool = True, clip_random_start: bool = True) -> torch.Tensor:
    """x~ = argmax over the l_inf eps-ball of d(h(x', "adv"), h(x, "normal")), by PGD from a
    uniform start (docs/rcs.md section 1); step_size defaults to 1.25 eps / 3. d is separable
    over the images, so the attack runs in chunks of batch_size. fold_bn: run fastacl's
    ResNet-18 through its folded eval-mode mirrors (same function, no BN kernels).
    clip_random_start: clip the start x + U[-eps, eps] to [0, 1] (fastacl); False reproduces
    the released code, whose first forward sees it unclipped (every step is still projected
    onto the ball and [0, 1]). Returns x~ (detached)."""
    step_size = RD_STEP_RATIO * eps if step_size is None else step_size
    natural, adversarial = (_on_branch(model, branch, fold_bn) for branch in ("normal", "adv"))
    out = []
    for chunk in x.split(batch_size):
        chunk = chunk.detach()
        with frozen_eval(model), torch.no_grad(), bn_branch(model, "normal"):
            z_nat = _forward(natural, chunk, "normal")

        def divergence_of(x_adv, z_nat=z_nat):
            with bn_branch(model, "adv"):  # also routes a converted user model
                z_adv = _forward(adversarial, x_adv, "adv")
            return representational_divergence(z_adv, z_nat, divergence)

        start = _uniform_start(chunk, eps, generator, clip=clip_random_start)
        with frozen_eval(model):
            out.append(_ascend(adversarial, divergence_of, chunk, start, eps, step_size, steps))
    return torch.cat(out)


# ---- one selection round -------------------------------------------------------------------------

@dataclass
class CoresetSelection:
    """The result of one selection round.

    indices: int64 [budget] (CPU) dataset indices of the coreset, in pick order.
    elements: the dataset indices of every candidate element (a minibatch or one image), in the
        pass's order: a sequence of int64 tensors (two tensors underneath, not one per image).
    picks: the picked elements, in order (the last one of each chunk may be truncated in
        `indices`).
    initial_gains: [num elements] <r_e, v> at phi0 (the first pick's scores).
    seconds: wall time of the round; budget: round(k N).
    details: how the round ran; with chunks, "chunk_elements" / "chunk_picks" /
        "chunk_images" list per chunk its elements, its picks and the images it added.
    """

    indices: torch.Tensor
    elements: Sequence[torch.Tensor]
    picks: list[int]
    initial_gains: torch.Tensor
    budget: int
    seconds: float
    details: dict = field(default_factory=dict)


def select_coreset(
    model: nn.Module,
    dataset,
    pool: torch.Tensor,
    validation: torch.Tensor,
    fraction: float,
    *,
    batch_size: int,
    eps: float,
    step_size: float,
    attack_steps: int = 5,
    temperature: float = 0.5,
    granularity: str = "batch",
    refresh: str = "exact",
    refresh_every: int = 20,
    divergence: str = "minmax-kl",
    simulated_lr: float = 0.01,
    simulated_steps: int = 1,
    budget_rounding: str = "truncate",
    validation_handling: str = "all",
    clip_random_start: bool = True,
    rd_steps: int = RD_STEPS,
    rd_step_size: float | None = None,
    strength: float = 1.0,
    interpolation: str = "bicubic",
    generator: torch.Generator | None = None,
    attack_generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    fold_bn: bool = True,
    chunk_batches: int | None = None,
    progress: bool | None = True,
) -> CoresetSelection:
    """One RCS selection round (docs/rcs.md section 3; the module docstring states the choices).

    Args:
        model: the dual-BN contrastive model (`backbone` + `head` with nn.Linear layers); left
            exactly as it was (head restored, training flags and requires_grad restored).
        dataset: a fastacl.data.DeviceDataset (`views`, `fetch`).
        pool: int64 dataset indices of the candidates; validation: those of U (disjoint).
        fraction: k in (0, 1); the coreset holds exactly round(k len(pool)) images.
        batch_size: the selection minibatch (the training batch size; the element at "batch").
        eps, step_size, attack_steps, temperature: the PGD-contrastive views and the NT-Xent
            temperature of the selection loss (the training run's).
        granularity: "batch" (the authors' code) | "sample" (the paper's description).
        refresh: "exact" (re-attack U after every pick) | "cached" (head-only refresh on the
            frozen features, re-attack every `refresh_every` picks).
        divergence: "minmax-kl" | "softmax-kl", the d of RD.
        simulated_lr: eta' of the simulated step phi <- phi - eta' G_e (0.01).
        simulated_steps: how often the step is applied per pick (2 reproduces the published
            code's doubling).
        budget_rounding: "truncate" (ceil(budget / B) minibatches, the last truncated: exactly
            the budget) | "floor" (budget // B whole minibatches, the published code; batch
            granularity only).
        validation_handling: "all" (every image of U once) | "released-half" (the released
            code's truncation of each validation minibatch of d images to its first ceil(d / 2)
            images, each twice: `released_validation_rows`).
        clip_random_start: clip the random starts of the pool pass's PGD and of the RD attack
            to [0, 1] (fastacl); False: the released code's unclipped starts.
        rd_steps, rd_step_size: the RD attack on U (3 steps of 1.25 eps / 3 by default).
        strength, interpolation: augmentation of the candidates' views.
        generator: CPU generator of the pool's shuffle and the views; attack_generator: the PGD
            random starts (on the model's device).
        autocast_dtype: torch.bfloat16 runs the pass over the pool (its PGD and backbone
            forwards, most of a round's cost) under bf16 autocast, as a bf16 training run does;
            the head gradients, U's attack and the greedy loop stay fp32. None: the model's
            dtype (fp32, or float64 for a float64 model, end to end).
        fold_bn: run the frozen eval-mode model (pool pass, U's attack and features) through
            its folded mirrors (fastacl.models.folded): the same function up to float rounding,
            without the BN kernels. Only fastacl's ResNet-18 folds; other models run as they are.
        chunk_batches: None: one greedy over the whole pool. M: the authors' ImageNet recipe
            (100 there): consecutive chunks of M of the pool's shuffled minibatches, each with
            its own pass and greedy from phi0 and v0, its share of the budget (largest
            remainder, exactly round(k N) in all; "floor": the release's per-chunk flooring) and
            only its own pairs in memory (module docstring).
        progress: show the pass over the pool (minibatches) and the greedy loop (images picked)
            through fastacl.utils.progress: a bar on a terminal, else a line every 30 s; False
            (ranks other than 0 under DDP) shows nothing. It changes no result.
    """
    start_time = time.perf_counter()
    _check_round_options(granularity=granularity, refresh=refresh, divergence=divergence,
                         budget_rounding=budget_rounding, refresh_every=refresh_every,
                         simulated_lr=simulated_lr, simulated_steps=simulated_steps,
                         batch_size=batch_size, validation_handling=validation_handling,
                         chunk_batches=chunk_batches)
    layers = head_linear_layers(model)
    bias = [layer.bias is not None for layer in layers]
    pool, validation = _checked_split(pool, validation)
    budget = coreset_budget(fraction, pool.numel())
    pass_options = dict(
        batch_size=batch_size, granularity=granularity, eps=eps, step_size=step_size,
        attack_steps=attack_steps, temperature=temperature, strength=strength,
        interpolation=interpolation, generator=generator, attack_generator=attack_generator,
        autocast_dtype=autocast_dtype, fold_bn=fold_bn, clip_random_start=clip_random_start,
    )
    greedy_options = dict(simulated_lr=simulated_lr, simulated_steps=simulated_steps,
                          reattack_every=1 if refresh == "exact" else int(refresh_every))
    rows = (released_validation_rows(validation, batch_size)
            if validation_handling == "released-half" else validation)

    with frozen_eval(model), _head_restored(layers) as restore_phi0:
        minibatches = _shuffled_minibatches(pool, batch_size, generator)
        chunks = _chunks(minibatches, chunk_batches)
        shares = _chunk_budgets([sum(b.numel() for b in chunk) for chunk in chunks],
                                [len(chunk) for chunk in chunks], budget, batch_size,
                                floor=budget_rounding == "floor" and granularity == "batch")

        def validation_gradient() -> _ValidationGradient:
            x_u = dataset.fetch(rows).to(_round_dtype(layers)) / 255.0
            return _ValidationGradient(
                model, layers, bias, x_u, eps=eps, step_size=rd_step_size, steps=rd_steps,
                divergence=divergence, generator=attack_generator, batch_size=batch_size,
                fold_bn=fold_bn, clip_random_start=clip_random_start,
            )

        run = _greedy_by_chunk(model, layers, bias, dataset, chunks, shares, budget=budget,
                               validation_gradient=validation_gradient,
                               restore_phi0=restore_phi0, pass_options=pass_options,
                               greedy_options=greedy_options, progress=progress)
    details = {"granularity": granularity, "refresh": refresh, "divergence": divergence,
               "validation_handling": validation_handling, "validation_rows": rows.numel(),
               "validation_attacks": run.validation.attacks, "pass_seconds": run.pass_seconds,
               "elements": len(run.elements), "chunks": len(chunks)}
    if chunk_batches is not None:
        details.update(chunk_batches=int(chunk_batches), chunk_elements=run.chunk_elements,
                       chunk_picks=run.chunk_picks, chunk_images=run.chunk_images)
    return CoresetSelection(
        indices=torch.cat(run.chosen), elements=run.elements, picks=run.picks,
        initial_gains=run.initial_gains, budget=budget,
        seconds=time.perf_counter() - start_time, details=details,
    )


@dataclass
class _ChunkedRun:
    """Steps 1-3 over every chunk: the candidates' bookkeeping (their pairs are gone), the
    picks (indices into `elements`) and their images, and per chunk what it contributed."""

    elements: _Elements
    initial_gains: torch.Tensor
    picks: list[int]
    chosen: list[torch.Tensor]
    chunk_elements: list[int]
    chunk_picks: list[int]
    chunk_images: list[int]
    validation: _ValidationGradient
    pass_seconds: float


def _greedy_by_chunk(model, layers, bias, dataset, chunks, shares, *, budget,
                     validation_gradient, restore_phi0, pass_options, greedy_options,
                     progress) -> _ChunkedRun:
    """Per chunk (one chunk: the unchunked round): the pass over its minibatches, then its
    greedy for its share (images, or whole minibatches under "floor") from phi0 and v0; v0 and
    U's attack are made once, after the first chunk's pass (so that one chunk is the unchunked
    round, random draws included), and restored with phi0 before the next chunk. A chunk's
    candidates are dropped before the next chunk's pass."""
    pass_bar = progress_bar(sum(len(chunk) for chunk in chunks), "RCS pass over the pool",
                            progress, unit="batch")
    greedy_bar = rd = v0 = f_adv0 = None
    elements, gains, picks, chosen, pass_seconds = [], [], [], [], 0.0
    chunk_picks, chunk_images = [], []
    for c, (chunk, (share, max_picks)) in enumerate(zip(chunks, shares, strict=True)):
        tic = time.perf_counter()
        candidates = _pass_over(model, layers, bias, dataset, chunk, bar=pass_bar,
                                **pass_options)
        pass_seconds += time.perf_counter() - tic
        if c == len(chunks) - 1:
            pass_bar.close()
        if rd is None:
            rd = validation_gradient()
            v0, f_adv0 = rd.projection(), rd.f_adv
        gains.append((candidates.projections @ v0).cpu())
        base = sum(len(e) for e in elements)
        these, images = [], []
        if (max_picks if max_picks is not None else share) > 0:
            if greedy_bar is None:
                # In images: one unit per picked image whatever the granularity (a flooring
                # round ends short of the budget).
                greedy_bar = progress_bar(budget, "RCS greedy selection", progress, unit="img")
            these, images = _greedy(candidates, rd, v0, layers, bias, budget=share,
                                    max_picks=max_picks, bar=greedy_bar, **greedy_options)
        picks += [base + pick for pick in these]
        chosen += images
        chunk_picks.append(len(these))
        chunk_images.append(sum(t.numel() for t in images))
        elements.append(candidates.elements)
        del candidates  # its pairs and projections, before the next chunk's pass
        if c < len(chunks) - 1:  # the next chunk starts where this one did
            restore_phi0()
            rd.f_adv = f_adv0
    if greedy_bar is not None:
        greedy_bar.close()
    return _ChunkedRun(_Elements.concatenate(elements), torch.cat(gains), picks, chosen,
                       [len(e) for e in elements], chunk_picks, chunk_images, rd, pass_seconds)


def _greedy(candidates: _Candidates, rd: _ValidationGradient, v: torch.Tensor, layers, bias, *,
            budget: int, max_picks: int | None, simulated_lr: float, simulated_steps: int,
            reattack_every: int, progress: bool | None = True, bar=None
            ) -> tuple[list[int], list[torch.Tensor]]:
    """The greedy loop (docs/rcs.md section 3, step 3) from v at phi0: (picks, their images).

    Pick e* = argmax over unpicked elements of <r_e, v>; unless it was the last pick, simulate
    phi <- phi - eta' G_e* and refresh v at the new phi (re-attacking U every `reattack_every`
    picks). The last pick is truncated to the budget, unless `max_picks` (the published flooring
    to whole minibatches) ends the round first.

    The loop runs once per pick (the round's only Python loop at sample granularity; the
    scores of all N elements are one fused masked mat-vec + argmax, `greedy_pick`, which reads R
    once and allocates nothing of size N x anything). The picks stay on the device until the
    round ends (one read-back per round, not per pick), when every element holds as many images
    and rows (sample granularity, or minibatches of one size): then how many images a pick adds
    is known without reading it. Otherwise each pick is read back to count its images.
    bar: a progress display to update (in images), else one is made here.
    """
    device = candidates.projections.device
    elements = candidates.elements
    taken = torch.zeros(len(elements), dtype=torch.bool, device=device)
    uniform = elements.size is not None
    picks, count = [], 0
    own_bar = bar is None
    if own_bar:  # in images: one unit per picked image whatever the granularity
        bar = progress_bar(budget, "RCS greedy selection", progress, unit="img")
    while count < budget and (max_picks is None or len(picks) < max_picks):
        element = greedy_pick(candidates.projections, v, taken)
        index = None if uniform else int(element)  # a read-back, only when sizes differ
        picks.append(element)
        size = elements.size if uniform else len(elements[index])
        added = size if max_picks is not None else min(size, budget - count)
        count += added
        bar.update(added)
        if count >= budget or len(picks) == max_picks:
            break  # the last pick: no simulated step
        gradient = _element_gradient(candidates, element if uniform else index, bias)
        _simulated_step(layers, gradient, simulated_lr, simulated_steps)
        if len(picks) % reattack_every == 0:
            rd.reattack()
        v = rd.projection()
    if own_bar:
        bar.close()
    picks = torch.stack(picks).tolist()  # the round's one read-back
    if min(picks) < 0:  # cannot happen: the pool holds more than the budget
        raise RuntimeError("RCS greedy loop: ran out of candidates before the budget")
    chosen, left = [], budget
    for pick in picks:
        images = elements[pick]
        chosen.append(images if max_picks is not None else images[:left])
        left -= chosen[-1].numel()
    return picks, chosen


# ---- the round's arguments and the head it changes -----------------------------------------------

def _check_round_options(*, granularity, refresh, divergence, budget_rounding, refresh_every,
                         simulated_lr, simulated_steps, batch_size, validation_handling,
                         chunk_batches=None) -> None:
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("validation_handling", validation_handling, VALIDATION_HANDLINGS)
    check_choice("refresh", refresh, REFRESHES)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("budget_rounding", budget_rounding, BUDGET_ROUNDINGS)
    if int(refresh_every) < 1:
        raise ConfigError(f"select_coreset: refresh_every must be >= 1 pick, got {refresh_every}")
    if int(simulated_steps) < 0 or not float(simulated_lr) >= 0:
        raise ConfigError(f"select_coreset: simulated_lr and simulated_steps must be >= 0, got "
                          f"{simulated_lr} and {simulated_steps}")
    if batch_size < 2:
        raise ConfigError(f"select_coreset: batch_size must be >= 2 (NT-Xent needs negatives), "
                          f"got {batch_size}")
    if chunk_batches is not None and (isinstance(chunk_batches, bool)
                                      or not isinstance(chunk_batches, int) or chunk_batches < 1):
        raise ConfigError(f"select_coreset: chunk_batches must be None (one greedy over the "
                          f"pool) or a number of minibatches >= 1 (100 in the authors' ImageNet "
                          f"recipe), got {chunk_batches!r}")


def _checked_split(pool: torch.Tensor,
                   validation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pool and U as CPU int64 indices, refused unless U is non-empty, disjoint from the pool and
    smaller than it, and the pool holds at least two images."""
    pool = pool.detach().cpu().long()
    validation = validation.detach().cpu().long()
    op = "select_coreset"
    if validation.numel() < 1:
        raise ConfigError(f"{op}: the validation set U is empty; RD needs at least one image")
    if validation.numel() >= pool.numel():
        raise ConfigError(
            f"{op}: the validation set U ({validation.numel()} images) is not smaller than the "
            f"pool ({pool.numel()} images)"
        )
    if torch.isin(validation, pool).any():
        raise ConfigError(f"{op}: the validation set U and the pool share images: U must be "
                          "carved out of the training set (see validation_split)")
    if pool.numel() < 2:
        raise ConfigError(f"{op}: the pool needs at least 2 images (NT-Xent), got "
                          f"{pool.numel()}")
    return pool, validation


def _chunks(minibatches: list[torch.Tensor], chunk_batches: int | None) -> list[list]:
    """Consecutive chunks of chunk_batches minibatches (the last may be shorter); None: one."""
    if chunk_batches is None:
        return [minibatches]
    return [minibatches[i : i + chunk_batches]
            for i in range(0, len(minibatches), chunk_batches)]


def _chunk_budgets(chunk_images: list[int], chunk_minibatches: list[int], budget: int,
                   batch_size: int, floor: bool) -> list[tuple[int, int | None]]:
    """Each chunk's share of the round's budget, as (images, whole minibatches or None).

    Default: the budget in images, split in proportion to the chunks' images by the largest
    remainder (floor of budget x n_c / N each, then one more image to the chunks with the
    largest remainders, the earlier chunk first on a tie): the shares add up to exactly the
    budget and none exceeds its chunk. floor (batch granularity, budget_rounding="floor"):
    floor(budget x m_c / (B x M)) whole minibatches per chunk (m_c of the M minibatches in
    chunk c), the released ImageNet code's `int((budget / B) * (len(chunk) / len(loader)))`;
    with one chunk it is budget // B, the unchunked flooring. Integer arithmetic throughout.
    """
    if floor:
        total = sum(chunk_minibatches)
        picks = [budget * m // (batch_size * total) for m in chunk_minibatches]
        if sum(picks) < 1:
            raise ConfigError(
                f"select_coreset: budget_rounding='floor' keeps no minibatch: budget // "
                f"batch_size = {budget} // {batch_size} = {budget // batch_size}, and each of "
                f"the {len(picks)} chunk(s) floors its share of it to 0 minibatches"
            )
        return [(min(budget, n), k) for n, k in zip(chunk_images, picks, strict=True)]
    pool = sum(chunk_images)
    quotas = [budget * n for n in chunk_images]
    shares = [quota // pool for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda c: (-(quotas[c] % pool), c))
    for c in by_remainder[: budget - sum(shares)]:
        shares[c] += 1
    return [(share, None) for share in shares]


@contextlib.contextmanager
def _head_restored(layers: list[nn.Linear]) -> Iterator[Callable[[], None]]:
    """Inside the block the head may change (the simulated steps); phi0 comes back exactly after
    it, also on an exception. The block gets the restoring function (to restore phi0 earlier:
    between chunks)."""
    parameters = [p for layer in layers for p in layer.parameters()]
    phi0 = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore() -> None:
        for p, saved in zip(parameters, phi0, strict=True):
            p.copy_(saved)

    try:
        yield restore
    finally:
        restore()


@torch.no_grad()
def _simulated_step(layers: list[nn.Linear], gradient, lr: float, steps: int) -> None:
    """phi <- phi - eta' G_e, applied `steps` times (G_e at phi0, as published)."""
    for layer, (g_w, g_b) in zip(layers, gradient, strict=True):
        for _ in range(int(steps)):
            layer.weight.sub_(lr * g_w)
            if g_b is not None:
                layer.bias.sub_(lr * g_b)


# ---- step 1: the candidates' gradients -----------------------------------------------------------

def _minibatches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < 2:  # NT-Xent needs two images
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def _shuffled_minibatches(pool: torch.Tensor, batch_size: int,
                          generator: torch.Generator | None) -> list[torch.Tensor]:
    """The pass's minibatches: the pool shuffled by `generator`, in minibatches of batch_size."""
    return _minibatches(pool[torch.randperm(pool.numel(), generator=generator)], batch_size)


class _Elements(Sequence):
    """The candidate elements' dataset indices: element e is images[offsets[e]:offsets[e + 1]].

    Two tensors, not one tensor per element (1.3M of them at sample granularity on ImageNet).
    size: how many images every element holds, when they all hold as many (then an element is
    found without reading the offsets); None otherwise.
    """

    def __init__(self, images: torch.Tensor, offsets: torch.Tensor, size: int | None) -> None:
        self.images, self.offsets, self.size = images, offsets, size

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, e):
        if isinstance(e, slice):
            return [self[i] for i in range(*e.indices(len(self)))]
        e = int(e)
        if not -len(self) <= e < len(self):
            raise IndexError(f"element {e} out of range for {len(self)} elements")
        e %= len(self)
        if self.size is not None:
            return self.images[e * self.size : (e + 1) * self.size]
        start, end = self.offsets[e : e + 2].tolist()
        return self.images[start:end]

    def __repr__(self) -> str:
        return f"_Elements({len(self)} elements of {self.images.numel()} images)"

    @staticmethod
    def concatenate(parts: list[_Elements]) -> _Elements:
        sizes = {part.size for part in parts}
        return _Elements(torch.cat([part.images for part in parts]),
                         _concatenated_offsets([part.offsets for part in parts]),
                         sizes.pop() if len(sizes) == 1 else None)


def _concatenated_offsets(parts: list[torch.Tensor]) -> torch.Tensor:
    """Offsets [E_k + 1] of consecutive parts as the offsets of their concatenation."""
    ends = torch.stack([part[-1] for part in parts])  # each part starts at 0
    bases = torch.cat([ends.new_zeros(1), ends.cumsum(0)[:-1]])
    return torch.cat([parts[0][:1]] + [part[1:] + base
                                       for part, base in zip(parts, bases, strict=True)])


@dataclass
class _Candidates:
    """The pass over the pool: per element its projection r_e, its image indices, and its rows
    of the (H, Delta) pairs (element-major) with the factor that makes them its gradient."""

    elements: _Elements
    projections: torch.Tensor  # R [E, D]
    inputs: list[torch.Tensor]  # H_l [rows, in_l]
    grad_outputs: list[torch.Tensor]  # Delta_l [rows, out_l]
    offsets: torch.Tensor  # int64 [E + 1] (CPU): element e owns rows offsets[e]:offsets[e + 1]
    scales: torch.Tensor  # float64 [E] (CPU)

    def on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """offsets and scales on the projections' device (copied once)."""
        if not hasattr(self, "_device_copies"):
            device = self.projections.device
            self._device_copies = (self.offsets.to(device), self.scales.to(device))
        return self._device_copies

    @staticmethod
    def concatenate(parts: list[_Candidates]) -> _Candidates:
        """The candidates of several minibatches, in order, as one (no Python loop over
        elements)."""
        if len(parts) == 1:
            return parts[0]
        return _Candidates(
            elements=_Elements.concatenate([part.elements for part in parts]),
            projections=torch.cat([part.projections for part in parts]),
            inputs=[torch.cat(rows) for rows in zip(*(p.inputs for p in parts), strict=True)],
            grad_outputs=[torch.cat(rows)
                          for rows in zip(*(p.grad_outputs for p in parts), strict=True)],
            offsets=_concatenated_offsets([part.offsets for part in parts]),
            scales=torch.cat([part.scales for part in parts]),
        )


def _candidate_gradients(model, layers, bias, dataset, pool, *, batch_size, generator,
                         progress: bool | None = True, **options) -> _Candidates:
    """Step 1 of the round over the whole pool (shuffled by `generator`); see _pass_over."""
    minibatches = _shuffled_minibatches(pool, batch_size, generator)
    bar = progress_bar(len(minibatches), "RCS pass over the pool", progress, unit="batch")
    try:
        return _pass_over(model, layers, bias, dataset, minibatches, batch_size=batch_size,
                          generator=generator, bar=bar, **options)
    finally:
        bar.close()


def _pass_over(model, layers, bias, dataset, minibatches, *, batch_size, granularity, eps,
               step_size, attack_steps, temperature, strength, interpolation, generator,
               attack_generator, autocast_dtype=None, fold_bn=True, clip_random_start=True,
               bar=None) -> _Candidates:
    """Step 1 of the round on some of the pool's minibatches (all of them, or one chunk): the
    augmented views, the adversarial views by PGD, and each element's (H, Delta) rows and
    projection r_e at the current head (phi0)."""
    dtype = _round_dtype(layers)
    loss = functools.partial(_selection_loss, temperature=temperature)
    # The backbone and phi0 do not change during the pass: the mirrors are refreshed once.
    attacked = _on_branch(model, "adv", fold_bn)
    encoder_adv, encoder_nat = (_encoder(model, branch, fold_bn) for branch in ("adv", "normal"))
    parts = []
    for index in minibatches:
        x1, x2, _ = dataset.views(index, strength, generator, interpolation)
        x1, x2 = x1.to(dtype), x2.to(dtype)  # fp32 views; no copy for an fp32 model
        x1_adv, x2_adv = pgd_contrastive(attacked, x1, x2, eps=eps, step_size=step_size,
                                         steps=attack_steps, generator=attack_generator,
                                         temperature=temperature, autocast_dtype=autocast_dtype,
                                         clip_random_start=clip_random_start)
        rows = 2 * index.numel()
        f_adv = _features(encoder_adv, torch.cat([x1_adv, x2_adv]), rows, autocast_dtype)
        f_nat = _features(encoder_nat, torch.cat([x1, x2]), rows, autocast_dtype)
        h, delta = _pairs_by_image(model, layers, f_adv, f_nat, loss)
        parts.append(_minibatch_candidates(index, h, delta, bias, granularity))
        if bar is not None:
            bar.update(1)
    return _Candidates.concatenate(parts)


def _selection_loss(z_adv: torch.Tensor, z_nat: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain ACL loss, the mean of the natural and the adversarial NT-Xent (docs/rcs.md
    section 3); rows are view 1 then view 2."""
    n = z_adv.shape[0] // 2
    return 0.5 * (nt_xent(z_nat[:n], z_nat[n:], temperature)
                  + nt_xent(z_adv[:n], z_adv[n:], temperature))


def _pairs_by_image(model, layers, f_adv, f_nat, loss_fn):
    """A minibatch's (H, Delta) per head layer, each image's 4 rows made contiguous.

    The head runs on [view 1 adv, view 2 adv, view 1, view 2] x b rows; image-major, every
    element (an image or the minibatch) owns one block of rows."""
    _, h, delta = _head_pairs(model, layers, [(f_adv, "adv"), (f_nat, "normal")], loss_fn)
    b = f_adv.shape[0] // 2

    def by_image(rows: torch.Tensor) -> torch.Tensor:
        return rows.view(4, b, -1).transpose(0, 1).reshape(4 * b, -1)

    return [by_image(t) for t in h], [by_image(t) for t in delta]


def _minibatch_candidates(index, h, delta, bias, granularity) -> _Candidates:
    """The elements of one minibatch from its image-major rows: at "sample" one per image (its 4
    rows), at "batch" the minibatch itself."""
    b = index.numel()
    images = index.cpu()
    if granularity == "sample":
        segments = torch.arange(b, device=h[0].device).repeat_interleave(4)
        r = rcs_project(h, delta, "rowmean", bias, segment_ids=segments, num_segments=b)
        # The sample's gradient is on the scale of a one-sample loss (docs/rcs.md section 2).
        return _Candidates(_Elements(images, torch.arange(b + 1), 1), r * b, h, delta,
                           offsets=torch.arange(0, 4 * b + 1, 4),
                           scales=torch.full((b,), float(b), dtype=torch.float64))
    segments = torch.zeros(4 * b, dtype=torch.int64, device=h[0].device)
    r = rcs_project(h, delta, "rowmean", bias, segment_ids=segments, num_segments=1)
    return _Candidates(_Elements(images, torch.tensor([0, b]), b), r, h, delta,
                       offsets=torch.tensor([0, 4 * b]),
                       scales=torch.ones(1, dtype=torch.float64))


def _element_gradient(candidates: _Candidates, element: int | torch.Tensor, bias):
    """G_e per layer as (weight gradient [out, in], bias gradient [out] or None), from its rows.

    element: a Python int, or a 0-d device tensor when every element has as many rows (its rows
    are then gathered on the device: no read-back).
    """
    if isinstance(element, torch.Tensor):
        # index_select, not t[element]: indexing by a 0-d tensor would read it back.
        offsets, scales = candidates.on_device()
        count = 4 * candidates.elements.size  # every image owns 4 rows (_pairs_by_image)
        rows = (offsets.index_select(0, element.view(1))
                + torch.arange(count, device=element.device))
        scale = scales.index_select(0, element.view(1)).reshape(())  # 0-d: no type promotion
    else:
        start, end = candidates.offsets[element : element + 2].tolist()
        rows = slice(start, end)
        scale = float(candidates.scales[element])
    grads = []
    for h, delta, has_bias in zip(candidates.inputs, candidates.grad_outputs, bias, strict=True):
        d = delta[rows] * scale
        grads.append((d.T @ h[rows], d.sum(dim=0) if has_bias else None))
    return grads


# ---- steps 2 and 3: the validation gradient v ----------------------------------------------------

def _validation_projection(model, layers, bias, f_adv, f_nat, divergence) -> torch.Tensor:
    """v: the projected gradient of RD(U) with respect to the head, from U's frozen features."""
    def rd(z_adv, z_nat):
        return representational_divergence(z_adv, z_nat, divergence)

    _, h, delta = _head_pairs(model, layers, [(f_adv, "adv"), (f_nat, "normal")], rd)
    segments = torch.zeros(h[0].shape[0], dtype=torch.int64, device=h[0].device)
    return rcs_project(h, delta, "rowmean", bias, segment_ids=segments, num_segments=1)[0]


class _ValidationGradient:
    """v at the current head and its refresh after a simulated step.

    The backbone is frozen for the round, so U's natural features f(x_U) are computed once and
    its adversarial features f(x~_U) change only when `reattack` attacks U again (through the
    whole network, the current head included). `attacks` counts the RD attacks.
    """

    def __init__(self, model, layers, bias, x_u: torch.Tensor, *, eps, step_size, steps,
                 divergence, generator, batch_size, fold_bn, clip_random_start) -> None:
        self.model, self.layers, self.bias, self.divergence = model, layers, bias, divergence
        self.x_u, self.batch_size = x_u, batch_size
        self.attack_options = dict(eps=eps, step_size=step_size, steps=steps,
                                   divergence=divergence, generator=generator,
                                   batch_size=batch_size, fold_bn=fold_bn,
                                   clip_random_start=clip_random_start)
        self.f_nat = _features(_encoder(model, "normal", fold_bn), x_u, batch_size)
        # The simulated steps change the head only: the backbone's features stay valid.
        self.encoder_adv = _encoder(model, "adv", fold_bn)
        self.attacks = 0
        self.reattack()

    def reattack(self) -> None:
        x_adv = rd_attack(self.model, self.x_u, **self.attack_options)
        self.f_adv = _features(self.encoder_adv, x_adv, self.batch_size)
        self.attacks += 1

    def projection(self) -> torch.Tensor:
        return _validation_projection(self.model, self.layers, self.bias, self.f_adv, self.f_nat,
                                      self.divergence)
