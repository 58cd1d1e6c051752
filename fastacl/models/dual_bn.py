"""Dual batch normalisation: one BN per input distribution ("normal" and "adv").

ACL (Jiang et al., 2020) keeps two sets of BN statistics and affine parameters in every BN layer
of the backbone, the shortcuts and the projection head: natural views and original images go
through the "normal" branch, adversarial views (and the attack that makes them) through the
"adv" branch; all conv and linear weights are shared (docs/acl-air.md section 2).

Other backbones normalise with LayerNorm, GroupNorm or RMSNorm (a ViT, a ConvNeXt). These keep
no running statistics, so their dual layer is a pair of copies that own separate affine
parameters per branch. ``convert_to_dual_bn`` converts every kind, and refuses, naming the
layer, a normalisation layer it does not know rather than leave it shared without a word.

Routing. A dual-BN layer (any ``DualNorm``) does not take the branch as a forward argument
(nn.Sequential and user modules would have to pass it through every call). Instead each layer
has an ``active_branch`` attribute, and ``bn_branch(module, branch)`` sets it on every dual
layer inside ``module`` for the duration of a ``with`` block and restores the previous value
afterwards, even on an exception. Our models' ``forward(x, branch=...)`` is exactly that context
around the plain forward, so a user module converted with ``convert_to_dual_bn`` routes the
same way:

    model = convert_to_dual_bn(my_encoder)
    with bn_branch(model, "adv"):
        z_adv = model(x_adv)

A dual-BN layer used with no active branch raises: a silent default would let an attack or a
training view run through the wrong statistics without anyone noticing. Routing is per process
and not thread-safe (two threads sharing one model must not route it differently at once).
"""

from __future__ import annotations

import copy
import re
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
    "DualBatchNorm3d",
    "DualGroupNorm",
    "DualLayerNorm",
    "DualNorm",
    "DualRMSNorm",
    "DualSyncBatchNorm",
    "bn_branch",
    "check_branch",
    "convert_to_dual_bn",
    "dual_bn_modules",
    "dual_norm_modules",
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


class DualNorm(nn.Module):
    """Two independent copies of one normalisation layer, ``normal`` and ``adv``; the
    ``active_branch`` attribute picks one per forward (set it with ``bn_branch``).

    The state dict holds ``normal.*`` and ``adv.*``, nothing else. Subclasses fix the kind of
    layer and mirror its torch constructor; ``from_norm(layer)`` makes both branches exact,
    independent copies of an existing layer.
    """

    def __init__(self) -> None:
        super().__init__()
        # Not a buffer: routing state, never saved in a checkpoint.
        self.active_branch: str | None = None

    @classmethod
    def from_norm(cls, layer: nn.Module) -> DualNorm:
        """Both branches start as exact copies of ``layer`` (parameters, buffers, settings)."""
        dual = cls.__new__(cls)
        DualNorm.__init__(dual)
        # Deep copies keep everything: eps, momentum, affine, device, dtype, a norm subclass.
        dual.normal = _copy_layer(layer)
        dual.adv = _copy_layer(layer)
        dual.train(layer.training)
        return dual

    def branch_module(self, branch: str) -> nn.Module:
        """The plain normalisation layer of ``branch`` ("normal" or "adv")."""
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
        return f"active_branch={self.active_branch!r}"


def _copy_layer(layer: nn.Module) -> nn.Module:
    # A process group is a handle on the job's communicator, not state: both branches of a
    # SyncBatchNorm must synchronise over the same group, so it is shared, not deep-copied.
    memo = {}
    for module in layer.modules():
        group = getattr(module, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    return copy.deepcopy(layer, memo)


class DualBatchNorm(DualNorm):
    """Two independent BN layers: separate running statistics and affine parameters per branch.

    Subclasses set ``batch_norm_class``. The constructor mirrors the torch BN it replaces. The
    state dict holds ``normal.*`` and ``adv.*`` (weight, bias, running_mean, running_var,
    num_batches_tracked), nothing else. ``DualBatchNorm.from_batch_norm`` itself also wraps a BN
    of any other ``_BatchNorm`` subclass (e.g. fastacl.distributed.CPUSyncBatchNorm).
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
        **extra,
    ) -> None:
        if not hasattr(type(self), "batch_norm_class"):
            raise TypeError(
                f"{type(self).__name__} names no BN class: construct DualBatchNorm1d / 2d / 3d "
                "or DualSyncBatchNorm, or wrap an existing layer with from_batch_norm(layer)"
            )
        super().__init__()
        arguments = dict(
            eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            device=device, dtype=dtype, **extra,
        )
        self.normal = self.batch_norm_class(num_features, **arguments)
        self.adv = self.batch_norm_class(num_features, **arguments)

    @classmethod
    def from_batch_norm(cls, batch_norm: nn.modules.batchnorm._BatchNorm) -> DualBatchNorm:
        """Both branches start as exact copies of ``batch_norm`` (parameters, running stats)."""
        return cls.from_norm(batch_norm)

    @property
    def num_features(self) -> int:
        return self.normal.num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, active_branch={self.active_branch!r}"


class DualBatchNorm1d(DualBatchNorm):
    """Dual BN over nn.BatchNorm1d (projection head: [N, C] or [N, C, L])."""

    batch_norm_class = nn.BatchNorm1d


class DualBatchNorm2d(DualBatchNorm):
    """Dual BN over nn.BatchNorm2d (backbone and shortcuts: [N, C, H, W])."""

    batch_norm_class = nn.BatchNorm2d


class DualBatchNorm3d(DualBatchNorm):
    """Dual BN over nn.BatchNorm3d ([N, C, D, H, W])."""

    batch_norm_class = nn.BatchNorm3d


class DualSyncBatchNorm(DualBatchNorm):
    """Dual BN over nn.SyncBatchNorm: each branch synchronises its own statistics over the
    ranks, both over the same process group."""

    batch_norm_class = nn.SyncBatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         process_group=process_group)


class DualLayerNorm(DualNorm):
    """Dual LayerNorm: no running statistics, so the branches differ only by their own
    elementwise affine parameters (weight, bias). The constructor mirrors nn.LayerNorm."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        arguments = dict(eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.normal = nn.LayerNorm(normalized_shape, **arguments)
        self.adv = nn.LayerNorm(normalized_shape, **arguments)

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return self.normal.normalized_shape

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, active_branch={self.active_branch!r}"


class DualGroupNorm(DualNorm):
    """Dual GroupNorm: no running statistics, so the branches differ only by their own
    per-channel affine parameters (weight, bias). The constructor mirrors nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        arguments = dict(eps=eps, affine=affine, device=device, dtype=dtype)
        self.normal = nn.GroupNorm(num_groups, num_channels, **arguments)
        self.adv = nn.GroupNorm(num_groups, num_channels, **arguments)

    @property
    def num_groups(self) -> int:
        return self.normal.num_groups

    @property
    def num_channels(self) -> int:
        return self.normal.num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, active_branch={self.active_branch!r}"


class DualRMSNorm(DualNorm):
    """Dual RMSNorm: no running statistics, so the branches differ only by their own
    elementwise weight. The constructor mirrors nn.RMSNorm."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        arguments = dict(eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)
        self.normal = nn.RMSNorm(normalized_shape, **arguments)
        self.adv = nn.RMSNorm(normalized_shape, **arguments)

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        return self.normal.normalized_shape

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, active_branch={self.active_branch!r}"


def dual_bn_modules(module: nn.Module) -> list[DualBatchNorm]:
    """Every dual-BN layer inside ``module`` (including ``module`` itself); BN only."""
    return [m for m in module.modules() if isinstance(m, DualBatchNorm)]


def dual_norm_modules(module: nn.Module) -> list[DualNorm]:
    """Every dual normalisation layer inside ``module`` (BN, LayerNorm, GroupNorm, RMSNorm)."""
    return [m for m in module.modules() if isinstance(m, DualNorm)]


def has_dual_bn(module: nn.Module) -> bool:
    """Whether ``module`` has an "adv" branch: at least one dual normalisation layer (dual BN,
    or the dual LayerNorm / GroupNorm / RMSNorm of a converted transformer)."""
    return any(isinstance(m, DualNorm) for m in module.modules())


class bn_branch:  # lower case: it reads as a function, `with bn_branch(model, "adv"):`
    """Route every dual normalisation layer in ``module`` through ``branch`` in a ``with`` block.

    The previous active branch of each layer is restored on exit (also on an exception), so
    blocks nest. ``branch=None`` changes nothing (an enclosing block, if any, still applies);
    it lets ``forward(x, branch=None)`` mean "use whatever is routed already". A module with no
    dual-BN layers (a single-BN "cl" model) is accepted and left alone, so generic code can
    route both kinds of model; the branch name is still checked.
    """

    def __init__(self, module: nn.Module, branch: str | None) -> None:
        self.module = module
        self.branch = None if branch is None else check_branch(branch)
        self._saved: list[tuple[DualNorm, str | None]] = []

    def __enter__(self) -> nn.Module:
        if self.branch is not None:
            self._saved = [(m, m.active_branch) for m in dual_norm_modules(self.module)]
            for layer, _ in self._saved:
                layer.active_branch = self.branch
        return self.module

    def __exit__(self, *exc_info) -> None:
        for layer, previous in self._saved:
            layer.active_branch = previous
        self._saved = []


def convert_to_dual_bn(
    module: nn.Module, keep_shared: tuple[type[nn.Module], ...] = ()
) -> nn.Module:
    """Replace every normalisation layer in ``module`` by its dual counterpart.

    BatchNorm1d / 2d / 3d become DualBatchNorm1d / 2d / 3d, SyncBatchNorm a DualSyncBatchNorm
    (each branch still synchronises, over the same process group), any other ``_BatchNorm``
    subclass a DualBatchNorm; LayerNorm, GroupNorm and RMSNorm with affine parameters become
    DualLayerNorm / DualGroupNorm / DualRMSNorm (subclasses of all these are copied as they
    are). Both branches start from the original layer's parameters and running statistics, so
    the converted module computes exactly what it did before on either branch. A norm layer
    with no parameters or buffers (LayerNorm without affine, InstanceNorm's default,
    LocalResponseNorm) has nothing a branch could own and stays as it is.

    Any other layer that looks like a norm (a ``_NormBase``, e.g. InstanceNorm with affine or
    running stats, or a class whose name ends in "Norm", e.g. a hand-written RMSNorm) and holds
    parameters or buffers is an error naming each such layer, raised before anything changes:
    left single it would silently be shared by both branches. Pass its type in ``keep_shared``
    to keep it shared on purpose (``keep_shared`` layers are left alone, converted or not).

    The module is changed in place and returned; if ``module`` is itself a norm layer, the new
    dual layer is returned. Layers already dual are left alone. Convert before creating the
    optimiser: the norm parameters are new tensors. Route the result with
    ``bn_branch(module, branch)``.
    """
    keep_shared = tuple(keep_shared)
    refused = list(_unconvertible_norms(module, "", keep_shared))
    if refused:
        layers = "; ".join(
            f"{name!r} ({type(layer).__name__}: {why})" if name
            else f"the module itself ({type(layer).__name__}: {why})"
            for name, layer, why in refused
        )
        raise ConfigError(
            f"convert_to_dual_bn cannot make {len(refused)} normalisation layer(s) dual: "
            f"{layers}. It converts BatchNorm (1d/2d/3d, SyncBatchNorm, any _BatchNorm), "
            "LayerNorm, GroupNorm and RMSNorm, subclasses included; left single, a layer would "
            "be shared by the 'normal' and 'adv' branches. Replace it with one of those, or "
            f"pass keep_shared=({type(refused[0][1]).__name__}, ...) to share it on purpose"
        )
    return _convert(module, keep_shared)


# A class name that says "norm" (RMSNorm, ScaleNorm, LayerNorm2d) but derives from no torch norm.
_NORM_CLASS_NAME = re.compile(r"Norm(\d[dD])?$")


def _convert(module: nn.Module, keep_shared: tuple[type[nn.Module], ...]) -> nn.Module:
    if isinstance(module, DualNorm) or isinstance(module, keep_shared):
        return module  # already dual: its two children must stay plain
    dual_class = _dual_class(module)
    if dual_class is not None:
        return dual_class.from_norm(module)
    for name, child in module.named_children():
        replacement = _convert(child, keep_shared)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def _dual_class(module: nn.Module) -> type[DualNorm] | None:
    """The dual counterpart of a norm layer, None for any other module."""
    # Most specific first: SyncBatchNorm and BatchNorm1d/2d/3d are siblings under _BatchNorm.
    for plain, dual in (
        (nn.SyncBatchNorm, DualSyncBatchNorm),
        (nn.BatchNorm3d, DualBatchNorm3d),
        (nn.BatchNorm2d, DualBatchNorm2d),
        (nn.BatchNorm1d, DualBatchNorm1d),
        (nn.modules.batchnorm._BatchNorm, DualBatchNorm),
    ):
        if isinstance(module, plain):
            return dual  # even without affine or running stats, as BN always was
    if not _own_state(module):
        return None  # nothing a branch could own: both branches compute the same
    for plain, dual in (
        (nn.LayerNorm, DualLayerNorm), (nn.GroupNorm, DualGroupNorm), (nn.RMSNorm, DualRMSNorm),
    ):
        if isinstance(module, plain):
            return dual
    return None


def _own_state(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers ``module`` holds itself (not its children's)."""
    return [name for name, _ in module.named_parameters(recurse=False)] + [
        name for name, _ in module.named_buffers(recurse=False)
    ]


def _unconvertible_norms(module: nn.Module, name: str, keep_shared: tuple[type[nn.Module], ...]):
    """(qualified name, layer, why) for each norm layer that ``_convert`` would leave single."""
    if isinstance(module, DualNorm) or isinstance(module, keep_shared):
        return
    if _dual_class(module) is not None:
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        ):
            yield name, module, "its lazy parameters are uninitialised, run one forward first"
        return
    looks_like_norm = isinstance(
        module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    ) or _NORM_CLASS_NAME.search(type(module).__name__)
    state = _own_state(module)
    if looks_like_norm and state:
        yield name, module, f"holds {', '.join(state)}, and fastacl has no dual counterpart"
        return
    for child_name, child in module.named_children():
        yield from _unconvertible_norms(
            child, f"{name}.{child_name}" if name else child_name, keep_shared
        )


def encoder_from_branch(model: nn.Module, branch: str = "adv") -> nn.Module:
    """A single-BN copy of the encoder holding ``branch``'s BN parameters and running stats.

    ``model`` is one of our models (its ``.backbone`` is copied; the projection head is dropped,
    docs/acl-air.md section 8) or any other encoder module (copied whole). Every dual layer (BN,
    LayerNorm, GroupNorm, RMSNorm) in the copy becomes the plain layer of ``branch``, so in eval
    mode the copy's output equals the model's features on that branch exactly. ``model`` itself
    is not modified.

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
    if isinstance(encoder, DualNorm):
        return encoder.branch_module(branch)
    _select_branch(encoder, branch)
    return encoder


def _select_branch(module: nn.Module, branch: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, DualNorm):
            setattr(module, name, child.branch_module(branch))
        else:
            _select_branch(child, branch)
