"""Attacks: PGD on the contrastive loss (ACL's adversarial views, docs/acl-air.md section 3), PGD
on cross-entropy (ALF training and PGD-20 evaluation), the TRADES inner maximisation (AFF), an
AutoAttack adapter, and robust accuracy (docs/acl-air.md section 8): `robust_accuracy` is the one
routine every evaluation (fastacl.evaluation's protocols and quick check) measures PGD-20 with.

Every attack runs with the model in eval mode and its parameters frozen, and asks autograd for
the gradient of the loss with respect to the input only: no weight gradient is computed, no
parameter .grad is touched, and every module's training flag and every parameter's requires_grad
are restored afterwards. Perturbations live in [0, 1] pixel space (the model normalises
internally), l_inf budgets only. Each step is the fused `fastacl.ops.pgd_step_`.

Dual-BN models are recognised by a `branch` keyword in their forward; they are called with
`branch=...` (the attacks default to "adv"), any other module is called as model(x).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.ops import nt_xent
from fastacl.ops.pgd_step import check_budget
from fastacl.utils import at_least_fp32, unwrap
from fastacl.utils import progress as progress_bar

# TRADES starts its inner maximisation at x + 0.001 N(0, 1) (Zhang et al. 2019, public code).
TRADES_START_STD = 0.001
# The published PGD-10 / TRADES / PGD-20 step is eps / 4: 2/255 at eps 8/255 (docs/acl-air.md
# section 8).
STEP_FRACTION = 1 / 4
PGD20_STEPS = 20


# ---- model calls -------------------------------------------------------------------------------

@functools.cache
def _forward_takes_branch(module_type: type) -> bool:
    return "branch" in inspect.signature(module_type.forward).parameters


def _takes_branch(model: nn.Module) -> bool:
    """True for a dual-BN model: its forward (behind torch.compile / DDP wrappers) has `branch`."""
    return _forward_takes_branch(type(unwrap(model)))


def _check_autocast(op: str, dtype: torch.dtype | None) -> None:
    if dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"{op}: autocast_dtype must be None or torch.bfloat16, got {dtype}: fp16 input "
            "gradients underflow to 0 without a loss scaler, and sign(0) = 0 stalls the attack"
        )


def _forward(model: nn.Module, x: torch.Tensor, branch: str | None,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """model(x) (with branch= for dual-BN models), optionally under bf16 autocast; fp32 out."""
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    with autocast:
        out = model(x, branch=branch) if branch is not None and _takes_branch(model) else model(x)
    # Losses are computed in fp32 (float64 for a float64 model) outside autocast (the softmax
    # over a batch needs the range).
    return at_least_fp32(out)


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside the block; every flag restored exactly after it.

    Frozen parameters make autograd skip the weight-gradient half of every backward; the
    previous training flag of every submodule (not just the top one) and the previous
    requires_grad of every parameter (frozen ones included) come back afterwards.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in requires_grad:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for module, flag in training:
            module.train(flag)


# ---- input checks ------------------------------------------------------------------------------

def _check_images(op: str, check_range: bool = True, **images: torch.Tensor) -> None:
    """Clean images [N, ...] in [0, 1], floating point, all the same shape, dtype and device.
    check_range=False skips the [0, 1] check, the only one that reads values back to the host
    (on a GPU, a synchronisation)."""
    first_name, first = next(iter(images.items()))
    for name, x in images.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point image tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(
                f"{op}: {name} must be a non-empty batch [N, ...], got shape {tuple(x.shape)}"
            )
        if x.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(x.shape)} but {first_name} has "
                f"{tuple(first.shape)}: both views of each image must have the same shape"
            )
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"{op}: {name} is {x.dtype} on {x.device} but {first_name} is "
                f"{first.dtype} on {first.device}"
            )
        if not check_range:
            continue
        low, high = (v.item() for v in torch.aminmax(x.detach()))
        if not (0 <= low and high <= 1):  # also rejects NaN
            raise ValueError(
                f"{op}: {name} must hold clean images with pixel values in [0, 1], got values in "
                f"[{low:.4g}, {high:.4g}]: pass images before normalisation (the model "
                "normalises internally, so eps is measured in [0, 1] pixel space)"
            )


def _check_labels(op: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{op}: y must be an integer class-index tensor, got {got}")
    if y.shape != x.shape[:1] or y.device != x.device:
        raise ValueError(
            f"{op}: y must be [N] = [{x.shape[0]}] on {x.device}, got shape {tuple(y.shape)} "
            f"on {y.device}"
        )


def _check_steps(op: str, steps: int) -> int:
    steps = operator.index(steps)
    if steps < 0:
        raise ValueError(f"{op}: steps must be >= 0, got {steps}")
    return steps


# ---- the PGD loop ------------------------------------------------------------------------------

def _uniform_start(x_nat: torch.Tensor, eps: float, generator: torch.Generator | None,
                   clip: bool) -> torch.Tensor:
    """x_nat + U[-eps, eps]; clipped to [0, 1] unless clip=False (the published code's start)."""
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-eps, eps, generator=generator)
    return x_adv.clamp_(0.0, 1.0) if clip else x_adv


def _ascend(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor],
            x_nat: torch.Tensor, x_adv: torch.Tensor, eps: float, step_size: float,
            steps: int) -> torch.Tensor:
    """`steps` signed-gradient ascent steps on loss_fn from x_adv, projected after each step."""
    # A copy: the start may be x_nat itself (no random start), and x_nat may share memory with
    # the caller's images; pgd_step_ writes into x_adv.
    x_adv = x_adv.detach().clone()
    with frozen_eval(model), torch.enable_grad():
        for _ in range(steps):
            # The gradient with respect to x_adv = x_nat + delta is the gradient with respect to
            # delta (x_nat is a constant); x_adv is the only tensor autograd differentiates.
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
            x_adv = x_adv.detach()
            # Budget already checked once by the caller: call the registered op directly.
            torch.ops.fastacl.pgd_step_(x_adv, grad, x_nat, eps, step_size, "linf")
    return x_adv


def pgd_contrastive(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 5,
    random_start: bool = True,
    branch: str = "adv",
    generator: torch.Generator | None = None,
    temperature: float = 0.5,
    clip_random_start: bool = True,
    autocast_dtype: torch.dtype | None = None,
    check_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial views for ACL: l_inf PGD maximising NT-Xent over both views jointly.

    loss = nt_xent(h(x1_adv), h(x2_adv), temperature), h = the model's output (the projection);
    both views go through the model as one batch of 2N images. Defaults are the published ones
    (eps 8/255, step 2/255, 5 steps, uniform random start; docs/acl-air.md section 3).

    Args:
        model: the encoder with its projection head; called with branch= if it is dual-BN.
        x1, x2: the two augmented views [N, ...], clean pixels in [0, 1], N >= 2.
        random_start: start from x + U[-eps, eps], drawn as one [2N, ...] tensor (view 1
            first) from `generator` (on the images' device) or the global RNG.
        clip_random_start: clip the start to [0, 1] (fastacl); False reproduces the published
            code, whose first forward sees x + delta unclipped.
        autocast_dtype: torch.bfloat16 runs the model forward under autocast (sign() makes the
            step insensitive to bf16 gradient noise); fp16 is refused.
        check_range: check that the views are in [0, 1]. The check reads their range back to
            the host (a device synchronisation); the trainer, whose views are in [0, 1] by
            construction (uint8 data, augmented in [0, 1]), turns it off.

    Returns:
        (x1_adv, x2_adv), detached, same shape and dtype as the views.
    """
    op = "pgd_contrastive"
    _check_images(op, check_range, x1=x1, x2=x2)
    if x1.shape[0] < 2:
        raise ValueError(f"{op}: NT-Xent needs a batch of N >= 2 images, got N = {x1.shape[0]}")
    eps, step_size = check_budget(op, eps, step_size)
    steps = _check_steps(op, steps)
    _check_autocast(op, autocast_dtype)

    n = x1.shape[0]
    x_nat = torch.cat([x1, x2]).detach()
    x_adv = _uniform_start(x_nat, eps, generator, clip_random_start) if random_start else x_nat

    def contrastive_loss(x: torch.Tensor) -> torch.Tensor:
        z = _forward(model, x, branch, autocast_dtype)
        return nt_xent(z[:n], z[n:], temperature)

    x_adv = _ascend(model, contrastive_loss, x_nat, x_adv, eps, step_size, steps)
    return x_adv[:n], x_adv[n:]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    random_start: bool = True,
    branch: str = "adv",
    generator: torch.Generator | None = None,
    clip_random_start: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """l_inf PGD on cross-entropy (ALF's training examples, PGD-20 evaluation); returns x_adv.

    The defaults are PGD-20 of docs/acl-air.md section 8 (eps 8/255, step 2/255, random start).
    """
    op = "pgd"
    _check_images(op, x=x)
    _check_labels(op, x, y)
    eps, step_size = check_budget(op, eps, step_size)
    steps = _check_steps(op, steps)
    _check_autocast(op, autocast_dtype)

    x_nat = x.detach()
    x_adv = _uniform_start(x_nat, eps, generator, clip_random_start) if random_start else x_nat

    def cross_entropy(x_adv: torch.Tensor) -> torch.Tensor:
        # A sum, not a mean: sign() ignores the scale, and per-sample gradients then do not
        # shrink with the batch size (which matters for bf16).
        return F.cross_entropy(_forward(model, x_adv, branch, autocast_dtype), y, reduction="sum")

    return _ascend(model, cross_entropy, x_nat, x_adv, eps, step_size, steps)


def trades_perturb(
    model: nn.Module,
    x: torch.Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    branch: str = "adv",
    natural_branch: str = "normal",
    generator: torch.Generator | None = None,
    clip_random_start: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The TRADES inner maximisation (AFF): l_inf PGD on KL(p(x) || p(x_adv)); returns x_adv.

    Starts at x + 0.001 N(0, 1) (kept inside the eps-ball; clipped to [0, 1] unless
    clip_random_start=False). For dual-BN models the natural prediction p(x) goes through
    `natural_branch` and the adversarial one through `branch` (docs/acl-air.md section 8, AFF).
    The defaults are the published AFF inner maximisation (10 steps of 2/255, eps 8/255).
    """
    op = "trades_perturb"
    _check_images(op, x=x)
    eps, step_size = check_budget(op, eps, step_size)
    steps = _check_steps(op, steps)
    _check_autocast(op, autocast_dtype)

    x_nat = x.detach()
    with frozen_eval(model), torch.no_grad():
        p_natural = F.softmax(_forward(model, x_nat, natural_branch, autocast_dtype), dim=1)
    noise = torch.randn(x_nat.shape, generator=generator, device=x_nat.device, dtype=x_nat.dtype)
    x_adv = x_nat + (TRADES_START_STD * noise).clamp_(-eps, eps)
    if clip_random_start:
        x_adv.clamp_(0.0, 1.0)

    def kl_divergence(x_adv: torch.Tensor) -> torch.Tensor:
        log_p_adv = F.log_softmax(_forward(model, x_adv, branch, autocast_dtype), dim=1)
        return F.kl_div(log_p_adv, p_natural, reduction="sum")

    return _ascend(model, kl_divergence, x_nat, x_adv, eps, step_size, steps)


# ---- robust accuracy ---------------------------------------------------------------------------

def is_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
              branch: str = "adv") -> torch.Tensor:
    """Bool [N]: correct on the clean point AND on its adversarial version (docs/acl-air.md
    section 8).

    A point the model already gets wrong is never counted robust, so robust <= clean.
    """
    with frozen_eval(model), torch.no_grad():
        correct_clean = _forward(model, x, branch).argmax(dim=1) == y
        correct_adversarial = _forward(model, x_adv, branch).argmax(dim=1) == y
    return correct_clean & correct_adversarial


@dataclass
class AutoAttackResult:
    clean_accuracy: float
    robust_accuracy: float  # correct clean and under every attack of the version
    per_attack: dict[str, float]  # robust accuracy after each attack, in the order run
    robust: torch.Tensor  # bool [N], per point
    x_adv: torch.Tensor  # the successful adversarial example where one was found, else x


class _Logits(nn.Module):
    """What AutoAttack calls: model(x) -> logits, on the requested BN branch."""

    def __init__(self, model: nn.Module, branch: str | None):
        super().__init__()
        self.model, self.branch = model, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.model, x, self.branch)


@torch.no_grad()
def _predict(logits_model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([logits_model(batch).argmax(dim=1) for batch in x.split(batch_size)])


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    version: str = "standard",
    batch_size: int = 256,
    seed: int = 0,
    attacks: list[str] | None = None,
    branch: str = "adv",
) -> AutoAttackResult:
    """l_inf AutoAttack through the pyautoattack package, with a fixed seed.

    version "standard" runs APGD-CE, APGD-T, FAB-T and Square, each on the points still robust
    after the previous ones (AutoAttack's cascade); version="custom" runs `attacks` (a subset of
    "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square") the same way. The cascade is run
    one attack at a time so that the robust accuracy after each attack can be reported; the
    points, batches and seeds each attack sees are those of a single AutoAttack run. The global
    RNG, which pyautoattack reseeds, is restored afterwards.
    """
    from pyautoattack import AutoAttack

    op = "autoattack"
    _check_images(op, x=x)
    _check_labels(op, x, y)
    eps, _ = check_budget(op, eps, eps)
    if (attacks is not None) != (version == "custom"):
        raise ValueError(
            f"{op}: attacks= is for version='custom' only (got version={version!r}, "
            f"attacks={attacks!r})"
        )

    x, y = x.detach(), y.detach()
    logits_model = _Logits(model, branch)
    rng_devices = [x.device] if x.is_cuda else []
    with frozen_eval(model), torch.random.fork_rng(devices=rng_devices):
        adversary = AutoAttack(logits_model, norm="Linf", eps=eps, version=version, seed=seed,
                               attacks=attacks, device=x.device)
        adversary.verbose = False
        robust = _predict(logits_model, x, batch_size) == y
        clean_accuracy = robust.float().mean().item()
        x_adv = x.clone()
        per_attack = {}
        for attack in list(adversary.attacks_to_run):
            remaining = robust.nonzero().squeeze(1)
            if remaining.numel() > 0:
                adversary.attacks_to_run = [attack]
                x_attacked, _ = adversary.run_standard_evaluation(
                    x[remaining], y[remaining], batch_size=batch_size
                )
                fooled = _predict(logits_model, x_attacked, batch_size) != y[remaining]
                robust[remaining[fooled]] = False
                x_adv[remaining[fooled]] = x_attacked[fooled]
            per_attack[attack] = robust.float().mean().item()
    return AutoAttackResult(
        clean_accuracy=clean_accuracy,
        robust_accuracy=robust.float().mean().item(),
        per_attack=per_attack,
        robust=robust,
        x_adv=x_adv,
    )


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = "pgd20",
    eps: float = 8 / 255,
    batch_size: int = 256,
    branch: str | None = "adv",
    generator: torch.Generator | None = None,
    progress: bool | None = False,
) -> float:
    """Fraction of points correct both clean and under `attack` (docs/acl-air.md section 8).

    attack: "pgd20" (20 steps of eps / 4 from a uniform random start drawn from `generator`, on
    the images' device, or the global RNG: 2/255 at the published 8/255), "autoattack"
    (standard, seed 0, in one run), or a callable (model, x, y) -> x_adv; the per-batch attacks
    run in chunks of `batch_size`. x: clean images, float in [0, 1] or uint8 (each chunk is
    divided by 255 as it is attacked). progress: a display of the chunks attacked (see
    fastacl.utils.progress).
    """
    if attack == "autoattack":
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        result = autoattack(model, x, y, eps=eps, batch_size=batch_size, branch=branch)
        return result.robust_accuracy
    name = attack if isinstance(attack, str) else getattr(attack, "__name__", "attack")
    if attack == "pgd20":
        def attack(model, x, y):
            return pgd(model, x, y, eps=eps, step_size=eps * STEP_FRACTION, steps=PGD20_STEPS,
                       random_start=True, branch=branch, generator=generator)
    elif not callable(attack):
        raise ValueError(
            f"robust_accuracy: attack must be 'pgd20', 'autoattack' or a callable, got {attack!r}"
        )
    robust = []
    bar = progress_bar(y.shape[0], "PGD-20" if name == "pgd20" else name, progress, unit="img")
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        robust.append(is_robust(model, xb, yb, attack(model, xb, yb), branch))
        bar.update(yb.shape[0])
    bar.close()
    return torch.cat(robust).float().mean().item()
