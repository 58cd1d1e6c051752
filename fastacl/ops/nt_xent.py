"""NT-Xent, the SimCLR contrastive loss (docs/acl-air.md section 4).

For views z1, z2 [N, d] (row k of each is a positive pair): rows are L2-normalised, the 2N x 2N
logits are cosine similarities / t, each of the 2N anchors has its other view as the positive and
the 2N - 2 other rows as negatives (itself excluded), and the loss is the mean cross-entropy over
the 2N anchors.

Two paths behind one registered op (fastacl::nt_xent_forward / fastacl::nt_xent_backward):
  "triton"  kernels/nt_xent.py: tiled online log-sum-exp, forward and backward, O(N d) memory
            (the 2N x 2N matrix is never written); fp32 / bf16 / fp16 inputs.
  "torch"   the reference's logits below and the dense gradient formula (the CPU path, and
            the path for float64 inputs).
The path is chosen when the op runs (FASTACL_BACKEND / use_backend, see _dispatch.py), and again
when its backward runs. Both paths return the same per-anchor lse, so a backward on either path
is correct after a forward on either path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastacl.ops import _dispatch
from fastacl.ops._checks import autocast_off, check_embeddings, check_temperature

# dtypes the kernels take (they accumulate in fp32, which would lose float64's precision)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORM_EPS = 1e-12  # F.normalize's default eps


def nt_xent_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2N x 2N logits cos(z_a, z_b) / t with the anchor itself at -inf, and each anchor's
    positive (row a of z1 pairs with row a of z2)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return logits, positives


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The plain formulation: materialises the 2N x 2N similarity matrix. The oracle for tests."""
    logits, positives = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, positives)


def _path(z: torch.Tensor) -> str:
    paths = ("triton",) if z.dtype in _TRITON_DTYPES else ()
    return _dispatch.select("nt_xent", z, paths)


@torch.library.custom_op("fastacl::nt_xent_forward", mutates_args=())
def nt_xent_forward(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): the mean NT-Xent (0-d, input dtype) and, per anchor a, the fp32
    lse_a = log sum_{b != a} exp(cos(z_a, z_b) / t) that the backward needs."""
    if _path(z1) == "triton":
        from fastacl.kernels import nt_xent as kernels  # only now: fastacl imports without triton

        return kernels.nt_xent_forward(z1, z2, temperature)
    logits, positives = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, positives), torch.logsumexp(logits.float(), dim=1)


@nt_xent_forward.register_fake
def _(z1, z2, temperature):
    return z1.new_empty(()), z1.new_empty((2 * z1.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastacl::nt_xent_backward", mutates_args=())
def nt_xent_backward(
    grad_loss: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dz1, dL/dz2) for the upstream gradient g = grad_loss (0-d).

    With P_ab = softmax over b != a of the logits cos(z_a, z_b) / t and pos(a) anchor a's
    positive, dL/d(logit_ab) = g / (2N) (P_ab - [b == pos(a)]). Logit ab depends on u_a and u_b
    (u = z / max(||z||, eps)), so dL/du = (G + G^T) U / t for G = dL/dlogits, and through the
    normalisation dL/dz = (dL/du - u (u . dL/du)) / ||z|| (dL/du / eps where ||z|| <= eps).
    The Triton path does this tile by tile from the forward's lse. The torch path recomputes the
    logits with the reference's own nt_xent_logits and applies the formula densely; it cannot
    differentiate the reference with autograd because a custom op runs below the Autograd key
    (nothing is recorded), and torch.func.vjp there breaks under dispatch modes (opcheck's schema
    check, FlopCounterMode). The tests hold it to autograd of the reference in float64.
    """
    if _path(z1) == "triton":
        from fastacl.kernels import nt_xent as kernels

        return kernels.nt_xent_backward(grad_loss, z1, z2, lse, temperature)
    # float32 at least, as the kernels; float64 stays float64, so it recomputes its own lse
    dtype = torch.promote_types(z1.dtype, torch.float32)
    logits, positives = nt_xent_logits(z1.to(dtype), z2.to(dtype), temperature)
    n_rows = logits.shape[0]
    grad_logits = torch.softmax(logits, dim=1)  # the anchor's own -inf logit gives P_aa = 0
    grad_logits[torch.arange(n_rows), positives] -= 1
    grad_logits *= grad_loss.to(dtype) / n_rows
    u = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
    grad_u = (grad_logits + grad_logits.T) @ u / temperature
    n = z1.shape[0]
    return _normalize_backward(z1, u[:n], grad_u[:n]), _normalize_backward(z2, u[n:], grad_u[n:])


def _normalize_backward(z: torch.Tensor, u: torch.Tensor, grad_u: torch.Tensor) -> torch.Tensor:
    """dL/dz for u = F.normalize(z): the part of dL/du orthogonal to u, over the norm."""
    norms = torch.linalg.vector_norm(z.to(u.dtype), dim=1, keepdim=True)
    radial = (u * grad_u).sum(dim=1, keepdim=True) * (norms > _NORM_EPS)
    return ((grad_u - u * radial) / norms.clamp_min(_NORM_EPS)).to(z.dtype)


@nt_xent_backward.register_fake
def _(grad_loss, z1, z2, lse, temperature):
    return torch.empty_like(z1), torch.empty_like(z2)


def _setup_context(ctx, inputs, output):
    z1, z2, temperature = inputs
    _, lse = output
    ctx.save_for_backward(z1, z2, lse)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse)  # saved for the backward, not a loss term


def _backward(ctx, grad_loss, _grad_lse):
    z1, z2, lse = ctx.saved_tensors
    grad_z1, grad_z2 = nt_xent_backward(grad_loss, z1, z2, lse, ctx.temperature)
    return grad_z1, grad_z2, None


nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """NT-Xent of two views; a 0-d tensor, differentiable in z1 and z2.

    Args:
        z1, z2: [N, d] embeddings of the two views, N >= 2; row k of z1 and row k of z2 are a
            positive pair, every other row is a negative.
        temperature: t > 0, the logits are cosine similarities / t.
        gather_distributed: under torch.distributed, contrast against the negatives of every
            rank: z1 and z2 of all ranks are gathered (rank order, one differentiable
            all-gather; each row keeps its own positive) and every rank returns the loss of the
            whole global batch of W * N images. Rank r's gradient for its rows is W times its
            slice of that loss's gradient, so DDP's average over ranks gives exactly the
            single-process gradient of the global batch (fastacl.distributed). Every rank must
            pass the same N. Without a process group (or with one rank) it changes nothing.
    Returns:
        The mean over the 2N anchors (2WN when gathered) of -log softmax(logits)[positive], in
        the input dtype.
    """
    check_embeddings("nt_xent", z1=z1, z2=z2)
    temperature = check_temperature("nt_xent", temperature)
    if gather_distributed:
        from fastacl.distributed import all_gather_rows

        z1, z2 = all_gather_rows(z1, z2)
    with autocast_off(z1):
        loss, _ = nt_xent_forward(z1, z2, temperature)
    return loss
