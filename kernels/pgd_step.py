"""Triton kernels of the fused PGD update (fastacl/ops/pgd_step.py holds dispatch and checks).

Both kernels read x_adv, grad and x_nat once and write x_adv once, in place, and compute in fp32
whatever the storage dtype. Tensors arrive dense and in one memory layout (the launcher's caller
makes sure), so element i of one is element i of the others and sample n is the contiguous run
[n * sample_size, (n + 1) * sample_size) in every layout with the batch dimension outermost
(contiguous and channels_last alike).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

LINF_BLOCK = 1024
L2_BLOCK = 1024


@triton.jit
def _sign(g):
    # torch.sign: +1, -1, or 0 for a zero gradient (PGD does not move that coordinate).
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def pgd_step_linf_kernel(x_adv_ptr, grad_ptr, x_nat_ptr, n_elements, eps, step_size,
                         BLOCK: tl.constexpr):
    # The canonical form of docs/acl-air.md section 3 on delta = x_adv - x_nat, in the same op
    # order as the PyTorch reference so that fp32 results agree bit for bit:
    #   delta <- clip(delta + step * sign(grad), -eps, eps);  x_adv <- clip(x_nat + delta, 0, 1)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x_adv = tl.load(x_adv_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    x_nat = tl.load(x_nat_ptr + offsets, mask=mask).to(tl.float32)
    delta = x_adv - x_nat
    delta = delta + step_size * _sign(grad)
    delta = tl.minimum(tl.maximum(delta, -eps), eps)
    x_adv = tl.minimum(tl.maximum(x_nat + delta, 0.0), 1.0)
    tl.store(x_adv_ptr + offsets, x_adv.to(x_adv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pgd_step_l2_kernel(x_adv_ptr, grad_ptr, x_nat_ptr, sample_size, eps, step_size,
                       GRAD_NORM_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    # One program per sample. The two norms are reductions over the whole sample, so the sample
    # is swept three times from one program (gradient norm, norm of the stepped delta, write);
    # samples of a few thousand values stay in L1/L2 between sweeps.
    row_start = tl.program_id(0).to(tl.int64) * sample_size

    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, sample_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < sample_size
        grad = tl.load(grad_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_sq += grad * grad
    grad_scale = step_size / tl.maximum(tl.sqrt(tl.sum(grad_sq, axis=0)), GRAD_NORM_FLOOR)

    delta_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, sample_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < sample_size
        x_adv = tl.load(x_adv_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        x_nat = tl.load(x_nat_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        delta = (x_adv - x_nat) + grad * grad_scale
        delta_sq += delta * delta
    # eps / max(||delta||, eps) is exactly 1 inside the ball and never divides by zero.
    shrink = eps / tl.maximum(tl.sqrt(tl.sum(delta_sq, axis=0)), eps)

    for start in range(0, sample_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < sample_size
        x_adv = tl.load(x_adv_ptr + row_start + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + row_start + offsets, mask=mask).to(tl.float32)
        x_nat = tl.load(x_nat_ptr + row_start + offsets, mask=mask).to(tl.float32)
        delta = ((x_adv - x_nat) + grad * grad_scale) * shrink
        x_adv = tl.minimum(tl.maximum(x_nat + delta, 0.0), 1.0)
        tl.store(x_adv_ptr + row_start + offsets, x_adv.to(x_adv_ptr.dtype.element_ty), mask=mask)


def pgd_step_linf_(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: float,
                   step_size: float) -> None:
    n_elements = x_adv.numel()
    grid = (triton.cdiv(n_elements, LINF_BLOCK),)
    with _launch.on_device(x_adv):
        pgd_step_linf_kernel[grid](x_adv, grad, x_nat, n_elements, eps, step_size,
                                   BLOCK=LINF_BLOCK)  # fmt: skip


def pgd_step_l2_(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: float,
                 step_size: float, grad_norm_floor: float) -> None:
    n_samples = x_adv.shape[0]
    sample_size = x_adv.numel() // n_samples
    with _launch.on_device(x_adv):
        pgd_step_l2_kernel[(n_samples,)](
            x_adv, grad, x_nat, sample_size, eps, step_size,
            GRAD_NORM_FLOOR=grad_norm_floor, BLOCK=L2_BLOCK,
        )
