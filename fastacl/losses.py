"""nn.Module forms of the fastacl losses, built on fastacl.ops.

NTXentLoss is a drop-in for lightly's NTXentLoss (same constructor names, forward(out0, out1)).
ACLLoss is the whole objective of one ACL / DynACL / AIR training step (docs/acl-air.md section 5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastacl import ops
from fastacl.ops._checks import check_form, check_temperature


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) loss of two views (docs/acl-air.md section 4).

    It computes what lightly's `NTXentLoss(temperature, memory_bank_size=0)` computes for one
    process: the mean over the 2N anchors of -log softmax of the positive among the 2N - 1
    other embeddings. Where it differs from lightly's:
    - no memory bank (lightly's second argument, `memory_bank_size`, has no counterpart here);
      every argument after `temperature` is keyword-only, so `NTXentLoss(0.5, 4096)` is an
      error rather than a silent `gather_distributed=4096`;
    - anchors under `gather_distributed=True`: lightly scores only each rank's own 2N anchors
      against the gathered negatives and averages over them; here every rank gathers both
      views of all W ranks and returns the loss of the whole global batch (the mean over all
      2WN anchors, each row keeping its own positive). The all-gather's backward scales rank
      r's rows by W, so DDP's average over ranks is exactly the single-process gradient of
      the global batch (fastacl.distributed). The loss value each rank reports is therefore
      the global one, not a per-rank one.

    Args:
        temperature: t > 0 dividing the cosine similarities.
        gather_distributed: gather the embeddings of every rank for cross-rank negatives.
    """

    def __init__(self, temperature: float = 0.5, *, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_temperature("NTXentLoss", temperature)
        self.gather_distributed = gather_distributed

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """out0, out1: [N, d], row k of each a positive pair. Returns the 0-d mean loss."""
        return ops.nt_xent(
            out0, out1, temperature=self.temperature, gather_distributed=self.gather_distributed
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class ACLLossResult(NamedTuple):
    """`total` is the differentiable loss; the terms are detached 0-d tensors (unweighted, for
    logging without a host sync); sir / air are None when their lambda is 0 (not computed)."""

    total: torch.Tensor
    natural: torch.Tensor
    adversarial: torch.Tensor
    sir: torch.Tensor | None
    air: torch.Tensor | None


def _check_weight(name: str, value: float, low: float, high: float | None) -> float:
    value = float(value)
    in_range = value >= low and (high is None or value < high)  # also rejects NaN
    if not in_range:
        expected = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"ACLLoss: {name} must be {expected}, got {value}")
    return value


class ACLLoss(nn.Module):
    """The ACL / DynACL / AIR training objective (docs/acl-air.md section 5):

        L = (1 - w) NTX(z1, z2) + (1 + w) NTX(z1_adv, z2_adv) + lambda1 SIR + lambda2 AIR

    ACL: w = 0, lambdas 0. DynACL: set `weight_w` each epoch to w(e) = (2/3)(1 - s(e)).
    ACL-AIR / DynACL-AIR: lambda1 = lambda2 = 0.5. The sum is NOT halved as in the original ACL
    code: under LARS (a per-tensor trust ratio) a constant factor on the loss is immaterial.

    Args:
        weight_w: w in [0, 1), the shift of weight from the natural to the adversarial NT-Xent.
        lambda1, lambda2: >= 0, the weights of SIR and AIR.
        temperature: t of NT-Xent and of the SIR / AIR batch softmaxes.
        form: "exact" | "reference-code", the SIR / AIR form (see fastacl.ops.sir).
        scale: a factor on the total (0.5: the released DynACL code, which halves it).
        gather_distributed: under torch.distributed, gather the five embedding sets of every
            rank (one differentiable all-gather) and compute every term on the global batch:
            NT-Xent over all ranks' negatives, and SIR / AIR batch softmaxes over the global
            batch. Every rank then returns the global loss, and DDP's gradient average equals
            the single-process gradient of the global batch (fastacl.distributed). No-op
            without a process group.
    """

    def __init__(
        self,
        weight_w: float = 0.0,
        lambda1: float = 0.0,
        lambda2: float = 0.0,
        temperature: float = 0.5,
        form: str = "exact",
        gather_distributed: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        self.gather_distributed = gather_distributed
        self.weight_w = weight_w
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.temperature = check_temperature("ACLLoss", temperature)
        self.form = check_form("ACLLoss", form)
        self.scale = _check_weight("scale", scale, 0.0, None)

    # Validated on every assignment, so that a per-epoch DynACL update cannot set a bad value.
    @property
    def weight_w(self) -> float:
        return self._weight_w

    @weight_w.setter
    def weight_w(self, value: float) -> None:
        self._weight_w = _check_weight("weight_w", value, 0.0, 1.0)

    @property
    def lambda1(self) -> float:
        return self._lambda1

    @lambda1.setter
    def lambda1(self, value: float) -> None:
        self._lambda1 = _check_weight("lambda1", value, 0.0, None)

    @property
    def lambda2(self) -> float:
        return self._lambda2

    @lambda2.setter
    def lambda2(self, value: float) -> None:
        self._lambda2 = _check_weight("lambda2", value, 0.0, None)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        z_orig: torch.Tensor | None,
        z1_adv: torch.Tensor,
        z2_adv: torch.Tensor,
    ) -> ACLLossResult:
        """z1, z2: natural views i, j; z_orig: originals (None allowed when both lambdas are 0);
        z1_adv, z2_adv: adversarial views. All [N, d] projection-head outputs."""
        if (self.lambda1 > 0 or self.lambda2 > 0) and z_orig is None:
            raise ValueError(
                f"ACLLoss: z_orig (the projections of the original images) is needed when "
                f"lambda1 or lambda2 > 0, got lambda1={self.lambda1}, lambda2={self.lambda2}"
            )
        if self.gather_distributed:
            from fastacl.distributed import all_gather_rows

            z1, z2, z_orig, z1_adv, z2_adv = all_gather_rows(z1, z2, z_orig, z1_adv, z2_adv)
        t = self.temperature
        natural = ops.nt_xent(z1, z2, temperature=t)
        adversarial = ops.nt_xent(z1_adv, z2_adv, temperature=t)
        total = (1 - self.weight_w) * natural + (1 + self.weight_w) * adversarial
        sir = air = None
        if self.lambda1 > 0:
            sir = ops.sir(z1, z2, z_orig, temperature=t, form=self.form)
            total = total + self.lambda1 * sir
        if self.lambda2 > 0:
            air = ops.air(z1, z2, z_orig, z1_adv, z2_adv, temperature=t, form=self.form)
            total = total + self.lambda2 * air
        if self.scale != 1.0:
            total = self.scale * total
        return ACLLossResult(
            total=total,
            natural=natural.detach(),
            adversarial=adversarial.detach(),
            sir=None if sir is None else sir.detach(),
            air=None if air is None else air.detach(),
        )

    def extra_repr(self) -> str:
        return (
            f"weight_w={self.weight_w}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"temperature={self.temperature}, form={self.form!r}, "
            f"scale={self.scale}, gather_distributed={self.gather_distributed}"
        )
