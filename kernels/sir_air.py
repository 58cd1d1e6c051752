"""Triton kernels of the SIR and AIR regularisers (docs/acl-air.md section 6).

The math, the autograd wiring and the reference live in fastacl/ops/sir_air.py; this file holds
only @triton.jit kernels and their launchers.

One kernel set serves both regularisers. Each view u (u = i, j) has a distribution r_u over the
batch index k that is a product of FACTORS batch softmaxes of matched-pair cosine similarities:
  SIR (FACTORS = 1): r_u = P_u = softmax_k(cos(z^u_k, z^o_k) / t)
  AIR (FACTORS = 2): r_u = R_u = softmax_k(cos(z~^u_k, z^o_k) / t) softmax_k(cos(z~^u_k, z^u_k) / t)
so the launchers take z_orig, the two `views` whose rows are compared with it (z^u for SIR, z~^u
for AIR) and, for AIR only, the two `natural_views` z^u that the adversarial views are also
compared with. The loss is
  L = sum_k r_j,k (log r_j,k - g(log r_i,k)),   g = identity ("exact") or exp ("reference-code").

Buffers (float32, O(N) in all, no N x N anything):
  similarity [2 * FACTORS, N]: row u * FACTORS + f holds s_u,f,k = cos(view_u,k, partner_f,k),
      partner 0 = z_orig, partner 1 = natural view u.
  norms [1 + 2 * FACTORS, N]: ||z_orig_k||, ||view_i,k||, ||view_j,k||, then (AIR) the natural
      views' norms.

Gradient (what the backward kernels compute). Write x_u,f,k = s_u,f,k / t, lse_u,f = log sum_k
exp(x_u,f,k), so log r_u,k = sum_f (x_u,f,k - lse_u,f), and let G be the upstream gradient.
 1. Through the loss, with delta_u,k = dL / dlog r_u,k:
      delta_j,k = r_j,k (log r_j,k - g(log r_i,k) + 1)       (d(r log r) = r (log r + 1) dlog r)
      delta_i,k = -r_j,k g'(log r_i,k)                        (g' = 1 exact, r_i,k reference-code)
 2. Through each log-softmax factor (dlog sigma_m / dx_k = [m = k] - sigma_k):
      dL/dx_u,f,k = delta_u,k - sigma_u,f,k * sum_m delta_u,m,   sigma_u,f = softmax_k(x_u,f)
    The sums over m are the only coupling between rows: a reduction over N, computed before any
    per-row gradient can be written.
 3. dL/ds_u,f,k = G / t * dL/dx_u,f,k  (called the row's coefficient below).
 4. Through the cosine s = <a, b> / (n_a n_b), n = max(||a||, eps) (F.normalize's clamp):
      ds/da = b / (n_a n_b) - s a / n_a^2,  the second term only where ||a|| >= eps (below it the
      clamp is constant, so the norm passes no gradient); symmetrically for b. An input's gradient
      is the sum over the similarity pairs it takes part in: z_orig in 2 (one per view), a view in
      FACTORS, a natural view (AIR) in 1.

Passes, all accumulating in float32 whatever the input dtype:
  forward:  similarity kernel (one read of the inputs: per-row dot products and squared norms over
            d chunks) -> loss kernel (one program: the 2 * FACTORS log-sum-exps, then the KL sum).
  backward: similarity kernel again -> coefficient kernel (one program: log-sum-exps, the sums of
            delta, then dL/ds per row) -> gradient kernel (a second read of the inputs, one write of
            every gradient).
The backward recomputes the similarities rather than saving them from the forward, so that the op
returns the loss alone on every path; it costs one extra read of the inputs. The reductions over N
run in a single program looping over row blocks: they touch 2 * FACTORS * N floats (256 KiB for
AIR at N = 16384) against the 5 * N * d of the row passes, and one program sums in a fixed order,
so the result is deterministic (no atomics, no third launch for a tree reduction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

# F.normalize's default: a row's norm is clamped to at least this before dividing.
NORM_EPS = 1e-12

ROWS_PER_PROGRAM = 16
MAX_D_CHUNK = 128
REDUCTION_BLOCK = 1024


@triton.jit
def _load_rows(pointer, offsets, mask):
    return tl.load(pointer + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _cosine(dot, norm_a, norm_b, eps):
    return dot / (tl.maximum(norm_a, eps) * tl.maximum(norm_b, eps))


@triton.jit
def _similarity_kernel(
    z_orig_ptr, view_i_ptr, view_j_ptr, natural_i_ptr, natural_j_ptr,
    similarity_ptr, norms_ptr,
    N, D, stride, eps,
    FACTORS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_offsets = rows.to(tl.int64)[:, None] * stride
    dot_io = tl.zeros((BLOCK_N,), tl.float32)
    dot_jo = tl.zeros((BLOCK_N,), tl.float32)
    dot_in = tl.zeros((BLOCK_N,), tl.float32)
    dot_jn = tl.zeros((BLOCK_N,), tl.float32)
    sq_o = tl.zeros((BLOCK_N,), tl.float32)
    sq_i = tl.zeros((BLOCK_N,), tl.float32)
    sq_j = tl.zeros((BLOCK_N,), tl.float32)
    sq_ni = tl.zeros((BLOCK_N,), tl.float32)
    sq_nj = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, D, BLOCK_D):
        columns = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (columns < D)[None, :]
        offsets = row_offsets + columns[None, :]
        o = _load_rows(z_orig_ptr, offsets, mask)
        v_i = _load_rows(view_i_ptr, offsets, mask)
        v_j = _load_rows(view_j_ptr, offsets, mask)
        dot_io += tl.sum(v_i * o, axis=1)
        dot_jo += tl.sum(v_j * o, axis=1)
        sq_o += tl.sum(o * o, axis=1)
        sq_i += tl.sum(v_i * v_i, axis=1)
        sq_j += tl.sum(v_j * v_j, axis=1)
        if FACTORS == 2:
            n_i = _load_rows(natural_i_ptr, offsets, mask)
            n_j = _load_rows(natural_j_ptr, offsets, mask)
            dot_in += tl.sum(v_i * n_i, axis=1)
            dot_jn += tl.sum(v_j * n_j, axis=1)
            sq_ni += tl.sum(n_i * n_i, axis=1)
            sq_nj += tl.sum(n_j * n_j, axis=1)
    norm_o = tl.sqrt(sq_o)
    norm_i = tl.sqrt(sq_i)
    norm_j = tl.sqrt(sq_j)
    tl.store(norms_ptr + rows, norm_o, mask=row_mask)
    tl.store(norms_ptr + N + rows, norm_i, mask=row_mask)
    tl.store(norms_ptr + 2 * N + rows, norm_j, mask=row_mask)
    tl.store(similarity_ptr + rows, _cosine(dot_io, norm_i, norm_o, eps), mask=row_mask)
    view_j_row = similarity_ptr + FACTORS * N + rows
    tl.store(view_j_row, _cosine(dot_jo, norm_j, norm_o, eps), mask=row_mask)
    if FACTORS == 2:
        norm_ni = tl.sqrt(sq_ni)
        norm_nj = tl.sqrt(sq_nj)
        tl.store(norms_ptr + 3 * N + rows, norm_ni, mask=row_mask)
        tl.store(norms_ptr + 4 * N + rows, norm_nj, mask=row_mask)
        tl.store(similarity_ptr + N + rows, _cosine(dot_in, norm_i, norm_ni, eps), mask=row_mask)
        tl.store(view_j_row + N, _cosine(dot_jn, norm_j, norm_nj, eps), mask=row_mask)


@triton.jit
def _logsumexp(similarity_ptr, N, inv_t, BLOCK: tl.constexpr):
    """log sum_k exp(s_k / t) over one buffer row, online over row blocks (max-shifted)."""
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, N, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(similarity_ptr + offsets, mask=offsets < N, other=float("-inf")) * inv_t
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # Every block holds at least one row, so new_max is finite (for finite inputs) and the
        # -inf of masked rows and of the initial max become exp(-inf) = 0.
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(x - new_max), axis=0
        )
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _view_logsumexps(similarity_ptr, N, inv_t, FACTORS: tl.constexpr, BLOCK: tl.constexpr):
    """lse of the view's first factor and, for AIR, of its second (0 when there is none)."""
    lse_0 = _logsumexp(similarity_ptr, N, inv_t, BLOCK)
    lse_1 = tl.zeros((), tl.float32)
    if FACTORS == 2:
        lse_1 = _logsumexp(similarity_ptr + N, N, inv_t, BLOCK)
    return lse_0, lse_1


@triton.jit
def _log_r(similarity_ptr, N, offsets, mask, inv_t, lse_0, lse_1, FACTORS: tl.constexpr):
    """log r_u at the rows `offsets`: the sum of the view's log-softmax factors."""
    log_r = tl.load(similarity_ptr + offsets, mask=mask, other=0.0) * inv_t - lse_0
    if FACTORS == 2:
        log_r += tl.load(similarity_ptr + N + offsets, mask=mask, other=0.0) * inv_t - lse_1
    return log_r


@triton.jit
def _delta(log_r_i, log_r_j, EXACT: tl.constexpr):
    """dL/dlog r_i and dL/dlog r_j per row (step 1 of the module docstring)."""
    r_j = tl.exp(log_r_j)
    if EXACT:
        delta_i = -r_j
        delta_j = r_j * (log_r_j - log_r_i + 1.0)
    else:
        r_i = tl.exp(log_r_i)
        delta_i = -r_j * r_i
        delta_j = r_j * (log_r_j - r_i + 1.0)
    return delta_i, delta_j


@triton.jit
def _loss_kernel(
    similarity_ptr, loss_ptr, N, inv_t,
    FACTORS: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    view_i = similarity_ptr
    view_j = similarity_ptr + FACTORS * N
    lse_i0, lse_i1 = _view_logsumexps(view_i, N, inv_t, FACTORS, BLOCK)
    lse_j0, lse_j1 = _view_logsumexps(view_j, N, inv_t, FACTORS, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        log_r_i = _log_r(view_i, N, offsets, mask, inv_t, lse_i0, lse_i1, FACTORS)
        log_r_j = _log_r(view_j, N, offsets, mask, inv_t, lse_j0, lse_j1, FACTORS)
        if EXACT:
            term = tl.exp(log_r_j) * (log_r_j - log_r_i)
        else:
            term = tl.exp(log_r_j) * (log_r_j - tl.exp(log_r_i))
        total += tl.where(mask, term, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0))


@triton.jit
def _store_coefficient(
    similarity_ptr, coefficient_ptr, offsets, mask, inv_t, lse, delta, delta_sum, scale
):
    """dL/ds for one factor (steps 2 and 3): scale * (delta - softmax_k * sum_m delta_m)."""
    softmax = tl.exp(tl.load(similarity_ptr + offsets, mask=mask, other=0.0) * inv_t - lse)
    tl.store(coefficient_ptr + offsets, scale * (delta - softmax * delta_sum), mask=mask)


@triton.jit
def _coefficient_kernel(
    similarity_ptr, grad_loss_ptr, coefficient_ptr, N, inv_t,
    FACTORS: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    view_i = similarity_ptr
    view_j = similarity_ptr + FACTORS * N
    lse_i0, lse_i1 = _view_logsumexps(view_i, N, inv_t, FACTORS, BLOCK)
    lse_j0, lse_j1 = _view_logsumexps(view_j, N, inv_t, FACTORS, BLOCK)
    delta_sum_i = tl.zeros((BLOCK,), tl.float32)
    delta_sum_j = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        log_r_i = _log_r(view_i, N, offsets, mask, inv_t, lse_i0, lse_i1, FACTORS)
        log_r_j = _log_r(view_j, N, offsets, mask, inv_t, lse_j0, lse_j1, FACTORS)
        delta_i, delta_j = _delta(log_r_i, log_r_j, EXACT)
        delta_sum_i += tl.where(mask, delta_i, 0.0)
        delta_sum_j += tl.where(mask, delta_j, 0.0)
    sum_i = tl.sum(delta_sum_i, axis=0)
    sum_j = tl.sum(delta_sum_j, axis=0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_t
    coefficient_j = coefficient_ptr + FACTORS * N
    for start in range(0, N, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < N
        log_r_i = _log_r(view_i, N, offsets, mask, inv_t, lse_i0, lse_i1, FACTORS)
        log_r_j = _log_r(view_j, N, offsets, mask, inv_t, lse_j0, lse_j1, FACTORS)
        delta_i, delta_j = _delta(log_r_i, log_r_j, EXACT)
        _store_coefficient(view_i, coefficient_ptr, offsets, mask, inv_t, lse_i0, delta_i, sum_i,
                           scale)  # fmt: skip
        _store_coefficient(view_j, coefficient_j, offsets, mask, inv_t, lse_j0, delta_j, sum_j,
                           scale)  # fmt: skip
        if FACTORS == 2:
            _store_coefficient(view_i + N, coefficient_ptr + N, offsets, mask, inv_t, lse_i1,
                               delta_i, sum_i, scale)  # fmt: skip
            _store_coefficient(view_j + N, coefficient_j + N, offsets, mask, inv_t, lse_j1,
                               delta_j, sum_j, scale)  # fmt: skip


@triton.jit
def _cosine_weights(coefficient, similarity, norm_a, norm_b, eps):
    """Per-row weights of ds/da = w_ab b - w_aa a and ds/db = w_ab a - w_bb b (step 4)."""
    inv_a = 1.0 / tl.maximum(norm_a, eps)
    inv_b = 1.0 / tl.maximum(norm_b, eps)
    w_ab = coefficient * inv_a * inv_b
    w_aa = tl.where(norm_a >= eps, coefficient * similarity * inv_a * inv_a, 0.0)
    w_bb = tl.where(norm_b >= eps, coefficient * similarity * inv_b * inv_b, 0.0)
    return w_ab[:, None], w_aa[:, None], w_bb[:, None]


@triton.jit
def _pair_weights(coefficient_ptr, similarity_ptr, rows, mask, norm_a, norm_b, eps):
    coefficient = tl.load(coefficient_ptr + rows, mask=mask, other=0.0)
    similarity = tl.load(similarity_ptr + rows, mask=mask, other=0.0)
    return _cosine_weights(coefficient, similarity, norm_a, norm_b, eps)


@triton.jit
def _gradient_kernel(
    z_orig_ptr, view_i_ptr, view_j_ptr, natural_i_ptr, natural_j_ptr,
    similarity_ptr, norms_ptr, coefficient_ptr,
    grad_z_orig_ptr, grad_view_i_ptr, grad_view_j_ptr, grad_natural_i_ptr, grad_natural_j_ptr,
    N, D, stride, eps,
    FACTORS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_offsets = rows.to(tl.int64)[:, None] * stride
    norm_o = tl.load(norms_ptr + rows, mask=row_mask, other=1.0)
    norm_i = tl.load(norms_ptr + N + rows, mask=row_mask, other=1.0)
    norm_j = tl.load(norms_ptr + 2 * N + rows, mask=row_mask, other=1.0)
    similarity_j = similarity_ptr + FACTORS * N
    coefficient_j = coefficient_ptr + FACTORS * N
    # Pair (view u, z_orig) of each view; for AIR also (view u, natural view u).
    w_io, w_ii, w_oi = _pair_weights(coefficient_ptr, similarity_ptr, rows, row_mask, norm_i,
                                     norm_o, eps)  # fmt: skip
    w_jo, w_jj, w_oj = _pair_weights(coefficient_j, similarity_j, rows, row_mask, norm_j, norm_o,
                                     eps)  # fmt: skip
    if FACTORS == 2:
        norm_ni = tl.load(norms_ptr + 3 * N + rows, mask=row_mask, other=1.0)
        norm_nj = tl.load(norms_ptr + 4 * N + rows, mask=row_mask, other=1.0)
        w_in, w_ii_n, w_nn_i = _pair_weights(coefficient_ptr + N, similarity_ptr + N, rows,
                                             row_mask, norm_i, norm_ni, eps)  # fmt: skip
        w_jn, w_jj_n, w_nn_j = _pair_weights(coefficient_j + N, similarity_j + N, rows, row_mask,
                                             norm_j, norm_nj, eps)  # fmt: skip
    out_dtype = grad_z_orig_ptr.dtype.element_ty
    for start in range(0, D, BLOCK_D):
        columns = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (columns < D)[None, :]
        offsets = row_offsets + columns[None, :]
        o = _load_rows(z_orig_ptr, offsets, mask)
        v_i = _load_rows(view_i_ptr, offsets, mask)
        v_j = _load_rows(view_j_ptr, offsets, mask)
        grad_o = w_io * v_i - w_oi * o + w_jo * v_j - w_oj * o
        grad_i = w_io * o - w_ii * v_i
        grad_j = w_jo * o - w_jj * v_j
        if FACTORS == 2:
            n_i = _load_rows(natural_i_ptr, offsets, mask)
            n_j = _load_rows(natural_j_ptr, offsets, mask)
            grad_i += w_in * n_i - w_ii_n * v_i
            grad_j += w_jn * n_j - w_jj_n * v_j
            grad_n_i = w_in * v_i - w_nn_i * n_i
            grad_n_j = w_jn * v_j - w_nn_j * n_j
            tl.store(grad_natural_i_ptr + offsets, grad_n_i.to(out_dtype), mask=mask)
            tl.store(grad_natural_j_ptr + offsets, grad_n_j.to(out_dtype), mask=mask)
        tl.store(grad_z_orig_ptr + offsets, grad_o.to(out_dtype), mask=mask)
        tl.store(grad_view_i_ptr + offsets, grad_i.to(out_dtype), mask=mask)
        tl.store(grad_view_j_ptr + offsets, grad_j.to(out_dtype), mask=mask)


def _row_launch(n: int, d: int) -> tuple[tuple[int], int, int]:
    block_d = min(triton.next_power_of_2(max(d, 1)), MAX_D_CHUNK)
    return (triton.cdiv(n, ROWS_PER_PROGRAM),), ROWS_PER_PROGRAM, block_d


def _similarities(inputs: list[torch.Tensor], factors: int):
    """Launch the similarity kernel: (similarity [2F, N], norms [1 + 2F, N]), float32."""
    z_orig = inputs[0]
    n, d = z_orig.shape
    similarity = torch.empty(2 * factors, n, device=z_orig.device, dtype=torch.float32)
    norms = torch.empty(1 + 2 * factors, n, device=z_orig.device, dtype=torch.float32)
    grid, block_n, block_d = _row_launch(n, d)
    _similarity_kernel[grid](
        *inputs, similarity, norms, n, d, z_orig.stride(0), NORM_EPS,
        FACTORS=factors, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return similarity, norms


def _kernel_inputs(z_orig, views, natural_views) -> tuple[list[torch.Tensor], int]:
    """The five pointer arguments, contiguous; SIR passes its views again as unused placeholders."""
    factors = 2 if natural_views else 1
    inputs = [z_orig, *views, *(natural_views or views)]
    return [t.contiguous() for t in inputs], factors


def sir_air_forward(z_orig, views, natural_views, temperature: float, exact: bool) -> torch.Tensor:
    """The regulariser as a float32 0-d tensor.

    z_orig: [N, d]; views: (view i, view j); natural_views: () for SIR, (z^i, z^j) for AIR.
    """
    inputs, factors = _kernel_inputs(z_orig, views, natural_views)
    with _launch.on_device(z_orig):
        similarity, _ = _similarities(inputs, factors)
        loss = torch.empty((), device=z_orig.device, dtype=torch.float32)
        _loss_kernel[(1,)](
            similarity, loss, z_orig.shape[0], 1.0 / temperature,
            FACTORS=factors, EXACT=exact, BLOCK=REDUCTION_BLOCK,
        )  # fmt: skip
    return loss


def sir_air_backward(
    grad_loss, z_orig, views, natural_views, temperature: float, exact: bool
) -> list[torch.Tensor]:
    """Gradients of every input, in the order z_orig, *views, *natural_views, in their dtype."""
    inputs, factors = _kernel_inputs(z_orig, views, natural_views)
    n, d = z_orig.shape
    with _launch.on_device(z_orig):
        similarity, norms = _similarities(inputs, factors)
        coefficient = torch.empty_like(similarity)
        _coefficient_kernel[(1,)](
            similarity, grad_loss.contiguous(), coefficient, n, 1.0 / temperature,
            FACTORS=factors, EXACT=exact, BLOCK=REDUCTION_BLOCK,
        )  # fmt: skip
        grads = [torch.empty_like(t) for t in inputs[: 1 + 2 * factors]]
        # SIR has no natural-view gradients: point them at the view gradients, never written.
        grad_pointers = grads if factors == 2 else grads + grads[1:]
        grid, block_n, block_d = _row_launch(n, d)
        _gradient_kernel[grid](
            *inputs, similarity, norms, coefficient, *grad_pointers,
            n, d, inputs[0].stride(0), NORM_EPS,
            FACTORS=factors, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    return grads
