"""What every fastacl model shares: input normalisation, the projection head g, the model class.

A model is ``ContrastiveModel(backbone, head)``: the encoder f (images in [0, 1] -> features h)
and the projection head g (h -> z), with ``forward(x, branch=None, return_features=False)``
routing every dual normalisation layer through ``branch`` ("normal" | "adv"). The registered
backbones (ResNet-18/34/50, WideResNet, ViT: fastacl.models.registry) and a user's own encoder
(``contrastive_model``) all come out as one of these, so the attacks, the trainer, RCS and the
evaluation treat them alike.

- Normalisation lives inside the model (``Normalize``): attacks and eps are in pixel space.
  Defaults: ImageNet mean/std for 3 channels (as the ACL / DynACL / AIR code), MNIST's
  (0.1307, 0.3081) for 1 channel (the embedded demo sample); other channel counts pass their own.
- Projection head g (docs/acl-air.md section 2): Linear(bias) + BN + ReLU, Linear(no bias) + BN
  + ReLU, Linear(no bias) + BN, no final ReLU; feature_dim -> head_dim -> head_dim -> head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.errors import ConfigError
from fastacl.models.dual_bn import (
    DualBatchNorm1d,
    DualBatchNorm2d,
    bn_branch,
    convert_to_dual_bn,
    has_dual_bn,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ContrastiveModel",
    "Normalize",
    "ProjectionHead",
    "check_images",
    "contrastive_model",
    "resolve_normalization",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def norm_layers(dual_bn: bool) -> tuple[type[nn.Module], type[nn.Module]]:
    """(2-d BN, 1-d BN) classes: dual for the ACL family, plain for the "cl" baseline."""
    if dual_bn:
        return DualBatchNorm2d, DualBatchNorm1d
    return nn.BatchNorm2d, nn.BatchNorm1d


def _default_normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return MNIST_MEAN, MNIST_STD
    raise ConfigError(
        f"no default normalisation for in_channels={in_channels} (defaults exist for 3: "
        "ImageNet, and 1: MNIST); pass mean=[...] and std=[...] with one value per channel"
    )


def resolve_normalization(in_channels: int, mean: Sequence[float] | None,
                          std: Sequence[float] | None) -> tuple[list[float], list[float]]:
    """(mean, std) as float lists: the given ones (checked; one value is used for every channel),
    else the default for the channels."""
    if (mean is None) != (std is None):
        raise ConfigError(f"pass both mean and std or neither, got mean={mean}, std={std}")
    if mean is None:
        mean, std = _default_normalization(in_channels)
    if len(mean) == 1 and len(std) == 1:
        mean, std = list(mean) * in_channels, list(std) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(
            f"mean/std need {in_channels} values (in_channels), got mean={tuple(mean)}, "
            f"std={tuple(std)}"
        )
    return [float(m) for m in mean], [float(s) for s in std]


def check_images(x: torch.Tensor, in_channels: int) -> None:
    """ValueError naming the shape unless ``x`` is [N, in_channels, H, W]."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"expected images of shape [N, {in_channels}, H, W] with pixels in [0, 1], "
            f"got shape {tuple(x.shape)}"
        )


class Normalize(nn.Module):
    """(x - mean) / std per channel; ``mean`` and ``std`` are saved buffers of shape [C]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean and std need one value per channel, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


class ProjectionHead(nn.Module):
    """The projection head g: ``layers`` linear layers, BN after each, ReLU between them.

    Three layers is the head of the ACL / DynACL / AIR code and of every fastacl model; two
    (fc1-BN-ReLU-fc2-BN) is the head of the RCS authors' ImageNet-32 WRN-28-10
    (fastacl/models/published.py), kept so that their checkpoints load.
    """

    def __init__(self, in_dim: int = 512, head_dim: int = 512, dual_bn: bool = True,
                 layers: int = 3) -> None:
        super().__init__()
        if layers not in (2, 3):
            raise ConfigError(f"the projection head has 2 or 3 linear layers, got {layers!r}")
        _, norm1d = norm_layers(dual_bn)
        self.fc1 = nn.Linear(in_dim, head_dim, bias=True)
        self.bn1 = norm1d(head_dim)
        # fc2 / fc3 without bias as in the authors' head (the BN after them makes a bias
        # redundant); fc1 keeps its bias, also as theirs, so published weights load.
        self.fc2 = nn.Linear(head_dim, head_dim, bias=False)
        self.bn2 = norm1d(head_dim)
        if layers == 3:
            self.fc3 = nn.Linear(head_dim, head_dim, bias=False)
            self.bn3 = norm1d(head_dim)
        self.layers = layers
        self.out_dim = head_dim

    def forward(self, h: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        with bn_branch(self, branch):
            z = F.relu(self.bn1(self.fc1(h)), inplace=True)
            z = self.bn2(self.fc2(z))
            if self.layers == 2:
                return z
            return self.bn3(self.fc3(F.relu(z, inplace=True)))


class ContrastiveModel(nn.Module):
    """Backbone f plus projection head g; ``forward`` returns z = g(f(x)).

    Attributes: ``backbone`` (f, with a ``feature_dim`` attribute), ``head`` (g), ``feature_dim``
    (size of h), ``out_dim`` (size of z), ``dual_bn`` (whether any layer has an "adv" branch),
    ``spec`` ({"name": ..., "kwargs": {...}} rebuilds a registered model with
    ``build_model(spec["name"], **spec["kwargs"])``; None for a user's module).

    ``forward(x, branch=None, return_features=False)``: ``x`` images in [0, 1]; ``branch``
    "normal" | "adv" routes every dual normalisation layer for this call (None: use what an
    enclosing ``bn_branch`` block routed; a dual model with nothing routed raises). With
    ``return_features=True`` the features h = f(x) are returned instead of z (the head is not
    run). For both h and z from one pass, call ``backbone`` then ``head``. A single-BN model
    (``dual_bn=False``) checks the branch name and otherwise ignores it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module,
                 spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim: int = backbone.feature_dim
        self.out_dim: int = head.out_dim
        self.dual_bn = has_dual_bn(self)
        self.spec = spec

    def forward(
        self, x: torch.Tensor, branch: str | None = None, return_features: bool = False
    ) -> torch.Tensor:
        with bn_branch(self, branch):
            features = self.backbone(x)
            if return_features:
                return features
            return self.head(features)


def contrastive_model(encoder: nn.Module, *, feature_dim: int | None = None,
                      head_dim: int = 512, dual_bn: bool = True) -> ContrastiveModel:
    """A user's encoder as a fastacl model: its norms made dual, the projection head added.

    Args:
        encoder: an nn.Module mapping images in [0, 1] (it normalises them itself, if it
            should) to features [N, feature_dim]. Its forward takes the images only; fastacl
            routes the branch with ``bn_branch``. Changed in place: its norm layers are
            replaced, and ``encoder.feature_dim`` is set (the evaluation reads it).
        feature_dim: size of the features; None runs the encoder once (eval mode, no gradient,
            training flags restored) on 2 random images of [2, C, 32, 32], C = the first Conv2d's
            in_channels (3 without one). Pass it when the encoder wants another input size.
        head_dim: width and output size of the projection head (512 in the paper).
        dual_bn: make every BatchNorm / LayerNorm / GroupNorm / RMSNorm dual with
            ``convert_to_dual_bn`` (which raises, naming the layer, for a norm it cannot
            convert) and give the head dual BN (ACL family); False keeps the encoder's norms
            and gives the head plain BN (the "cl" baseline).

    Returns:
        A ContrastiveModel with ``spec = None``: a checkpoint of it records that it came from a
        user module (rebuild it with this function, then load the state dict). Call it as the
        built models: ``model(x, branch="adv")``, ``model(x, branch="normal",
        return_features=True)``. Convert before creating the optimiser.
    """
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if head_dim < 1:
        raise ConfigError(f"head_dim must be positive, got {head_dim}")
    declared = getattr(encoder, "feature_dim", None)
    if feature_dim is None:
        feature_dim = declared if isinstance(declared, int) else _infer_feature_dim(encoder)
    if not isinstance(feature_dim, int) or feature_dim < 1:
        raise ConfigError(f"feature_dim must be a positive integer, got {feature_dim!r}")
    if declared is not None and declared != feature_dim:
        raise ConfigError(f"feature_dim={feature_dim} was passed, but the encoder's feature_dim "
                          f"attribute says {declared}")
    if dual_bn:
        encoder = convert_to_dual_bn(encoder)
    encoder.feature_dim = feature_dim
    head = ProjectionHead(feature_dim, head_dim, dual_bn)
    reference = next(iter(encoder.parameters()), None)
    if reference is not None:
        head = head.to(device=reference.device, dtype=reference.dtype)
    return ContrastiveModel(encoder, head, spec=None)


@torch.no_grad()
def _infer_feature_dim(encoder: nn.Module) -> int:
    first_conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    reference = next(iter(encoder.parameters()), None)
    x = torch.rand(2, channels, 32, 32, device=reference.device if reference is not None
                   else None, dtype=reference.dtype if reference is not None else None)
    # Eval mode: the dummy pass must not move any BN's running statistics.
    flags = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        with bn_branch(encoder, "normal"):  # an encoder that is already dual needs a branch
            features = encoder(x)
    except Exception as error:
        raise ConfigError(
            f"could not infer feature_dim: {type(encoder).__name__} failed on a dummy input of "
            f"shape {tuple(x.shape)} ({type(error).__name__}: {error}); pass feature_dim="
        ) from error
    finally:
        for module, training in flags:
            module.training = training
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ConfigError(
            f"the encoder must return features of shape [N, feature_dim], got {shape} for a "
            f"dummy input of shape {tuple(x.shape)} (flatten or pool them inside the encoder)"
        )
    return int(features.shape[1])
