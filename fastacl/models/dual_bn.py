"""Dual batch normalisation: one BN per input distribution ("normal" and "adv").

ACL (Jiang et al., 2020) keeps two sets of BN statistics and affine parameters in every BN layer
of the backbone, the shortcuts and the projection head: natural views and original images go
through the "normal" branch, adversarial views (and the attack that makes them) through the
"adv" branch; all conv and linear weights are shared (docs/acl-air.md section 2).

Routing. A dual-BN layer does not take the branch as a forward argument (nn.Sequential and user
modules would have to pass it through every call). Instead each layer has an ``active_branch``
attribute, and ``bn_branch(module, branch)`` sets it on every dual-BN layer inside ``module`` for
the duration of a ``with`` block and restores the previous value afterwards, even on an exception.
Our models' ``forward(x, branch=...)`` is exactly that context around the plain forward, so a
user module converted with ``convert_to_dual_bn`` routes the same way:

    model = convert_to_dual_bn(my_encoder)
    with bn_branch(model, "adv"):
        z_adv = model(x_adv)

A dual-BN layer used with no active branch raises: a silent default would let an attack or a
training view run through the wrong statistics without anyone noticing. Routing is per process
and not thread-safe (two threads sharing one model must not route it differently at once).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from fastacl.errors import ConfigError
from fastacl.utils import unwrap

__all__ = [
    "BRANCHES",
    "Branch",
    "DualBatchNorm",
    "DualBatchNorm1d",
    "DualBatchNorm2d",
    "bn_branch",
    "check_branch",
    "convert_to_dual_bn",
    "dual_bn_modules",
    "encoder_from_branch",
    "has_dual_bn",
]

Branch = Literal["normal", "adv"]
BRANCHES: tuple[str, ...] = ("normal", "adv")


def check_branch(branch: str) -> str:
    """Return ``branch`` if it names a BN branch, else raise a ConfigError naming the choices."""
    if branch not in BRANCHES:
        raise ConfigError(
            f"branch must be one of {BRANCHES}, got {branch!r} "
            "(natural views use 'normal', adversarial views and attacks use 'adv')"
        )
    return branch


class DualBatchNorm(nn.Module):
    """Two independent BN layers, ``normal`` and ``adv``; ``active_branch`` picks one per forward.

    Subclasses set ``batch_norm_class``. The constructor mirrors the torch BN it replaces. The
    state dict holds ``normal.*`` and ``adv.*`` (weight, bias, running_mean, running_var,
    num_batches_tracked), nothing else.
    """

    batch_norm_class: type[nn.modules.batchnorm._BatchNorm]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        arguments = dict(
            eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            device=device, dtype=dtype,
        )
        self.normal = self.batch_norm_class(num_features, **arguments)
        self.adv = self.batch_norm_class(num_features, **arguments)
        self.num_features = num_features
        # Not a buffer: routing state, never saved in a checkpoint.
        self.active_branch: str | None = None

    @classmethod
    def from_batch_norm(cls, batch_norm: nn.modules.batchnorm._BatchNorm) -> DualBatchNorm:
        """Both branches start as exact copies of ``batch_norm`` (parameters, running stats)."""
        dual = cls(batch_norm.num_features)
        # Deep copies keep everything: eps, momentum, affine, device, dtype, a BN subclass.
        dual.normal = copy.deepcopy(batch_norm)
        dual.adv = copy.deepcopy(batch_norm)
        dual.train(batch_norm.training)
        return dual

    def branch_module(self, branch: str) -> nn.modules.batchnorm._BatchNorm:
        """The plain BN layer of ``branch`` ("normal" or "adv")."""
        return getattr(self, check_branch(branch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_branch is None:
            raise RuntimeError(
                f"{type(self).__name__} has no active branch: call the model with "
                f"branch='normal' or 'adv', or run it inside fastacl.models.bn_branch(model, "
                f"branch). Choices: {BRANCHES}"
            )
        return getattr(self, self.active_branch)(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, active_branch={self.active_branch!r}"


class DualBatchNorm1d(DualBatchNorm):
    """Dual BN over nn.BatchNorm1d (projection head: [N, C] or [N, C, L])."""

    batch_norm_class = nn.BatchNorm1d


class DualBatchNorm2d(DualBatchNorm):
    """Dual BN over nn.BatchNorm2d (backbone and shortcuts: [N, C, H, W])."""

    batch_norm_class = nn.BatchNorm2d


def dual_bn_modules(module: nn.Module) -> list[DualBatchNorm]:
    """Every dual-BN layer inside ``module`` (including ``module`` itself)."""
    return [m for m in module.modules() if isinstance(m, DualBatchNorm)]


def has_dual_bn(module: nn.Module) -> bool:
    """Whether ``module`` contains at least one dual-BN layer."""
    return any(isinstance(m, DualBatchNorm) for m in module.modules())


class bn_branch:  # lower case: it reads as a function, `with bn_branch(model, "adv"):`
    """Route every dual-BN layer in ``module`` through ``branch`` inside a ``with`` block.

    The previous active branch of each layer is restored on exit (also on an exception), so
    blocks nest. ``branch=None`` changes nothing (an enclosing block, if any, still applies);
    it lets ``forward(x, branch=None)`` mean "use whatever is routed already". A module with no
    dual-BN layers (a single-BN "cl" model) is accepted and left alone, so generic code can
    route both kinds of model; the branch name is still checked.
    """

    def __init__(self, module: nn.Module, branch: str | None) -> None:
        self.module = module
        self.branch = None if branch is None else check_branch(branch)
        self._saved: list[tuple[DualBatchNorm, str | None]] = []

    def __enter__(self) -> nn.Module:
        if self.branch is not None:
            self._saved = [(m, m.active_branch) for m in dual_bn_modules(self.module)]
            for layer, _ in self._saved:
                layer.active_branch = self.branch
        return self.module

    def __exit__(self, *exc_info) -> None:
        for layer, previous in self._saved:
            layer.active_branch = previous
        self._saved = []


def convert_to_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d / nn.BatchNorm2d in ``module`` by its dual-BN counterpart.

    Both branches start from the original layer's parameters and running statistics, so the
    converted module computes exactly what it did before on either branch. The module is changed
    in place and returned; if ``module`` is itself a BN layer, the new dual-BN layer is returned.
    Convert before creating the optimiser: the BN parameters are new tensors. Other norm layers
    (BatchNorm3d, SyncBatchNorm, GroupNorm, ...) are left as they are. Route the result with
    ``bn_branch(module, branch)``.
    """
    converted = _dual_counterpart(module)
    if converted is not None:
        return converted
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            continue  # already dual: its two BN children must stay plain
        replacement = _dual_counterpart(child)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            convert_to_dual_bn(child)
    return module


def _dual_counterpart(module: nn.Module) -> DualBatchNorm | None:
    # SyncBatchNorm is not a BatchNorm2d subclass, so it falls through and stays as it is.
    if isinstance(module, nn.BatchNorm2d):
        return DualBatchNorm2d.from_batch_norm(module)
    if isinstance(module, nn.BatchNorm1d):
        return DualBatchNorm1d.from_batch_norm(module)
    return None


def encoder_from_branch(model: nn.Module, branch: str = "adv") -> nn.Module:
    """A single-BN copy of the encoder holding ``branch``'s BN parameters and running stats.

    ``model`` is one of our models (its ``.backbone`` is copied; the projection head is dropped,
    docs/acl-air.md section 8) or any other encoder module (copied whole). Every dual-BN layer in
    the copy becomes the plain BN layer of ``branch``, so in eval mode the copy's output equals
    the model's features on that branch exactly. ``model`` itself is not modified.

    A model without dual BN (the "cl" baseline) has only its "normal" branch; asking it for "adv"
    raises rather than silently returning the natural encoder.
    """
    check_branch(branch)
    model = unwrap(model)  # (DataParallel / DDP / torch.compile wrappers)
    encoder = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    if not has_dual_bn(encoder) and branch != "normal":
        raise ConfigError(
            f"branch={branch!r} was asked for, but {type(encoder).__name__} has no dual BN "
            "layers (a single-BN model, e.g. trained with method 'cl'): its only branch is "
            "'normal'"
        )
    encoder = copy.deepcopy(encoder)
    if isinstance(encoder, DualBatchNorm):
        return encoder.branch_module(branch)
    _select_branch(encoder, branch)
    return encoder


def _select_branch(module: nn.Module, branch: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            setattr(module, name, child.branch_module(branch))
        else:
            _select_branch(child, branch)
