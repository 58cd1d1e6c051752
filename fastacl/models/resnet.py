"""ResNet-18 backbone f and projection head g for (adversarial) contrastive learning.

Architecture (docs/acl-air.md section 2):
- stem "cifar": 3x3 conv, stride 1, no bias + BN + ReLU, no max-pool (32x32 inputs, also the
  28x28 MNIST demo); stem "stl": 7x7 conv, stride 2 + BN + ReLU + 3x3/2 max-pool (96x96 STL-10).
- 4 stages x 2 BasicBlocks, widths w, 2w, 4w, 8w (w = 64 in the paper), strides 1/2/2/2; a
  shortcut is 1x1 conv + BN where the shape changes, the identity elsewhere. Global average pool
  gives the 8w-d features h = f(x) (512-d in the paper).
- Projection head g: Linear(bias) + BN + ReLU, Linear(no bias) + BN + ReLU, Linear(no bias) + BN,
  no final ReLU; 512 -> 512 -> 512 -> 512 in the paper (8w -> head_dim -> head_dim -> head_dim).
- Kaiming-normal (fan_out, relu) conv init, BN gamma = 1 and beta = 0; linear layers keep
  PyTorch's default init, as in the authors' code.
- Every BN is dual ("normal" / "adv", see dual_bn.py) unless dual_bn=False (the "cl" baseline).
- Inputs are images in [0, 1]; the model normalises them itself (``backbone.normalize``) so that
  attacks and eps live in pixel space.

Normalisation constants: ImageNet mean/std for 3 channels (as the ACL / DynACL / AIR code);
MNIST's mean/std (0.1307, 0.3081) for 1 channel, since the single-channel input we ship is the
embedded MNIST sample; any other channel count must pass ``mean`` and ``std``.

Registry: ``build_model("resnet18")`` is the paper model; ``build_model("resnet18-small")`` is the
demo model (width 16, head 128: about 1/16 of the paper model's conv FLOPs and parameters). Every
model carries ``model.spec`` = {"name", "kwargs"}; ``build_model(spec["name"], **spec["kwargs"])``
rebuilds it (checkpoints store the spec).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.errors import ConfigError
from fastacl.models.dual_bn import DualBatchNorm1d, DualBatchNorm2d, bn_branch
from fastacl.utils import check_choice

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "MODEL_PRESETS",
    "STEMS",
    "BasicBlock",
    "ContrastiveResNet18",
    "Normalize",
    "ProjectionHead",
    "ResNet18Backbone",
    "Shortcut",
    "build_model",
    "resnet18_acl",
]

STEMS = ("cifar", "stl")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# Name -> the keyword arguments of resnet18_acl that define it; explicit arguments override.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "resnet18": {"width": 64, "head_dim": 512},  # the paper's model (docs/acl-air.md section 2)
    # The demo preset (28x28 MNIST on a 2-core CPU): 16/32/64/128 channels, 128-d head.
    "resnet18-small": {"width": 16, "head_dim": 128},
}


def _norm_layers(dual_bn: bool) -> tuple[type[nn.Module], type[nn.Module]]:
    if dual_bn:
        return DualBatchNorm2d, DualBatchNorm1d
    return nn.BatchNorm2d, nn.BatchNorm1d


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


class Shortcut(nn.Module):
    """1x1 conv + BN on the residual path of a block that changes the shape."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm2d: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn = norm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, ReLU between and after the residual sum (He et al., 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm2d: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = Shortcut(in_planes, planes, stride, norm2d)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs as torchvision: BN's backward needs its input, not its output.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18Backbone(nn.Module):
    """The encoder f: images in [0, 1] -> ``feature_dim`` features (512 in the paper).

    ``forward(x, branch=None)``: ``branch`` ("normal" / "adv") routes every dual-BN layer for this
    call; None uses the branch routed by an enclosing ``bn_branch`` block.
    """

    def __init__(
        self,
        stem: str = "cifar",
        in_channels: int = 3,
        width: int = 64,
        dual_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        if len(mean) != in_channels:
            raise ConfigError(
                f"mean/std need {in_channels} values (in_channels), got mean={tuple(mean)}"
            )
        norm2d, _ = _norm_layers(dual_bn)
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm2d(width)

        stage_widths = (width, 2 * width, 4 * width, 8 * width)
        stage_strides = (1, 2, 2, 2)
        in_planes = width
        stages = zip(stage_widths, stage_strides, strict=True)
        for index, (planes, stride) in enumerate(stages, start=1):
            stage = nn.Sequential(
                BasicBlock(in_planes, planes, stride, norm2d),
                BasicBlock(planes, planes, 1, norm2d),
            )
            self.add_module(f"layer{index}", stage)
            in_planes = planes
        self.feature_dim = in_planes

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape [N, {self.in_channels}, H, W] with pixels in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        with bn_branch(self, branch):
            out = F.relu(self.bn1(self.conv1(self.normalize(x))), inplace=True)
            out = self.maxpool(out)
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class ProjectionHead(nn.Module):
    """The projection head g: 3 linear layers, BN after each, ReLU after the first two."""

    def __init__(self, in_dim: int = 512, head_dim: int = 512, dual_bn: bool = True) -> None:
        super().__init__()
        _, norm1d = _norm_layers(dual_bn)
        self.fc1 = nn.Linear(in_dim, head_dim, bias=True)
        self.bn1 = norm1d(head_dim)
        # fc2 / fc3 without bias as in the authors' head (the BN after them makes a bias
        # redundant); fc1 keeps its bias, also as theirs, so published weights load.
        self.fc2 = nn.Linear(head_dim, head_dim, bias=False)
        self.bn2 = norm1d(head_dim)
        self.fc3 = nn.Linear(head_dim, head_dim, bias=False)
        self.bn3 = norm1d(head_dim)
        self.out_dim = head_dim

    def forward(self, h: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        with bn_branch(self, branch):
            z = F.relu(self.bn1(self.fc1(h)), inplace=True)
            z = F.relu(self.bn2(self.fc2(z)), inplace=True)
            return self.bn3(self.fc3(z))


class ContrastiveResNet18(nn.Module):
    """ResNet-18 backbone f plus projection head g; ``forward`` returns z = g(f(x)).

    Attributes: ``backbone`` (f), ``head`` (g), ``feature_dim`` (size of h), ``out_dim`` (size of
    z), ``dual_bn``, ``spec`` (enough to rebuild the model: {"name": ..., "kwargs": {...}}).

    ``forward(x, branch=None, return_features=False)``: ``x`` images in [0, 1]; ``branch``
    "normal" | "adv" routes every dual-BN layer for this call (None: use what an enclosing
    ``bn_branch`` block routed; a dual-BN model with nothing routed raises). With
    ``return_features=True`` the features h = f(x) are returned instead of z (the head is not
    run). For both h and z from one pass, call ``backbone`` then ``head``. A single-BN model
    (``dual_bn=False``) checks the branch name and otherwise ignores it.
    """

    def __init__(
        self,
        stem: str = "cifar",
        in_channels: int = 3,
        width: int = 64,
        head_dim: int = 512,
        dual_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = ResNet18Backbone(stem, in_channels, width, dual_bn, mean, std)
        self.head = ProjectionHead(self.backbone.feature_dim, head_dim, dual_bn)
        self.feature_dim = self.backbone.feature_dim
        self.out_dim = head_dim
        self.dual_bn = dual_bn
        self.spec: dict[str, Any] = {
            "name": "resnet18",
            "kwargs": {
                "stem": stem, "in_channels": in_channels, "width": width, "head_dim": head_dim,
                "dual_bn": dual_bn, "mean": [float(m) for m in mean],
                "std": [float(s) for s in std],
            },
        }

    def forward(
        self, x: torch.Tensor, branch: str | None = None, return_features: bool = False
    ) -> torch.Tensor:
        with bn_branch(self, branch):
            features = self.backbone(x)
            if return_features:
                return features
            return self.head(features)


def _default_normalization(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return MNIST_MEAN, MNIST_STD
    raise ConfigError(
        f"no default normalisation for in_channels={in_channels} (defaults exist for 3: "
        "ImageNet, and 1: MNIST); pass mean=[...] and std=[...] with one value per channel"
    )


def resnet18_acl(
    stem: str = "cifar",
    in_channels: int = 3,
    width: int = 64,
    head_dim: int = 512,
    dual_bn: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ContrastiveResNet18:
    """ResNet-18 + 3-layer projection head for ACL / DynACL / AIR (docs/acl-air.md section 2).

    Args:
        stem: "cifar" (3x3 stride-1 conv, no max-pool; 32x32 or 28x28 inputs) or "stl" (7x7
            stride-2 conv + max-pool; 96x96 inputs).
        in_channels: image channels (3 for CIFAR / STL, 1 for MNIST).
        width: channels of the first stage; stages have width x (1, 2, 4, 8) and the features
            8 x width dimensions (64 -> 512-d, the paper).
        head_dim: width and output size of the projection head (512 in the paper).
        dual_bn: dual "normal" / "adv" BN everywhere (ACL family) or plain BN ("cl").
        mean, std: per-channel input normalisation; None picks ImageNet's for 3 channels and
            MNIST's (0.1307, 0.3081) for 1 channel.
    """
    if width < 1 or head_dim < 1:
        raise ConfigError(f"width and head_dim must be positive, got {width} and {head_dim}")
    if (mean is None) != (std is None):
        raise ConfigError(f"pass both mean and std or neither, got mean={mean}, std={std}")
    if mean is None:
        mean, std = _default_normalization(in_channels)
    return ContrastiveResNet18(stem, in_channels, width, head_dim, dual_bn, mean, std)


def build_model(name: str = "resnet18", **kwargs: Any) -> ContrastiveResNet18:
    """Build a registered model: ``name`` in MODEL_PRESETS, ``kwargs`` as for resnet18_acl.

    Explicit ``kwargs`` override the preset (e.g. ``build_model("resnet18", stem="stl")``,
    ``build_model("resnet18-small", in_channels=1, dual_bn=False)``). ``model.spec["name"]`` is
    ``name``, and ``model.spec["kwargs"]`` holds every argument, resolved.
    """
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; registered models: {sorted(MODEL_PRESETS)}")
    model = resnet18_acl(**{**MODEL_PRESETS[name], **kwargs})
    model.spec["name"] = name
    return model
