"""The fused PGD update, in place (docs/acl-air.md section 3, canonical form on the perturbation).

With delta = x_adv - x_nat and per-sample norms over every dimension but the first:
  linf:  delta <- clip(delta + step * sign(grad), -eps, eps)
  l2:    delta <- delta + step * grad / ||grad||_2;  delta <- delta * min(1, eps / ||delta||_2)
  both:  x_adv <- clip(x_nat + delta, 0, 1)
Clipping to [0, 1] only moves x_adv towards x_nat (which lies in [0, 1]), so x_adv stays in the
eps-ball; in floating point |x_adv - x_nat| may exceed eps by one ulp of the pixel value.

Paths: Triton (one kernel, one read of each input and one write; CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1; fp32 / bf16 / fp16 storage, fp32 arithmetic) and the PyTorch reference,
which is also the CPU path and the float64 path. The op is not
differentiable: the attack's gradient flows through the model, never through the update.
"""

from __future__ import annotations

import math
import warnings

import torch

from fastacl.errors import ConfigError
from fastacl.ops import _dispatch

NORMS = ("linf", "l2")

# Floor of the per-sample gradient norm (l2): a zero gradient gives a zero step, not 0/0.
GRAD_NORM_FLOOR = 1e-12


def check_budget(op: str, eps: float, step_size: float, norm: str = "linf",
                 stacklevel: int = 3) -> tuple[float, float]:
    """Validate an attack budget; returns (eps, step_size) as floats.

    l_inf eps must be in (0, 1] because pixels are in [0, 1]; a step larger than eps is legal
    (one-step attacks use it) and only warns.
    """
    if norm not in NORMS:
        raise ValueError(f"{op}: unknown norm {norm!r}: expected one of {', '.join(NORMS)}")
    eps, step_size = float(eps), float(step_size)
    if norm == "linf" and not 0 < eps <= 1:  # also rejects NaN
        hint = f", did you mean {eps:g}/255?" if 1 < eps <= 255 else ""
        raise ValueError(
            f"{op}: eps must be in (0, 1], got {eps}: pixel values are in [0, 1]{hint}"
        )
    if norm == "l2" and not 0 < eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number > 0 for norm='l2', got {eps}")
    if not 0 < step_size < math.inf:
        raise ValueError(f"{op}: step_size must be a finite number > 0, got {step_size}")
    if step_size > eps:
        warnings.warn(
            f"{op}: step_size {step_size:g} is larger than eps {eps:g}; legal (one-step "
            "attacks use it), but each step then overshoots the eps-ball and is projected back",
            stacklevel=stacklevel,
        )
    return eps, step_size


def _check_tensors(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor) -> None:
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"pgd_step_: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"pgd_step_: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != x_adv.shape:
            raise ValueError(
                f"pgd_step_: {name} has shape {tuple(t.shape)} but x_adv has "
                f"{tuple(x_adv.shape)}: x_adv, grad and x_nat must match element for element"
            )
        if t.dtype != x_adv.dtype or t.device != x_adv.device:
            raise ValueError(
                f"pgd_step_: {name} is {t.dtype} on {t.device} but x_adv is "
                f"{x_adv.dtype} on {x_adv.device}"
            )
    if x_adv.dim() == 0:
        raise ValueError("pgd_step_: x_adv must have a batch dimension, got a 0-d tensor")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_n||_2 over all but the batch dimension, shaped to broadcast against t."""
    return t.reshape(t.shape[0], -1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))


def pgd_step_reference_(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
                        eps: float, step_size: float, norm: str = "linf") -> None:
    """The canonical op sequence, in place; the CPU path and the oracle of the Triton kernels."""
    delta = x_adv - x_nat
    if norm == "linf":
        delta.add_(grad.sign(), alpha=step_size).clamp_(-eps, eps)
    else:
        delta.add_(grad * (step_size / _per_sample_norm(grad).clamp_min(GRAD_NORM_FLOOR)))
        # eps / max(||delta||, eps) is exactly 1 inside the ball and never divides by zero.
        delta.mul_(eps / _per_sample_norm(delta).clamp_min(eps))
    torch.add(x_nat, delta, out=x_adv).clamp_(0.0, 1.0)


def _dense_layout(x_adv: torch.Tensor) -> torch.memory_format | None:
    """The layout in which x_adv is dense with the batch dimension outermost, if any."""
    if x_adv.is_contiguous():
        return torch.contiguous_format
    if x_adv.dim() == 4 and x_adv.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _pgd_step_triton_(x_adv, grad, x_nat, eps, step_size, norm) -> None:
    from fastacl.kernels import pgd_step as kernels  # only the Triton path needs triton

    # The kernels index all three tensors by one flat offset: give grad and x_nat x_adv's layout
    # (no copy when they already have it), and work on a dense copy if x_adv has none.
    layout = _dense_layout(x_adv)
    work = x_adv if layout is not None else x_adv.contiguous()
    layout = layout or torch.contiguous_format
    grad = grad.contiguous(memory_format=layout)
    x_nat = x_nat.contiguous(memory_format=layout)
    if norm == "linf":
        kernels.pgd_step_linf_(work, grad, x_nat, eps, step_size)
    else:
        kernels.pgd_step_l2_(work, grad, x_nat, eps, step_size, GRAD_NORM_FLOOR)
    if work is not x_adv:
        x_adv.copy_(work)


@torch.library.custom_op("fastacl::pgd_step_", mutates_args=("x_adv",))
def _pgd_step_op(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: float,
                 step_size: float, norm: str) -> None:
    if x_adv.numel() == 0:
        return
    # The kernels compute in fp32: float64 (a test and debugging dtype) keeps the reference.
    paths = ("triton",) if x_adv.dtype != torch.float64 else ()
    if _dispatch.select("pgd_step_", x_adv, paths) == "triton":
        _pgd_step_triton_(x_adv, grad, x_nat, eps, step_size, norm)
    else:
        pgd_step_reference_(x_adv, grad, x_nat, eps, step_size, norm)


@_pgd_step_op.register_fake
def _(x_adv, grad, x_nat, eps, step_size, norm) -> None:
    return None


def pgd_step_(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor,
              eps: float | torch.Tensor = 8 / 255, step_size: float = 2 / 255,
              norm: str = "linf") -> torch.Tensor:
    """One PGD update of x_adv in place, projected onto the eps-ball around x_nat and [0, 1].

    Args:
        x_adv: current adversarial images [N, ...] (updated in place; not a leaf requiring grad).
        grad: gradient of the attack loss at x_adv, same shape, dtype and device.
        x_nat: the clean images the budget is measured from, pixels in [0, 1].
        eps: radius of the ball; l_inf eps must be in (0, 1] (8/255, not 8). A Python number,
            a 0-d tensor, or a per-sample budget: a tensor of N values ([N] or [N, 1, ..., 1]),
            each checked like a number (one read-back of the tensor). A per-sample budget runs
            the PyTorch reference (the fused kernels take one eps).
        step_size: step length (alpha); larger than eps is legal and warns.
        norm: "linf" (sign step, per-pixel clip) or "l2" (normalised step, per-sample rescale).

    Returns:
        x_adv (the same tensor, updated).
    """
    _check_tensors(x_adv, grad, x_nat)
    if isinstance(eps, torch.Tensor) and eps.dim() > 0:
        per_sample = _per_sample_budget(eps, x_adv)
        for value in per_sample.flatten().tolist():  # each value checked as a number would be
            check_budget("pgd_step_", value, step_size, norm)
        pgd_step_reference_(x_adv, grad, x_nat, per_sample, float(step_size), norm)
        return x_adv
    eps, step_size = check_budget("pgd_step_", eps, step_size, norm)
    _pgd_step_op(x_adv, grad, x_nat, eps, step_size, norm)
    return x_adv


def _per_sample_budget(eps: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """eps of N values as [N, 1, ..., 1] (broadcasting against x_adv), in x_adv's dtype/device."""
    n = x_adv.shape[0]
    trailing = (1,) * (x_adv.dim() - 1)
    if eps.shape not in ((n,), (n, *trailing)):
        raise ConfigError(
            f"pgd_step_: a tensor eps must be 0-d, [N] or [N, 1, ..., 1] for a per-sample "
            f"budget (N = {n}, x_adv {tuple(x_adv.shape)}), got shape {tuple(eps.shape)}"
        )
    return eps.to(device=x_adv.device, dtype=x_adv.dtype).reshape(n, *trailing)
