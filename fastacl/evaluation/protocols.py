"""What each evaluation protocol runs: the mode / attack / preset tables, the fine-tuning and "++"
hyper-parameters (docs/acl-air.md sections 7 and 8), AutoAttack per preset, and every seed.

Seeds. Every random draw of an evaluation comes from a generator seeded here, from the user's
seed and the use: a mode's base seed is seed * 100 + 10 * its offset (so no two modes share
one), and each kind of draw within a mode adds its own offset to the base. `seeded` also seeds
the global RNG inside a mode (model copies and library code that draw from it), restoring the
caller's state afterwards. Test subsets are the same for every seed (SUBSET_SEED).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastacl.attacks import PGD20_STEPS, STEP_FRACTION
from fastacl.errors import ConfigError
from fastacl.utils import check_choice

__all__ = [
    "ATTACKS",
    "AUTOATTACK_ATTACKS",
    "AUTOATTACK_PRESETS",
    "AUTOATTACK_VERSIONS",
    "MODES",
    "PGD20_STEPS",
    "PRESETS",
    "STEP_FRACTION",
    "SUBSET_SEED",
    "TRADES_BETA",
    "FinetuneSettings",
    "PostProcessSettings",
    "draw_seed",
    "finetune_settings",
    "mode_seed",
    "post_process_settings",
    "seeded",
    "subset_indices",
]

MODES = ("slf", "alf", "aff")
ATTACKS = ("pgd20", "autoattack")
PRESETS = ("demo", "paper")
# TRADES' trade-off (Zhang et al. 2019), used by the published AFF and "++" (docs/acl-air.md
# sections 7-8).
TRADES_BETA = 6.0
# STEP_FRACTION (every attack step is eps / 4) and PGD20_STEPS are imported from fastacl.attacks,
# whose robust_accuracy is the PGD-20 of every evaluation: one definition of each.

# AutoAttack per preset: (version, attacks). Standard AutoAttack costs about 9-10 s per robust
# point of the demo model on a 2-core CPU (APGD-T and FAB-T 9 targets x 100 iterations each,
# Square 5,000 queries; measured: 3,169 s for the SLF mode's 500 MNIST points, 65% robust, on a
# shared CPU), so about 2.5 hours for three modes. The demo preset runs its first attack alone,
# AutoAttack's APGD-CE (100 iterations, 5 restarts in its "custom" version), and says so in the
# results; on that SLF model it was within 0.4 points of the standard cascade (64.8% vs 64.4%).
# evaluate(autoattack_version="standard") runs the real thing.
AUTOATTACK_PRESETS = {"paper": ("standard", None), "demo": ("custom", ["apgd-ce"])}
# pyautoattack's versions and the attacks version "custom" takes (its AttackName).
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


# ---- seeds -------------------------------------------------------------------------------------

_SEED_OFFSETS = {"slf": 1, "alf": 2, "aff": 3, "post-process": 4}
# Within a base seed: fine-tuning's shuffles, crops and flips (and k-means, the probe and the
# training subset of "++"), its training attacks, the test attacks. The "++" TRADES stage is
# finetune(seed=base + 1): its own data draws use base + 1, its attacks base + 2.
_DRAW_OFFSETS = {"data": 0, "train attack": 1, "test attack": 2, "post-process trades": 1}
# Test and training subsets: one fixed subset for every seed and mode (the modes differ only in
# their protocol); the "++" training subset is drawn from its own seed instead.
SUBSET_SEED = 0


def mode_seed(seed: int, mode: str) -> int:
    """The base seed of `mode` ("slf", "alf", "aff" or "post-process") for the user's seed."""
    return seed * 100 + 10 * _SEED_OFFSETS[mode]


def draw_seed(base: int, draw: str) -> int:
    """The seed of one kind of draw (a key of _DRAW_OFFSETS) under the base seed `base`."""
    return base + _DRAW_OFFSETS[draw]


class seeded:
    """Seed the global RNG from (seed, mode) inside the block; the caller's state comes back."""

    def __init__(self, seed: int, mode: str, device: torch.device) -> None:
        self.seed = mode_seed(seed, mode)
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> int:
        self.fork.__enter__()
        torch.manual_seed(self.seed)
        return self.seed

    def __exit__(self, *exc_info) -> None:
        self.fork.__exit__(*exc_info)


def subset_indices(n: int, size: int | None, seed: int = SUBSET_SEED) -> torch.Tensor:
    """`size` of range(n) drawn at random (fixed seed), in increasing order; all if size >= n.

    Not the first `size`: the embedded mnist5k splits are sorted by class.
    """
    if size is None or size >= n:
        return torch.arange(n)
    if size < 1:
        raise ConfigError(f"a subset needs at least 1 image, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


# ---- fine-tuning hyper-parameters --------------------------------------------------------------

@dataclass
class FinetuneSettings:
    """How one mode fine-tunes; `source` says where the numbers come from."""

    mode: str
    epochs: int
    batch_size: int
    lr: float
    milestones: list[int]
    momentum: float = 0.9
    weight_decay: float = 2e-4
    crop_padding: int = 4
    flip: bool = True
    train_attack_steps: int = 10  # ALF's PGD-10, AFF's TRADES inner maximisation
    beta: float = TRADES_BETA  # AFF only
    max_train: int | None = None  # a fixed random subset of the training split (None: all)
    source: str = ""


# (SLF lr, ALF lr) at batch 512 per dataset and pre-training method: the published evaluation
# (docs/acl-air.md section 8). A method missing from a row uses the ACL value of that row (noted
# in source).
_LINEAR_LR = {
    "cifar10": {"acl": (0.01, 0.01), "acl-air": (0.005, 0.01), "dynacl": (0.01, 0.01),
                "dynacl-air": (0.01, 0.01)},
    "cifar100": {"acl": (0.05, 0.05), "acl-air": (0.1, 0.1), "dynacl-air": (0.1, 0.1)},
    "stl10": {"acl": (0.1, 0.1), "acl-air": (0.01, 0.01), "dynacl-air": (0.1, 0.1)},
}
# AFF (batch 128, lr 0.1): ACL and ACL-AIR 100 epochs (milestones 40/60), DynACL variants 25
# (milestones 15/20).
_AFF_SCHEDULE = {"acl": (100, [40, 60]), "acl-air": (100, [40, 60]),
                 "dynacl": (25, [15, 20]), "dynacl-air": (25, [15, 20])}

# The demo preset: the embedded MNIST sample on resnet18-small, sized so that all three modes
# with PGD-20 and AutoAttack on 500 test images finish in about 10 minutes on a quiet 2-core CPU
# (measured: 8 + 49 + 45 s fine-tuning, 10 s PGD-20 and 130-170 s APGD-CE per mode). The
# epochs are few, every mode uses batch 128 (the published linear modes use 512), ALF / AFF
# train on a 2,000-image subset, and lr is 0.1 because the zero-initialised head must converge
# in a few hundred steps.
_DEMO = {
    "slf": dict(epochs=5, batch_size=128, lr=0.1, milestones=[3, 4], max_train=None),
    "alf": dict(epochs=3, batch_size=128, lr=0.1, milestones=[2], max_train=2000),
    "aff": dict(epochs=2, batch_size=128, lr=0.1, milestones=[1], max_train=2000),
}


def _base_method(method: str | None) -> str:
    method = (method or "acl").removesuffix("++")
    return method if method in _AFF_SCHEDULE else "acl"


def _published_values(mode: str, base: str, method: str | None, dataset: str, note: str
                      ) -> tuple[dict, str]:
    """The published table's values for (mode, base method, dataset) and where they come from."""
    if mode == "aff":
        aff_epochs, milestones = _AFF_SCHEDULE[base]
        values = dict(epochs=aff_epochs, batch_size=128, lr=0.1, milestones=milestones,
                      max_train=None)
        return values, f"published AFF table, {base}{note}"
    row = _LINEAR_LR.get(dataset, _LINEAR_LR["cifar10"])
    row_note = "" if dataset in _LINEAR_LR else " (CIFAR-10 row)"
    lr = row.get(base, row["acl"])[0 if mode == "slf" else 1]
    if base not in row:
        note = f" (ACL's value for {method} on {dataset})"
    values = dict(epochs=25, batch_size=512, lr=lr, milestones=[10, 20], max_train=None)
    return values, f"published {mode.upper()} table, {dataset}{row_note}, {base}{note}"


def finetune_settings(mode: str, method: str | None, dataset: str, preset: str = "paper",
                      epochs: int | None = None, max_train: int | None = None
                      ) -> FinetuneSettings:
    """The fine-tuning hyper-parameters of `mode` for a `method` pre-trained model on `dataset`.

    preset "paper": the published per-method table (docs/acl-air.md section 8); datasets outside
    it (imagefolder, mnist5k) use the CIFAR-10 row. preset "demo": a few epochs (see _DEMO).
    `epochs` overrides the epoch count (milestones scale with it); `max_train` the subset size.
    A "cl" model, or a published model whose method is unknown, uses ACL's row.
    """
    check_choice("mode", mode, MODES)
    check_choice("preset", preset, PRESETS)
    base = _base_method(method)
    note = "" if (method or "acl").removesuffix("++") == base else f" (ACL's values for {method})"
    if preset == "demo":
        values, source = dict(_DEMO[mode]), f"demo preset{note}"
    else:
        values, source = _published_values(mode, base, method, dataset, note)
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        values["milestones"] = _scale_milestones(values["milestones"], values["epochs"], epochs)
        values["epochs"] = epochs
        source += f", epochs overridden to {epochs}"
    if max_train is not None:
        values["max_train"] = max_train
    # Digits are not mirror-symmetric: no flip for MNIST, and a 2-pixel pad of the 28.
    padding, flip = (2, False) if dataset.startswith("mnist") else (4, True)
    return FinetuneSettings(mode=mode, crop_padding=padding, flip=flip, source=source, **values)


def _scale_milestones(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    scaled = sorted({max(1, round(m * new_epochs / epochs)) for m in milestones})
    return [m for m in scaled if m < new_epochs]


# ---- "++" hyper-parameters ---------------------------------------------------------------------

@dataclass
class PostProcessSettings:
    """The "++" post-processing (docs/acl-air.md section 7)."""

    probe_epochs: int = 10
    probe_lr: float = 0.01
    probe_batch_size: int = 512  # not given by the published description
    probe_weight_decay: float = 1e-4
    epochs: int = 25
    lr: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [10, 20])
    batch_size: int = 128  # not given by the published description: AFF's
    beta: float = TRADES_BETA
    attack_steps: int = 10
    kmeans_iterations: int = 100
    max_train: int | None = None
    source: str = "docs/acl-air.md section 7"


def post_process_settings(preset: str = "paper") -> PostProcessSettings:
    """docs/acl-air.md section 7's settings ("paper") or one TRADES epoch on 2,000 images."""
    check_choice("preset", preset, PRESETS)
    if preset == "demo":
        return PostProcessSettings(epochs=1, milestones=[], max_train=2000,
                                   source="demo preset (docs/acl-air.md section 7, 1 TRADES "
                                          "epoch)")
    return PostProcessSettings()
