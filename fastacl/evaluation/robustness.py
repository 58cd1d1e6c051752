"""Testing a fine-tuned network: clean accuracy, PGD-20 and AutoAttack robust accuracy.

Robust means correct clean AND under attack (docs/acl-air.md section 8), so robust <= clean.
PGD-20 is fastacl.attacks.robust_accuracy, the one routine every evaluation measures it with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastacl.attacks import _forward, autoattack, frozen_eval, robust_accuracy
from fastacl.evaluation.protocols import ATTACKS
from fastacl.utils import check_choice
from fastacl.utils import progress as progress_bar

__all__ = ["correct_predictions", "test_network"]


@torch.no_grad()
def correct_predictions(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int, branch: str | None) -> torch.Tensor:
    """Bool [N]: clean predictions equal to the labels (images uint8 or float in [0, 1])."""
    out = []
    with frozen_eval(network):
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            out.append(_forward(network, x, branch).argmax(dim=1) == y)
    return torch.cat(out)


def _autoattack_accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         eps: float, batch_size: int, seed: int, branch: str, version: str,
                         attacks: list[str] | None, progress: bool | None
                         ) -> tuple[float, dict[str, float]]:
    """AutoAttack in chunks of `batch_size` points, so that progress can be shown.

    Returns (robust accuracy, robust accuracy after each attack), both summed over the chunks.
    """
    robust_count, per_attack = 0, {}
    n = labels.shape[0]
    bar = progress_bar(n, f"AutoAttack ({version})", progress, unit="img")
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        chunk = autoattack(network, x.float() / 255, y, eps=eps, version=version,
                           batch_size=batch_size, seed=seed, attacks=attacks, branch=branch)
        robust_count += int(chunk.robust.sum())
        for name, accuracy in chunk.per_attack.items():
            per_attack[name] = per_attack.get(name, 0.0) + accuracy * y.shape[0]
        bar.update(y.shape[0])
    bar.close()
    return robust_count / n, {k: v / n for k, v in per_attack.items()}


def test_network(network: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 attacks: Sequence[str], eps: float, batch_size: int = 256, seed: int = 0,
                 branch: str = "adv", autoattack_version: str = "standard",
                 autoattack_attacks: list[str] | None = None,
                 progress: bool | None = None) -> dict[str, Any]:
    """Clean accuracy and robust accuracy under each of `attacks` ("pgd20", "autoattack").

    images: uint8 [N, C, H, W] on the network's device. PGD-20: 20 steps of eps / 4 from a
    uniform random start drawn from a generator seeded by `seed`. AutoAttack: l_inf,
    `autoattack_version` ("standard": APGD-CE, APGD-T, FAB-T, Square), seed `seed`, run in
    chunks of `batch_size` points (its own batching) so that progress can be shown; the per-
    attack robust accuracies add the chunks up.
    """
    for attack in attacks:
        check_choice("attack", attack, ATTACKS)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    clean = correct_predictions(network, images, labels, batch_size, branch)
    result["standard_accuracy"] = clean.float().mean().item()
    result["seconds_standard"] = time.perf_counter() - start
    if "pgd20" in attacks:
        start = time.perf_counter()
        generator = torch.Generator(images.device).manual_seed(seed)
        result["pgd20_accuracy"] = robust_accuracy(
            network, images, labels, "pgd20", eps, batch_size, branch, generator, progress)
        result["seconds_pgd20"] = time.perf_counter() - start
    if "autoattack" in attacks:
        start = time.perf_counter()
        result["autoattack_accuracy"], result["autoattack_per_attack"] = _autoattack_accuracy(
            network, images, labels, eps, batch_size, seed, branch, autoattack_version,
            autoattack_attacks, progress)
        result["seconds_autoattack"] = time.perf_counter() - start
    return result
