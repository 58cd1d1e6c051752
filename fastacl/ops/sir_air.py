"""The SIR and AIR regularisers of AIR (docs/acl-air.md section 6).

Batch softmaxes over the sample index k of matched-pair similarities: D(A, B)_k = sim(A_k, B_k)/t.
  P_u = softmax_k D(z^u, z^o)        natural view u against the original
  A_u = softmax_k D(z~^u, z^o)       adversarial view u against the original
  C_u = softmax_k D(z~^u, z^u)       adversarial view u against its natural view
  R_u = A_u * C_u                    (not renormalised)
z1 is view i, z2 is view j (the reference view of the KL).
  exact:           SIR = sum_k P_j (log P_j - log P_i)    AIR = sum_k R_j (log R_j - log R_i)
  reference-code:  SIR = sum_k P_j (log P_j - P_i)        AIR = sum_k R_j (log R_j - R_i)
Sums over the batch, nothing detached. The exact AIR is an unnormalised KL (R is not renormalised)
and can be slightly negative; the exact SIR is a KL and is >= 0.

Paths: the Triton kernels (kernels/sir_air.py: one pass over the matched pairs, O(N d) work, O(N)
extra memory; the gradient derivation is in its docstring) and the reference below, which is also
the CPU path. Both sit behind the custom ops fastacl::sir_forward / sir_backward / air_forward /
air_backward, so the regularisers work under torch.compile and pass torch.library.opcheck. The
backward ops have no autograd formula of their own: double backward is not supported.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastacl.ops import _dispatch
from fastacl.ops._checks import autocast_off, check_embeddings, check_form, check_temperature

# ---------------------------------------------------------------------------------------------
# Reference: the one statement of the math, the oracle of the tests and the CPU path.
# ---------------------------------------------------------------------------------------------


def _log_softmax_matched(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax over k of cos(a_k, b_k) / t."""
    similarity = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)
    return torch.log_softmax(similarity / temperature, dim=0)


def _kl_term(log_ref: torch.Tensor, log_other: torch.Tensor, form: str) -> torch.Tensor:
    """sum_k ref (log ref - log other), or with `other` itself in place of its log (the released
    code passes probabilities where F.kl_div expects log-probabilities)."""
    if form == "exact":
        return (log_ref.exp() * (log_ref - log_other)).sum()
    return (log_ref.exp() * (log_ref - log_other.exp())).sum()


def sir_reference(z1, z2, z_orig, temperature: float = 0.5, form: str = "exact") -> torch.Tensor:
    log_p_i = _log_softmax_matched(z1, z_orig, temperature)
    log_p_j = _log_softmax_matched(z2, z_orig, temperature)
    return _kl_term(log_p_j, log_p_i, form)


def air_reference(
    z1, z2, z_orig, z1_adv, z2_adv, temperature: float = 0.5, form: str = "exact"
) -> torch.Tensor:
    log_r_i = _log_softmax_matched(z1_adv, z_orig, temperature) + _log_softmax_matched(
        z1_adv, z1, temperature
    )
    log_r_j = _log_softmax_matched(z2_adv, z_orig, temperature) + _log_softmax_matched(
        z2_adv, z2, temperature
    )
    return _kl_term(log_r_j, log_r_i, form)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _autograd_enabled():
    """Record autograd inside a custom op's implementation.

    torch.library runs an op's implementation below the Autograd dispatch key (autograd keys are
    excluded in thread-local state), so torch.enable_grad() alone records nothing there. The
    torch-path backward differentiates the reference (one copy of the math), so it puts autograd
    back for that block; autocast stays excluded, as the op's implementation expects. There is no
    public API for this: it uses torch._C's dispatch-key guards, and the torch-path opcheck and
    gradient tests fail loudly if those change.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (
        torch._C.DispatchKey.AutogradFunctionality,
        torch._C.DispatchKey.AutogradOther,
        torch._C.DispatchKey.AutogradNestedTensor,
    ):
        excluded = excluded.remove(key)
    included = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(included, excluded), torch.enable_grad():
        yield


def _reference_gradients(reference, grad_loss, inputs, temperature, form):
    """Gradients of every input of `reference` (a tuple), by recomputing it under autograd."""
    with _autograd_enabled():
        leaves = [t.detach().requires_grad_() for t in inputs]
        loss = reference(*leaves, temperature, form)
        return torch.autograd.grad(loss, leaves, grad_loss)


def _kernels():
    # Imported on the Triton path only, so that importing fastacl never requires triton.
    from fastacl.kernels import sir_air

    return sir_air


# ---------------------------------------------------------------------------------------------
# Custom ops: the path is chosen at call time inside each op.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastacl::sir_forward", mutates_args=())
def _sir_forward(
    z1: torch.Tensor, z2: torch.Tensor, z_orig: torch.Tensor, temperature: float, form: str
) -> torch.Tensor:
    if _dispatch.select("sir", z1, ("triton",)) == "triton":
        loss = _kernels().sir_air_forward(z_orig, (z1, z2), (), temperature, form == "exact")
        return loss.to(z1.dtype)
    return sir_reference(z1, z2, z_orig, temperature, form)


@torch.library.custom_op("fastacl::sir_backward", mutates_args=())
def _sir_backward(
    grad_loss: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    z_orig: torch.Tensor,
    temperature: float,
    form: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _dispatch.select("sir", z1, ("triton",)) == "triton":
        grad_orig, grad_1, grad_2 = _kernels().sir_air_backward(
            grad_loss, z_orig, (z1, z2), (), temperature, form == "exact"
        )
        return grad_1, grad_2, grad_orig
    return _reference_gradients(sir_reference, grad_loss, (z1, z2, z_orig), temperature, form)


@torch.library.custom_op("fastacl::air_forward", mutates_args=())
def _air_forward(
    z1: torch.Tensor,
    z2: torch.Tensor,
    z_orig: torch.Tensor,
    z1_adv: torch.Tensor,
    z2_adv: torch.Tensor,
    temperature: float,
    form: str,
) -> torch.Tensor:
    if _dispatch.select("air", z1, ("triton",)) == "triton":
        loss = _kernels().sir_air_forward(
            z_orig, (z1_adv, z2_adv), (z1, z2), temperature, form == "exact"
        )
        return loss.to(z1.dtype)
    return air_reference(z1, z2, z_orig, z1_adv, z2_adv, temperature, form)


@torch.library.custom_op("fastacl::air_backward", mutates_args=())
def _air_backward(
    grad_loss: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    z_orig: torch.Tensor,
    z1_adv: torch.Tensor,
    z2_adv: torch.Tensor,
    temperature: float,
    form: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _dispatch.select("air", z1, ("triton",)) == "triton":
        grad_orig, grad_1_adv, grad_2_adv, grad_1, grad_2 = _kernels().sir_air_backward(
            grad_loss, z_orig, (z1_adv, z2_adv), (z1, z2), temperature, form == "exact"
        )
        return grad_1, grad_2, grad_orig, grad_1_adv, grad_2_adv
    inputs = (z1, z2, z_orig, z1_adv, z2_adv)
    return _reference_gradients(air_reference, grad_loss, inputs, temperature, form)


@_sir_forward.register_fake
@_air_forward.register_fake
def _loss_fake(z1, *args):
    return z1.new_empty(())


@_sir_backward.register_fake
@_air_backward.register_fake
def _gradients_fake(grad_loss, *args):
    embeddings = args[:-2]  # the trailing two are temperature and form
    return tuple(torch.empty_like(z) for z in embeddings)


def _save_embeddings(ctx, inputs, output):
    *embeddings, ctx.temperature, ctx.form = inputs
    ctx.save_for_backward(*embeddings)


def _sir_gradients(ctx, grad_loss):
    grads = _sir_backward(grad_loss, *ctx.saved_tensors, ctx.temperature, ctx.form)
    return (*grads, None, None)


def _air_gradients(ctx, grad_loss):
    grads = _air_backward(grad_loss, *ctx.saved_tensors, ctx.temperature, ctx.form)
    return (*grads, None, None)


_sir_forward.register_autograd(_sir_gradients, setup_context=_save_embeddings)
_air_forward.register_autograd(_air_gradients, setup_context=_save_embeddings)


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------


def sir(z1, z2, z_orig, temperature: float = 0.5, form: str = "exact") -> torch.Tensor:
    """Standard invariant regularisation; a 0-d tensor, differentiable in every input.

    Args:
        z1, z2: [N, d] projections of the natural views i and j (j is the KL's reference view).
        z_orig: [N, d] projections of the original (unaugmented) images.
        temperature: t > 0 of the batch softmaxes.
        form: "exact" (the paper's KL) or "reference-code" (what the released code computes).
    Returns:
        sum_k P_j (log P_j - log P_i), or sum_k P_j (log P_j - P_i) for "reference-code".
    """
    check_embeddings("sir", z1=z1, z2=z2, z_orig=z_orig)
    temperature = check_temperature("sir", temperature)
    check_form("sir", form)
    with autocast_off(z1):
        return _sir_forward(z1, z2, z_orig, temperature, form)


def air(z1, z2, z_orig, z1_adv, z2_adv, temperature: float = 0.5, form: str = "exact"):
    """Adversarial invariant regularisation; a 0-d tensor, differentiable in every input.

    Args:
        z1, z2: [N, d] projections of the natural views i and j (j is the KL's reference view).
        z_orig: [N, d] projections of the original images.
        z1_adv, z2_adv: [N, d] projections of the adversarial views.
        temperature: t > 0 of the batch softmaxes.
        form: "exact" (the paper's KL) or "reference-code" (what the released code computes).
    Returns:
        sum_k R_j (log R_j - log R_i), or sum_k R_j (log R_j - R_i) for "reference-code", with
        R_u = softmax_k(sim(z~^u, z^o) / t) * softmax_k(sim(z~^u, z^u) / t).
    """
    check_embeddings("air", z1=z1, z2=z2, z_orig=z_orig, z1_adv=z1_adv, z2_adv=z2_adv)
    temperature = check_temperature("air", temperature)
    check_form("air", form)
    with autocast_off(z1):
        return _air_forward(z1, z2, z_orig, z1_adv, z2_adv, temperature, form)
