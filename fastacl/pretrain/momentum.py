"""DynACL's momentum encoder, as the released DynACL code runs it (docs/fidelity.md).

The released DynACL trains an online encoder q and keeps a momentum copy k of it (backbone and
projection head; no gradient). In every forward of a pair of views, training and attack alike,
view 1 goes through q and view 2 through k; after each step's forwards (before the update of q)
k <- m k + (1 - m) q, parameters only (k's BN running statistics are its own, from its own
train-mode forwards). The encoder kept for downstream use is k.

fastacl's steps call the model on torch.cat([view 1, view 2]); `MomentumPair` routes the first
half through q and the second through k, so the step and the attack need no special case.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn


class SplitViews(nn.Module):
    """forward(cat([a, b])) = cat([first(a), second(b)]): the two views through two encoders."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        a, b = x.chunk(2)
        return torch.cat([_call(self.first, a, branch), _call(self.second, b, branch)])


def _call(module: nn.Module, x: torch.Tensor, branch: str | None) -> torch.Tensor:
    # A folded encoder (the attack's) is single-branch: its forward takes no branch.
    takes_branch = "branch" in inspect.signature(type(module).forward).parameters
    return module(x, branch=branch) if takes_branch else module(x)


class MomentumPair(SplitViews):
    """The online encoder q (`online`, trained) and its momentum copy k (`momentum`, kept)."""

    def __init__(self, online: nn.Module, m: float = 0.99) -> None:
        momentum = copy.deepcopy(online)
        for p in momentum.parameters():
            p.requires_grad_(False)
        super().__init__(online, momentum)
        self.m = m

    @property
    def online(self) -> nn.Module:
        return self.first

    @property
    def momentum(self) -> nn.Module:
        return self.second

    @torch.no_grad()
    def update_momentum(self) -> None:
        """k <- m k + (1 - m) q, written as the released code writes it (same rounding)."""
        for q, k in zip(self.online.parameters(), self.momentum.parameters(), strict=True):
            k.copy_(k * self.m + q * (1.0 - self.m))
