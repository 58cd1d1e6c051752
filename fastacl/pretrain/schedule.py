"""What changes with the epoch: augmentation strength, DynACL's w, the learning rate, RCS rounds.

docs/acl-air.md sections 1 and 5, docs/rcs.md section 4. Epochs are 1-based, as in the papers.
"""

from __future__ import annotations

import math

from fastacl.config import TrainConfig
from fastacl.data import dynaug_strength
from fastacl.optim import warmup_cosine_lr


def augmentation_strength(cfg: TrainConfig, epoch: int) -> float:
    """s(e): 1 for ACL, the DynAug staircase for DynACL."""
    if not cfg.is_dynamic:
        return 1.0
    return dynaug_strength(epoch, cfg.optim.epochs, period=cfg.data.dynaug_period)


def dynacl_weight(cfg: TrainConfig, strength: float, epoch: int) -> float:
    """DynACL's w(e) = (2/3)(1 - s(e)): weight moves towards the adversarial term; 0 for ACL.

    dynacl_w_timing="released": the DynACL code's w = (2/3) floor(e / K) K / E, which steps one
    epoch before s(e) does (docs/fidelity.md).
    """
    if not cfg.is_dynamic:
        return 0.0
    if cfg.loss.w_timing == "released":
        period, epochs = cfg.data.dynaug_period, cfg.optim.epochs
        return min((2 / 3) * (epoch // period) * period / epochs, 2 / 3)
    return (2 / 3) * (1 - strength)


def learning_rate(cfg: TrainConfig, iteration: float, steps_per_epoch: int) -> float:
    """LARS's lr at `iteration` (0-based, counted in full-pool steps): linear warm-up, cosine.

    A coreset epoch has fewer steps than a full-pool one; its steps sweep a whole epoch of the
    schedule, so the iteration may be fractional.

    lr_schedule="epoch": the DynACL code's schedule, stepped once per epoch: epoch e (1-based)
    trains at lr e / W during the warm-up, then at the cosine's value at (e - 1 - W) / (E - W).
    """
    o = cfg.optim
    if o.lr_schedule == "epoch":
        e = int(iteration // steps_per_epoch)  # 0-based epoch
        if e < o.warmup_epochs:
            return o.lr * (e + 1) / o.warmup_epochs
        progress = (e - o.warmup_epochs) / max(o.epochs - o.warmup_epochs, 1)
        return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(progress * math.pi))
    return warmup_cosine_lr(iteration, cfg.optim.epochs * steps_per_epoch,
                            cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.lr,
                            cfg.optim.min_lr)


def is_selection_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """RCS re-selects at epochs W + 1, W + 1 + I, ...; the random subset is drawn once, at
    W + 1 (W: coreset warm-up, I: interval)."""
    if cfg.coreset.method is None:
        return False
    after = epoch - cfg.coreset.warmup - 1
    if after < 0:
        return False
    return after == 0 or (cfg.coreset.method == "rcs" and after % cfg.coreset.interval == 0)
