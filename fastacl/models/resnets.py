"""The ResNet family (He et al., 2016) with dual BN: blocks, the backbone, ResNet-34 and ResNet-50.

- stem "cifar": 3x3 conv, stride 1, no bias + BN + ReLU, no max-pool (32x32 and 28x28 inputs);
  stem "stl": the ImageNet stem, 7x7 conv, stride 2 + BN + ReLU + 3x3/2 max-pool (96x96).
- 4 stages of blocks, planes w, 2w, 4w, 8w (w = 64), strides 1/2/2/2; a shortcut is 1x1 conv + BN
  where the shape changes, the identity elsewhere; global average pool.
- BasicBlock (two 3x3 convs; ResNet-18: 2-2-2-2, ResNet-34: 3-4-6-3, 8w-d features) or
  Bottleneck (1x1, 3x3 with the stride, 1x1 to 4x the planes, as torchvision and the authors'
  resnet_multi_bn.py; ResNet-50: 3-4-6-3, 32w = 2048-d features).
- Kaiming-normal (fan_out, relu) conv init, BN gamma = 1 and beta = 0.

The paper's ResNet-18 (``ResNet18Backbone``, ``ContrastiveResNet18``, fastacl.models.resnet) is
this backbone with BasicBlocks 2-2-2-2; its parameter names, init order and numerics are those
of the published models.

The projection heads of ResNet-34 / 50 default to feature_dim -> feature_dim (512 and 2048),
as the authors' ``proj_head(ch)`` (AIR / RCS models/resnet_multi_bn.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.errors import ConfigError
from fastacl.models.contrastive import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ContrastiveModel,
    Normalize,
    ProjectionHead,
    check_images,
    norm_layers,
    resolve_normalization,
)
from fastacl.models.dual_bn import bn_branch
from fastacl.utils import check_choice

__all__ = [
    "STEMS",
    "BasicBlock",
    "Bottleneck",
    "ResNetBackbone",
    "Shortcut",
    "resnet34_acl",
    "resnet50_acl",
]

STEMS = ("cifar", "stl")


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

    expansion = 1

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


class Bottleneck(nn.Module):
    """1x1 (planes), 3x3 (planes, the stride), 1x1 (4 planes), BN after each, ReLU between and
    after the residual sum (He et al., 2016; the stride on the 3x3 as torchvision's v1.5)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm2d: type[nn.Module]) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = norm2d(out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = Shortcut(in_planes, out_planes, stride, norm2d)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetBackbone(nn.Module):
    """The encoder f: images in [0, 1] -> ``feature_dim`` features (8 w x block.expansion).

    ``block``: BasicBlock or Bottleneck; ``blocks``: blocks per stage (4 stages), e.g. (2, 2, 2,
    2) for ResNet-18. ``forward(x, branch=None)``: ``branch`` ("normal" / "adv") routes every
    dual-BN layer for this call; None uses the branch routed by an enclosing ``bn_branch``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        stem: str = "cifar",
        in_channels: int = 3,
        width: int = 64,
        dual_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        if len(blocks) != 4 or any(n < 1 for n in blocks):
            raise ConfigError(f"blocks must give 4 stages of >= 1 block, got {tuple(blocks)}")
        if len(mean) != in_channels:
            raise ConfigError(
                f"mean/std need {in_channels} values (in_channels), got mean={tuple(mean)}"
            )
        norm2d, _ = norm_layers(dual_bn)
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm2d(width)

        stage_planes = (width, 2 * width, 4 * width, 8 * width)
        stage_strides = (1, 2, 2, 2)
        in_planes = width
        stages = zip(stage_planes, stage_strides, blocks, strict=True)
        for index, (planes, stride, count) in enumerate(stages, start=1):
            layers = []
            for position in range(count):
                layers.append(block(in_planes, planes, stride if position == 0 else 1, norm2d))
                in_planes = planes * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.feature_dim = in_planes

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        check_images(x, self.in_channels)
        with bn_branch(self, branch):
            out = F.relu(self.bn1(self.conv1(self.normalize(x))), inplace=True)
            out = self.maxpool(out)
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _resnet(name: str, block: type[nn.Module], blocks: Sequence[int], stem: str,
            in_channels: int, width: int, head_dim: int | None, dual_bn: bool,
            mean: Sequence[float] | None, std: Sequence[float] | None) -> ContrastiveModel:
    if width < 1 or (head_dim is not None and head_dim < 1):
        raise ConfigError(f"width and head_dim must be positive, got {width} and {head_dim}")
    mean, std = resolve_normalization(in_channels, mean, std)
    backbone = ResNetBackbone(block, blocks, stem, in_channels, width, dual_bn, mean, std)
    head_dim = backbone.feature_dim if head_dim is None else head_dim
    head = ProjectionHead(backbone.feature_dim, head_dim, dual_bn)
    spec: dict[str, Any] = {"name": name, "kwargs": {
        "stem": stem, "in_channels": in_channels, "width": width, "head_dim": head_dim,
        "dual_bn": dual_bn, "mean": mean, "std": std}}
    return ContrastiveModel(backbone, head, spec)


def resnet34_acl(stem: str = "cifar", in_channels: int = 3, width: int = 64,
                 head_dim: int | None = None, dual_bn: bool = True,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> ContrastiveModel:
    """ResNet-34 (BasicBlocks 3-4-6-3, 8 x width = 512-d features) + projection head.

    Args as fastacl.models.resnet18_acl; ``head_dim`` None: the feature size (512 at width 64).
    """
    return _resnet("resnet34", BasicBlock, (3, 4, 6, 3), stem, in_channels, width, head_dim,
                   dual_bn, mean, std)


def resnet50_acl(stem: str = "cifar", in_channels: int = 3, width: int = 64,
                 head_dim: int | None = None, dual_bn: bool = True,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> ContrastiveModel:
    """ResNet-50 (Bottlenecks 3-4-6-3, 32 x width = 2048-d features) + projection head.

    Args as fastacl.models.resnet18_acl; ``head_dim`` None: the feature size (2048 at width 64,
    the authors' head).
    """
    return _resnet("resnet50", Bottleneck, (3, 4, 6, 3), stem, in_channels, width, head_dim,
                   dual_bn, mean, std)
