"""The RCS ops: per-sample projected head gradients and the greedy pick (docs/rcs.md sections 2-3).

rcs_project. For every head Linear layer l, H_l [n, in_l] holds the layer's inputs and Delta_l
[n, out_l] the gradients of the loss with respect to its outputs, one row per forward row. Row i
contributes Delta_l[i] (outer) H_l[i] to the weight gradient (and Delta_l[i] to the bias gradient);
the op never materialises these out x in matrices, it projects each to a short block:
  rowmean:    (1/out_l) (sum_j Delta_l[i, j]) H_l[i, :]                          [in_l]
              then, when bias[l]: (1/out_l) sum_j Delta_l[i, j]                   [1]
              (the mean over the output units of the rows of the weight gradient: the authors'
              reduction)
  kronecker:  vec((P_l Delta_l[i]) (outer) (Q_l H_l[i])), row-major (entry (r, c) at r k2 + c),
              the sketch P_l (Delta_l[i] H_l[i]^T) Q_l^T of the full gradient    [k1 k2]
              then, when bias[l]: P_l Delta_l[i]                                 [k1]
              (rowmean is the case P_l = 1^T / out_l, Q_l = I)
Blocks are concatenated in layer order: D = sum_l (in_l + bias_l) for rowmean (1537 for the
ResNet-18 head), sum_l (k1 k2 + bias_l k1) for kronecker. With segment_ids, the projections of the
rows that share an id are summed into output row id (a sample's rows: both views, natural and
adversarial; or a whole minibatch), which is the projection of the summed gradient because the
projection is linear. The per-sample gradient of docs/rcs.md section 2 also multiplies by the
minibatch size: scale Delta (or the output) accordingly, the op only sums.
Storage fp32 or bf16 (fp16 and fp64 run the reference); accumulation and output in fp32 (fp64 for
fp64 inputs).

greedy_pick(R, v, taken): the index of the largest R[i] . v among the rows with taken[i] false,
marked taken in place, as a 0-d int64 tensor on R's device: the greedy loop never synchronises
with the host. Ties go to the lowest index; a NaN score ranks above every number (torch.argmax's
rule); when every row is already taken it returns -1 and changes nothing.

Paths: the C++ extension (fastacl._C: CPU kernels, and CUDA kernels when built against a CUDA
torch) and the PyTorch reference below (vectorised, the oracle of the tests, and the path for
FASTACL_BACKEND=torch, for other dtypes and when the extension is unavailable). The C++ library
owns the op names fastacl::rcs_project / fastacl::greedy_pick; this module only adds their fake
(shape) implementations, so they trace under torch.compile. Neither op is differentiable: the
projections are data for the selection, not part of a training graph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from fastacl.ops import _dispatch

MODES = ("rowmean", "kronecker")

# Storage dtypes the extension's kernels take; the others run the reference.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Validation


def _check_layers(inputs, grad_outputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    op = "rcs_project"
    if isinstance(inputs, torch.Tensor) or isinstance(grad_outputs, torch.Tensor):
        raise ValueError(
            f"{op}: inputs and grad_outputs must be sequences of tensors (one per head Linear "
            "layer), got a tensor: wrap a single layer as [H], [Delta]"
        )
    inputs, grad_outputs = list(inputs), list(grad_outputs)
    if not inputs:
        raise ValueError(f"{op}: needs at least one layer, got no inputs")
    if len(inputs) != len(grad_outputs):
        raise ValueError(
            f"{op}: got {len(inputs)} inputs but {len(grad_outputs)} grad_outputs: one of each "
            "per layer"
        )
    first = inputs[0]
    for layer, (h, delta) in enumerate(zip(inputs, grad_outputs, strict=True)):
        for name, t in (("inputs", h), ("grad_outputs", delta)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{op}: {name}[{layer}] must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(
                    f"{op}: {name}[{layer}] must be floating point, got dtype {t.dtype}"
                )
            if t.dim() != 2:
                raise ValueError(
                    f"{op}: {name}[{layer}] must be 2-D [n, features], got shape {tuple(t.shape)}"
                )
            if t.shape[0] != first.shape[0]:
                raise ValueError(
                    f"{op}: {name}[{layer}] has {t.shape[0]} rows but inputs[0] has "
                    f"{first.shape[0]}: every layer sees the same n rows"
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"{op}: {name}[{layer}] is {t.dtype} on {t.device} but inputs[0] is "
                    f"{first.dtype} on {first.device}"
                )
    return inputs, grad_outputs


def _check_bias(bias, num_layers: int) -> list[bool]:
    if bias is None:
        return [False] * num_layers
    if isinstance(bias, (bool, torch.Tensor)):
        raise ValueError(
            f"rcs_project: bias must be a sequence of {num_layers} bools (one per layer), "
            f"got {bias!r}"
        )
    bias = list(bias)
    if len(bias) != num_layers or not all(isinstance(b, bool) for b in bias):
        raise ValueError(
            f"rcs_project: bias must be a sequence of {num_layers} bools (one per layer), "
            f"got {bias!r}"
        )
    return bias


def _check_projections(mode, projections, inputs, grad_outputs):
    op = "rcs_project"
    if mode not in MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "rowmean":
        if projections is not None:
            raise ValueError(
                f"{op}: mode 'rowmean' takes no projections (it is P = 1^T / out, Q = I); pass "
                "projections only with mode='kronecker'"
            )
        return [], []
    if projections is None or len(projections) != len(inputs):
        got = "None" if projections is None else f"{len(projections)} entries"
        raise ValueError(
            f"{op}: mode 'kronecker' needs projections: one (P [k1, out], Q [k2, in]) pair per "
            f"layer ({len(inputs)}), got {got}"
        )
    p, q = [], []
    for layer, pair in enumerate(projections):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise ValueError(f"{op}: projections[{layer}] must be a pair (P, Q), got {pair!r}")
        p_l, q_l = pair
        out_l, in_l = grad_outputs[layer].shape[1], inputs[layer].shape[1]
        for name, t, width in (("P", p_l, out_l), ("Q", q_l, in_l)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(
                    f"{op}: projections[{layer}] {name} must be a 2-D floating-point tensor, "
                    f"got {t!r:.80}"
                )
            if t.shape[1] != width:
                side = "out (grad_outputs' width)" if name == "P" else "in (inputs' width)"
                raise ValueError(
                    f"{op}: projections[{layer}] {name} has shape {tuple(t.shape)}: expected "
                    f"[k, {width}], {width} = {side}"
                )
            if t.device != inputs[0].device:
                raise ValueError(
                    f"{op}: projections[{layer}] {name} is on {t.device} but the inputs are on "
                    f"{inputs[0].device}"
                )
        p.append(p_l)
        q.append(q_l)
    return p, q


def _check_segments(segment_ids, num_segments, n: int, device) -> tuple[torch.Tensor | None, int]:
    op = "rcs_project"
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError(f"{op}: num_segments={num_segments} given without segment_ids")
        return None, -1
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype != torch.int64 or (
        segment_ids.shape != (n,)
    ):
        raise ValueError(
            f"{op}: segment_ids must be an int64 tensor of shape [n] = [{n}], got "
            f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)} of shape "
            f"{tuple(getattr(segment_ids, 'shape', ()))}"
        )
    if segment_ids.device != device:
        raise ValueError(
            f"{op}: segment_ids is on {segment_ids.device} but the inputs are on {device}"
        )
    if num_segments is None:
        # Reads segment_ids on the host (a synchronisation on CUDA): pass num_segments to avoid it.
        num_segments = int(segment_ids.max()) + 1 if n > 0 else 0
    num_segments = int(num_segments)
    if num_segments < 0:
        raise ValueError(f"{op}: num_segments must be >= 0, got {num_segments}")
    if segment_ids.device.type == "cpu" and n > 0:  # free on the CPU; on CUDA it would sync
        low, high = int(segment_ids.min()), int(segment_ids.max())
        if low < 0 or high >= num_segments:
            bad = low if low < 0 else high
            raise ValueError(
                f"{op}: segment_ids holds {bad}, outside [0, num_segments = {num_segments})"
            )
    return segment_ids, num_segments


def _projection_width(mode, inputs, grad_outputs, bias, p, q) -> int:
    if mode == "rowmean":
        return sum(h.shape[1] + int(b) for h, b in zip(inputs, bias, strict=True))
    return sum(
        p_l.shape[0] * (q_l.shape[0] + int(b)) for p_l, q_l, b in zip(p, q, bias, strict=True)
    )


# --------------------------------------------------------------------------------------------
# Reference


def rcs_project_reference(inputs, grad_outputs, mode="rowmean", bias=None, p=(), q=(),
                          segment_ids=None, num_segments=-1) -> torch.Tensor:
    """The definitions, vectorised over rows: the CPU/fallback path and the tests' oracle.

    Arguments as torch.ops.fastacl.rcs_project (already validated): p and q are the lists of
    P_l and Q_l (empty for rowmean), num_segments counts the output rows when segment_ids is set.
    """
    acc = _accumulation_dtype(inputs[0].dtype)
    bias = [False] * len(inputs) if bias is None else bias
    blocks = []
    for layer, (h, delta) in enumerate(zip(inputs, grad_outputs, strict=True)):
        h, delta = h.to(acc), delta.to(acc)
        if mode == "rowmean":
            a = delta.mean(dim=1, keepdim=True)  # [n, 1]: P = 1^T / out
            b = h  # Q = I
        else:
            a = delta @ p[layer].to(acc).T  # [n, k1] = P Delta_i
            b = h @ q[layer].to(acc).T  # [n, k2] = Q H_i
        blocks.append((a[:, :, None] * b[:, None, :]).flatten(1))
        if bias[layer]:
            blocks.append(a)
    rows = torch.cat(blocks, dim=1)
    if segment_ids is None:
        return rows
    out = rows.new_zeros((num_segments, rows.shape[1]))
    return out.index_add_(0, segment_ids, rows)


def greedy_pick_reference(R: torch.Tensor, v: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Masked mat-vec + arg-max in tensor ops (no host synchronisation); marks the pick taken."""
    acc = _accumulation_dtype(R.dtype)
    scores = R.to(acc) @ v.to(acc)
    masked = scores.masked_fill(taken, float("-inf"))
    best = masked.argmax()  # the first maximum: ties go to the lowest index; NaN ranks first
    # If every untaken score is -inf, argmax may land on a taken row: take the first untaken one.
    first_untaken = (~taken).to(torch.uint8).argmax()
    best = torch.where(masked.amax() == float("-inf"), first_untaken, best)
    best = torch.where(taken.all(), torch.full_like(best, -1), best)
    # When nothing is left, index 0 is already taken and this writes nothing new.
    taken.index_fill_(0, best.clamp_min(0).view(1), True)
    return best


# --------------------------------------------------------------------------------------------
# The C++ ops' fake implementations (the C++ library defines the ops; see module docstring)


def _has_extension_op(name: str) -> bool:
    try:
        getattr(torch.ops.fastacl, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _fake_rcs_project(inputs, grad_outputs, mode, bias, p, q, segment_ids, num_segments):
    rows = inputs[0].shape[0] if segment_ids is None else num_segments
    width = _projection_width(mode, inputs, grad_outputs, bias, p, q)
    return inputs[0].new_empty((rows, width), dtype=torch.float32)


def _fake_greedy_pick(R, v, taken):
    return R.new_empty((), dtype=torch.int64)


_fakes_registered = False


def _register_fakes() -> bool:
    """Register the fakes once the C++ library is loaded; True when its ops exist."""
    global _fakes_registered
    if _fakes_registered:
        return True
    if not _has_extension_op("rcs_project"):
        return False
    torch.library.register_fake("fastacl::rcs_project")(_fake_rcs_project)
    torch.library.register_fake("fastacl::greedy_pick")(_fake_greedy_pick)
    _fakes_registered = True
    return True


_register_fakes()  # when torch imports this module for the C++ library's fakes, it is loaded


@functools.cache
def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastacl::{op}", dispatch_key)


def _use_extension(op: str, tensor: torch.Tensor) -> bool:
    return _use_extension_for(op, tensor.dtype, tensor.device.type)


# Under torch.compile the choice is made once, at trace time (dynamo need not trace the loader).
@torch.compiler.assume_constant_result
def _use_extension_for(op: str, dtype: torch.dtype, device_type: str) -> bool:
    paths = ("cpp",) if dtype in _KERNEL_DTYPES else ()
    probe = torch.empty(0, dtype=dtype, device="meta")  # select() reads it only for Triton paths
    if _dispatch.select(op, probe, paths) != "cpp":
        return False
    _register_fakes()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or not _has_kernel(op, key):
        if _dispatch.requested_backend() == "cpp":
            raise RuntimeError(
                f"{op}: FASTACL_BACKEND=cpp but the C++ extension has no kernel for "
                f"{device_type} tensors (CUDA kernels are built only against a CUDA torch)"
            )
        return False
    return True


# --------------------------------------------------------------------------------------------
# Public API


def rcs_project(
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    mode: str = "rowmean",
    bias: Sequence[bool] | None = None,
    projections: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Per-sample projections of the head's weight (and bias) gradients (see the module docstring).

    Args:
        inputs: per layer, its inputs H_l [n, in_l] (fp32 or bf16; all layers one dtype/device).
        grad_outputs: per layer, the gradients Delta_l [n, out_l] of the loss w.r.t. its outputs.
        mode: "rowmean" (the authors' reduction) or "kronecker" (a JL sketch of the full gradient).
        bias: per layer, whether it has a bias (adds its block); None: no layer has one.
        projections: kronecker only, per layer (P_l [k1, out_l], Q_l [k2, in_l]).
        segment_ids: int64 [n]; rows with the same id are summed into output row id.
        num_segments: output rows with segment_ids; None computes max(segment_ids) + 1, which
            reads segment_ids on the host (a synchronisation for CUDA tensors).

    Returns:
        [n, D] (or [num_segments, D]) float32 (float64 for float64 inputs), layer blocks in order.
    """
    inputs, grad_outputs = _check_layers(inputs, grad_outputs)
    bias = _check_bias(bias, len(inputs))
    p, q = _check_projections(mode, projections, inputs, grad_outputs)
    segment_ids, num_segments = _check_segments(
        segment_ids, num_segments, inputs[0].shape[0], inputs[0].device
    )
    if _use_extension("rcs_project", inputs[0]):
        return torch.ops.fastacl.rcs_project(
            inputs, grad_outputs, mode, bias, p, q, segment_ids, num_segments
        )
    return rcs_project_reference(inputs, grad_outputs, mode, bias, p, q, segment_ids, num_segments)


def greedy_pick(R: torch.Tensor, v: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """One greedy step: argmax over untaken rows of R[i] . v, marked taken (see module docstring).

    Args:
        R: [N, D] projected gradients of the candidates (fp32 or bf16 for the kernels).
        v: [D] projected gradient of the validation objective (any float dtype; used in fp32).
        taken: bool [N], updated in place.

    Returns:
        0-d int64 tensor on R's device: the picked index, or -1 when every row was taken.
    """
    op = "greedy_pick"
    for name, t in (("R", R), ("v", v), ("taken", taken)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if R.dim() != 2 or not R.is_floating_point():
        raise ValueError(
            f"{op}: R must be a 2-D floating-point tensor [N, D], got {R.dtype} of shape "
            f"{tuple(R.shape)}"
        )
    if v.shape != (R.shape[1],) or not v.is_floating_point():
        raise ValueError(
            f"{op}: v must be a floating-point vector of length D = {R.shape[1]}, got {v.dtype} "
            f"of shape {tuple(v.shape)}"
        )
    if taken.shape != (R.shape[0],) or taken.dtype != torch.bool:
        raise ValueError(
            f"{op}: taken must be a bool vector of length N = {R.shape[0]}, got {taken.dtype} "
            f"of shape {tuple(taken.shape)}"
        )
    if v.device != R.device or taken.device != R.device:
        raise ValueError(
            f"{op}: R, v and taken must be on one device, got {R.device}, {v.device}, "
            f"{taken.device}"
        )
    if _use_extension(op, R):
        return torch.ops.fastacl.greedy_pick(R, v, taken)
    return greedy_pick_reference(R, v, taken)
