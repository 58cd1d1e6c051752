"""One pre-training step: the ACL step (ACL, DynACL and their AIR variants) and the CL step.

No I/O, no schedule: the loop (fastacl.pretrain.loop) sets the learning rate, DynACL's w on the
loss and the views; a step attacks, runs the training forwards, the loss and one LARS update.
docs/acl-air.md sections 3-6.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from fastacl.attacks import pgd_contrastive
from fastacl.config import TrainConfig
from fastacl.losses import ACLLoss
from fastacl.models.folded import can_fold, folded_for_attack
from fastacl.ops import nt_xent
from fastacl.pretrain.momentum import MomentumPair, SplitViews
from fastacl.pretrain.speed import compiled_for_attack
from fastacl.utils import at_least_fp32, unwrap

# record_function names the phases in torch.profiler traces (benchmarks/profile_step.py).


def train_step(model: nn.Module, loss_fn: ACLLoss, optimizer: torch.optim.Optimizer,
               x_orig: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, cfg: TrainConfig,
               attack_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One step of `cfg.method` on a batch; returns the loss terms as detached 0-d tensors."""
    if cfg.is_adversarial:
        terms = acl_step(model, loss_fn, x_orig, x1, x2, cfg, attack_generator)
    else:
        terms = cl_step(model, x1, x2, cfg)
    if isinstance(unwrap(model), MomentumPair):  # after the forwards, before q's update
        unwrap(model).update_momentum()
    with record_function("fastacl.backward"):
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
    with record_function("fastacl.optimizer"):
        optimizer.step()
    return {name: value.detach() for name, value in terms.items() if value is not None}


def acl_step(model: nn.Module, loss_fn: ACLLoss, x_orig: torch.Tensor, x1: torch.Tensor,
             x2: torch.Tensor, cfg: TrainConfig, attack_generator: torch.Generator) -> dict:
    """The ACL loss terms of a batch: PGD views through the "adv" BN branch, then
    L = (1 - w) NTX(z1, z2) + (1 + w) NTX(z1_adv, z2_adv) + lambda1 SIR + lambda2 AIR."""
    with record_function("fastacl.attack"):
        x1_adv, x2_adv = pgd_contrastive(
            attack_model(model, cfg), x1, x2, eps=cfg.attack.eps, step_size=cfg.attack.step_size,
            steps=cfg.attack.steps, branch="adv", generator=attack_generator,
            temperature=cfg.loss.temperature, clip_random_start=cfg.attack.clip_random_start,
            autocast_dtype=torch.bfloat16 if cfg.speed.attack_precision == "bf16" else None,
            check_range=False,  # the views are in [0, 1] by construction: no host sync
        )
    with record_function("fastacl.forward"):
        with _autocast(cfg, x1):
            z1_adv, z2_adv = at_least_fp32(
                model(torch.cat([x1_adv, x2_adv]), branch="adv")).chunk(2)
            z1, z2 = at_least_fp32(model(torch.cat([x1, x2]), branch="normal")).chunk(2)
            # The originals' pass is needed by SIR / AIR only (the AIR code runs it always, and
            # so moves the natural BN statistics: --originals-pass).
            z_orig = (at_least_fp32(model(x_orig, branch="normal"))
                      if loss_fn.lambda1 > 0 or loss_fn.lambda2 > 0 or cfg.loss.originals_pass
                      else None)
        # The losses in fp32, outside autocast (softmaxes over the batch need the range).
        return loss_fn(z1, z2, z_orig, z1_adv, z2_adv)._asdict()


def cl_step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, cfg: TrainConfig) -> dict:
    """SimCLR's loss of a batch (the non-robust baseline: no attack, single BN)."""
    with record_function("fastacl.forward"):
        with _autocast(cfg, x1):
            z1, z2 = at_least_fp32(model(torch.cat([x1, x2]), branch="normal")).chunk(2)
        return {"total": nt_xent(z1, z2, cfg.loss.temperature,
                                 gather_distributed=cfg.distributed.gather_negatives)}


def loss_for(cfg: TrainConfig) -> ACLLoss:
    """The run's loss module; the loop sets DynACL's `weight_w` every epoch."""
    return ACLLoss(weight_w=0.0, lambda1=cfg.loss.lambda1, lambda2=cfg.loss.lambda2,
                   temperature=cfg.loss.temperature, form=cfg.loss.air_form,
                   scale=cfg.loss.scale, gather_distributed=cfg.distributed.gather_negatives)


def attack_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The module the attack runs: the model without its DDP wrapper (no gradient all-reduce;
    this rank's negatives only), with its eval-mode BNs folded into the convolutions where it
    can be (refreshed from the current weights), compiled with --compile. A momentum pair is
    attacked as a pair (view 1 through q, view 2 through k), each encoder folded."""
    model = unwrap(model)
    if isinstance(model, SplitViews):
        model = SplitViews(_folded(model.first, cfg), _folded(model.second, cfg))
    else:
        model = _folded(model, cfg)
    if cfg.speed.compile:
        model = compiled_for_attack(model, cfg.speed.compile_mode)
    return model


def _folded(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    return folded_for_attack(model, "adv") if cfg.speed.fold_bn and can_fold(model) else model


def _autocast(cfg: TrainConfig, x: torch.Tensor):
    return torch.autocast(x.device.type, dtype=torch.bfloat16,
                          enabled=cfg.speed.precision == "bf16")
