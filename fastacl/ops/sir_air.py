"""The SIR and AIR regularisers of AIR (spec/acl-air.md section 6).

Batch softmaxes over the sample index k of matched-pair similarities: D(A, B)_k = sim(A_k, B_k)/t.
  P_u = softmax_k D(z^u, z^o)        natural view u against the original
  A_u = softmax_k D(z~^u, z^o)       adversarial view u against the original
  C_u = softmax_k D(z~^u, z^u)       adversarial view u against its natural view
  R_u = A_u * C_u                    (not renormalised)
z1 is view i, z2 is view j (the reference view of the KL).
  exact:           SIR = sum_k P_j (log P_j - log P_i)    AIR = sum_k R_j (log R_j - log R_i)
  reference-code:  SIR = sum_k P_j (log P_j - P_i)        AIR = sum_k R_j (log R_j - R_i)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastacl.ops._checks import check_embeddings, check_form, check_temperature


def _log_softmax_matched(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax over k of cos(a_k, b_k) / t."""
    similarity = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)
    return torch.log_softmax(similarity / temperature, dim=0)


def _kl_term(log_ref: torch.Tensor, log_other: torch.Tensor, form: str) -> torch.Tensor:
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


def sir(z1, z2, z_orig, temperature: float = 0.5, form: str = "exact") -> torch.Tensor:
    """Standard invariant regularisation; a 0-d tensor, differentiable in every input."""
    check_embeddings("sir", z1=z1, z2=z2, z_orig=z_orig)
    temperature = check_temperature("sir", temperature)
    check_form("sir", form)
    return sir_reference(z1, z2, z_orig, temperature, form)


def air(z1, z2, z_orig, z1_adv, z2_adv, temperature: float = 0.5, form: str = "exact"):
    """Adversarial invariant regularisation; a 0-d tensor, differentiable in every input."""
    check_embeddings("air", z1=z1, z2=z2, z_orig=z_orig, z1_adv=z1_adv, z2_adv=z2_adv)
    temperature = check_temperature("air", temperature)
    check_form("air", form)
    return air_reference(z1, z2, z_orig, z1_adv, z2_adv, temperature, form)
