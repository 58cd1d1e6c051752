"""Triton kernels of NT-Xent (docs/acl-air.md section 4): tiled, never materialising 2N x 2N.

Notation (the SimCLR paper's): the 2N rows z_a of cat(z1, z2) are L2-normalised to u_a, the
similarity is S_ab = u_a . u_b, the logits are S_ab / t, anchor a's positive is pos(a) = a + N
(a < N) or a - N, and its negatives are every other row except itself. With

    lse_a = log sum_{b != a} exp(S_ab / t)

the loss is L = 1/(2N) sum_a (lse_a - S_{a,pos(a)} / t).

Forward (flash-attention / Inf-CL style): one program per block of anchor rows walks over blocks of
columns, computes the similarity tile on the fly (a loop over chunks of d, so any d works) and keeps
a running maximum and a running sum of exponentials per row (online log-sum-exp). Only lse_a
(O(N)) is written; the backward uses it to rebuild softmax probabilities tile by tile.

Backward: with P_ab = exp(S_ab / t - lse_a) (zero on the diagonal),
    dL/d(S_ab / t) = g/(2N) (P_ab - [b == pos(a)])                   (g: the upstream gradient)
and every u_a enters both row a and column a of S, so
    dL/du_a = 1/t sum_b (dL/d(S_ab/t) + dL/d(S_ba/t)) u_b
            = g/(2N t) sum_b (P_ab + P_ba - 2 [b == pos(a)]) u_b
(a == pos(b) exactly when b == pos(a), so both positive indicators sit at b = pos(a)).
S is symmetric, so P_ba = exp(S_ab / t - lse_b): one pass per anchor block over the column blocks
gives both terms from the same tile. Last, through u = z / max(||z||, eps):
    dL/dz = (dL/du - u (u . dL/du)) / ||z||      when ||z|| > eps
    dL/dz = dL/du / eps                          otherwise (the clamp is constant there)

Exponentials are taken in base 2 (exp2 is the native instruction): logits are scaled by
log2(e) / t, so the running maximum, sum and lse are in log2 units inside the kernels and the
launchers' outputs are in natural units.

Accumulation is fp32 for every input dtype; similarity tiles use tl.dot on the input dtype (tensor
cores for bf16 / fp16). fp32 inputs use exact fp32 products unless torch itself allows TF32 for
matmuls (torch.backends.cuda.matmul.allow_tf32), so the kernel is as precise as the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch

LOG2E = math.log2(math.e)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the same number, readable inside kernels
NORM_EPS = 1e-12  # F.normalize's default eps


@triton.jit
def _normalize_rows_kernel(
    z_ptr, u_ptr, norm_ptr, n_rows, d, stride_z_row, stride_z_col, stride_u_row,
    eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """u = z / max(||z||, eps) per row (as F.normalize), and ||z|| in fp32 for the backward."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    sum_of_squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :] * stride_z_col,
                    mask=mask, other=0.0).to(tl.float32)
        sum_of_squares += tl.sum(z * z, axis=1)
    norm = tl.sqrt(sum_of_squares)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    # Divide (not multiply by a reciprocal) to round exactly as F.normalize does.
    denominator = tl.maximum(norm, eps)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :] * stride_z_col,
                    mask=mask, other=0.0).to(tl.float32)
        u = z / denominator[:, None]
        tl.store(u_ptr + rows[:, None] * stride_u_row + cols[None, :],
                 u.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _similarity_tile(
    u_ptr, rows, cols, n_rows, d, stride_u_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """S[rows, cols] = U[rows] . U[cols]^T in fp32, accumulated over chunks of d (zero padded)."""
    similarity = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        ks = start + tl.arange(0, BLOCK_D)
        k_ok = (ks < d)[None, :]
        anchors = tl.load(u_ptr + rows[:, None] * stride_u_row + ks[None, :],
                          mask=(rows < n_rows)[:, None] & k_ok, other=0.0)
        others = tl.load(u_ptr + cols[:, None] * stride_u_row + ks[None, :],
                         mask=(cols < n_rows)[:, None] & k_ok, other=0.0)
        similarity = tl.dot(anchors, tl.trans(others), similarity, input_precision=DOT_PRECISION)
    return similarity


@triton.jit
def _nt_xent_forward_kernel(
    u_ptr, lse_ptr, row_loss_ptr, n, d, stride_u_row,
    logit_scale,  # log2(e) / t: similarity -> logit in log2 units
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per anchor row a: lse_a over b != a, and the row's loss lse_a - S_{a,pos(a)} / t."""
    n_rows = 2 * n
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    positives = tl.where(rows < n, rows + n, rows - n)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    positive_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        logits = logit_scale * _similarity_tile(
            u_ptr, rows, cols, n_rows, d, stride_u_row, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        # exactly one column in the whole row is the positive: pick it out of whichever tile has it
        positive_logit += tl.sum(tl.where(cols[None, :] == positives[:, None], logits, 0.0), axis=1)
        # the anchor itself and the padding past 2N are not negatives
        is_negative_or_positive = (cols < n_rows)[None, :] & (cols[None, :] != rows[:, None])
        logits = tl.where(is_negative_or_positive, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # a row whose columns so far were all excluded keeps max -inf; subtract 0 there instead
        # of -inf so that exp2(-inf - -inf) does not make NaN (its sum stays exactly 0)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(
            tl.exp2(logits - shift[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log2(running_sum)  # log2 units
    row_ok = rows < n_rows
    tl.store(lse_ptr + rows, lse / _LOG2E, mask=row_ok)
    tl.store(row_loss_ptr + rows, (lse - positive_logit) / _LOG2E, mask=row_ok)


@triton.jit
def _nt_xent_backward_kernel(
    u_ptr, lse_ptr, grad_loss_ptr, grad_u_ptr, n, d, stride_u_row, stride_grad_u_row,
    logit_scale,  # log2(e) / t
    inv_temperature,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dL/du for a block of anchor rows and a BLOCK_DV-wide slice of d (see the module docstring).

    The output slice lives in registers for the whole pass over the columns; a d wider than
    BLOCK_DV is covered by more programs (grid axis 1), each recomputing the similarity tiles.
    """
    n_rows = 2 * n
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    positives = tl.where(rows < n, rows + n, rows - n)
    lse_rows = tl.load(lse_ptr + rows, mask=rows < n_rows, other=0.0) * _LOG2E
    grad_u = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_rows
        logits = logit_scale * _similarity_tile(
            u_ptr, rows, cols, n_rows, d, stride_u_row, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        lse_cols = tl.load(lse_ptr + cols, mask=col_ok, other=0.0) * _LOG2E
        in_softmax = col_ok[None, :] & (cols[None, :] != rows[:, None])
        p_ab = tl.where(in_softmax, tl.exp2(logits - lse_rows[:, None]), 0.0)
        p_ba = tl.where(in_softmax, tl.exp2(logits - lse_cols[None, :]), 0.0)
        is_positive = (cols[None, :] == positives[:, None]).to(tl.float32)
        # dL/dS_ab + dL/dS_ba, up to the factor g / (2N t) applied once at the end
        grad_logits = p_ab + p_ba - 2.0 * is_positive
        others = tl.load(u_ptr + cols[:, None] * stride_u_row + dims[None, :],
                         mask=col_ok[:, None] & (dims < d)[None, :], other=0.0)
        grad_u = tl.dot(grad_logits.to(others.dtype), others, grad_u, input_precision=DOT_PRECISION)
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    grad_u = grad_u * (grad_loss * inv_temperature / n_rows)
    tl.store(grad_u_ptr + rows[:, None] * stride_grad_u_row + dims[None, :], grad_u,
             mask=(rows < n_rows)[:, None] & (dims < d)[None, :])


@triton.jit
def _normalize_rows_backward_kernel(
    z_ptr, norm_ptr, grad_u_ptr, grad_z_ptr, n_rows, d,
    stride_z_row, stride_z_col, stride_grad_u_row, stride_grad_z_row,
    eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/dz = (dL/du - [||z|| > eps] u (u . dL/du)) / max(||z||, eps), u recomputed in fp32."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    denominator = tl.maximum(norm, eps)
    u_dot_grad = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        u = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :] * stride_z_col,
                    mask=mask, other=0.0).to(tl.float32) / denominator[:, None]
        grad_u = tl.load(grad_u_ptr + rows[:, None] * stride_grad_u_row + cols[None, :],
                         mask=mask, other=0.0)
        u_dot_grad += tl.sum(u * grad_u, axis=1)
    # below eps the denominator is the constant eps: no projection term
    u_dot_grad = tl.where(norm > eps, u_dot_grad, 0.0)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        u = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :] * stride_z_col,
                    mask=mask, other=0.0).to(tl.float32) / denominator[:, None]
        grad_u = tl.load(grad_u_ptr + rows[:, None] * stride_grad_u_row + cols[None, :],
                         mask=mask, other=0.0)
        grad_z = (grad_u - u * u_dot_grad[:, None]) / denominator[:, None]
        tl.store(grad_z_ptr + rows[:, None] * stride_grad_z_row + cols[None, :],
                 grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations, per target and dot path (kernels/_launch.py; the compile check's table is
# in docs/gpu-compile.md). Each is the largest tile among those tried that compiles on its target
# without a register spill; none is timed on a GPU yet. The dot paths:
#   "mma"   bf16 / fp16 inputs, and fp32 with TF32 allowed: tensor cores, operands stream from
#           shared memory, so the 64 x 64 tiles of the first version stay.
#   "ieee"  exact fp32 products: FMAs, for which Triton keeps each thread's rows and columns of a
#           whole chunk of d in registers. 64-wide chunks spilled on both targets (up to 2 KiB a
#           thread on sm_80), so the chunks are 32 wide and the tiles sized to each target's ptxas.
# d > 128 is "wide": the backward's output slice (BLOCK_DV) is 256 wide there.

# target -> dot path -> forward config
_FORWARD = {
    "sm_80": {
        "mma": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=4),
        "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8),
    },
    "sm_90": {
        "mma": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=4),
        "ieee": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4),
    },
}
# target -> dot path -> wide -> backward config (BLOCK_D and BLOCK_DV: the largest chunk, a
# narrower d gets the next power of two)
_BACKWARD = {
    "sm_80": {
        "mma": {
            False: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=128, num_warps=8),
            True: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=256, num_warps=8),
        },
        # fp32 through TF32 at d > 128: 64-wide chunks leave no register to spare (255)
        "tf32": {True: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=256, num_warps=8)},
        "ieee": {
            False: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=128, num_warps=8),
            True: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=256, num_warps=8),
        },
    },
    "sm_90": {
        "mma": {
            False: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=128, num_warps=8),
            True: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=256, num_warps=8),
        },
        "ieee": {
            False: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=128, num_warps=8),
            True: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DV=256, num_warps=8),
        },
    },
}
WIDE_D = 128  # d above this is "wide"


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products unless torch allows TF32 matmuls (then do what torch would do)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_path(dtype: torch.dtype) -> str:
    """"mma" (tensor cores: 16-bit inputs, or fp32 as TF32) or "ieee" (fp32 FMAs)."""
    return "ieee" if dtype == torch.float32 and _dot_precision(dtype) == "ieee" else "mma"


def forward_config(dtype: torch.dtype, d: int, capability: tuple[int, int]) -> dict:
    """The forward kernel's constexprs and num_warps for inputs of `dtype` and width d."""
    config = dict(_FORWARD[_launch.target(capability)][_dot_path(dtype)])
    config["BLOCK_D"] = _chunk(d, config["BLOCK_D"])
    return config


def backward_config(dtype: torch.dtype, d: int, capability: tuple[int, int]) -> dict:
    """The backward kernel's constexprs and num_warps for inputs of `dtype` and width d."""
    table = _BACKWARD[_launch.target(capability)]
    path, wide = _dot_path(dtype), d > WIDE_D
    if path == "mma" and _dot_precision(dtype) == "tf32" and wide in table.get("tf32", {}):
        path = "tf32"
    config = dict(table[path][wide])
    config["BLOCK_D"] = _chunk(d, config["BLOCK_D"])
    config["BLOCK_DV"] = _chunk(d, config["BLOCK_DV"])
    return config


def _chunk(d: int, largest: int) -> int:
    """A power-of-two chunk of d: at least 16 (tl.dot's smallest K), at most `largest`."""
    return max(16, min(largest, triton.next_power_of_2(d)))


def _normalize_rows(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U = normalised cat(z1, z2) in the input dtype, and the 2N row norms in fp32."""
    n, d = z1.shape
    u = torch.empty((2 * n, d), dtype=z1.dtype, device=z1.device)
    norms = torch.empty(2 * n, dtype=torch.float32, device=z1.device)
    block_rows, block_d = 16, _chunk(d, 128)
    for half, z in enumerate((z1, z2)):  # two launches instead of a torch.cat copy
        rows = slice(half * n, (half + 1) * n)
        _normalize_rows_kernel[(triton.cdiv(n, block_rows),)](
            z, u[rows], norms[rows], n, d, z.stride(0), z.stride(1), u.stride(0), NORM_EPS,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        )
    return u, norms


def _overridden(config: dict, **blocks) -> dict:
    """config with the block sizes a caller gave explicitly (tests cross tile boundaries so)."""
    return {**config, **{name.upper(): size for name, size in blocks.items() if size}}


def nt_xent_forward(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float,
    block_m: int | None = None, block_n: int | None = None, block_d: int | None = None,
    *, capability: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): the mean NT-Xent (0-d, input dtype) and the 2N per-anchor lse (fp32).

    The config is that of the inputs' GPU, or of `capability` when given (kernels/_launch.py).
    """
    n, d = z1.shape
    config = forward_config(z1.dtype, d, _launch.capability_of(z1, capability))
    config = _overridden(config, block_m=block_m, block_n=block_n, block_d=block_d)
    with _launch.on_device(z1):
        u, _ = _normalize_rows(z1, z2)
        lse = torch.empty(2 * n, dtype=torch.float32, device=z1.device)
        row_loss = torch.empty(2 * n, dtype=torch.float32, device=z1.device)
        _nt_xent_forward_kernel[(triton.cdiv(2 * n, config["BLOCK_M"]),)](
            u, lse, row_loss, n, d, u.stride(0), LOG2E / temperature,
            DOT_PRECISION=_dot_precision(z1.dtype), **config,
        )
        # a sum over 2N numbers: torch's deterministic reduction, not atomics
        return row_loss.mean().to(z1.dtype), lse


def nt_xent_backward(
    grad_loss: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lse: torch.Tensor,
    temperature: float,
    block_m: int | None = None, block_n: int | None = None, block_d: int | None = None,
    block_dv: int | None = None,
    *, capability: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dz1, dL/dz2) in the input dtype, from the forward's lse; grad_loss is 0-d."""
    n, d = z1.shape
    config = backward_config(z1.dtype, d, _launch.capability_of(z1, capability))
    config = _overridden(config, block_m=block_m, block_n=block_n, block_d=block_d,
                         block_dv=block_dv)  # fmt: skip
    with _launch.on_device(z1):
        u, norms = _normalize_rows(z1, z2)
        grad_u = torch.empty((2 * n, d), dtype=torch.float32, device=z1.device)
        grid = (triton.cdiv(2 * n, config["BLOCK_M"]), triton.cdiv(d, config["BLOCK_DV"]))
        _nt_xent_backward_kernel[grid](
            u, lse, grad_loss, grad_u, n, d, u.stride(0), grad_u.stride(0),
            LOG2E / temperature, 1.0 / temperature,
            DOT_PRECISION=_dot_precision(z1.dtype), **config,
        )
        grads = []
        # 64-wide chunks: with 128, ptxas for sm_90 spills 8 bytes of this kernel
        block_rows, block_d_rows = 16, _chunk(d, 64)
        for half, z in enumerate((z1, z2)):
            rows = slice(half * n, (half + 1) * n)
            grad_z = torch.empty((n, d), dtype=z.dtype, device=z.device)
            _normalize_rows_backward_kernel[(triton.cdiv(n, block_rows),)](
                z, norms[rows], grad_u[rows], grad_z, n, d,
                z.stride(0), z.stride(1), grad_u.stride(0), grad_z.stride(0), NORM_EPS,
                BLOCK_ROWS=block_rows, BLOCK_D=block_d_rows,
            )
            grads.append(grad_z)
    return grads[0], grads[1]
