"""WideResNet (Zagoruyko & Komodakis, 2016) with dual BN: WRN-28-10 and WRN-34-10.

The layout of the robustness code (TRADES' and RCS' wideresnet.py; RCS pre-trains WRN-28-10 on
ImageNet-32 with ACL):
- stem "cifar": a 3x3 conv, stride 1, to 16 channels, no BN after it (pre-activation: each block
  normalises its input). Stem "stl" (fastacl's, for 96x96 inputs, as the ResNets' ImageNet stem):
  a 7x7 conv, stride 2, + 3x3/2 max-pool.
- 3 groups of n = (depth - 4) / 6 wide basic blocks, widths 16k, 32k, 64k (k = widen_factor),
  strides 1/2/2. A block is pre-activation: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut:
  the identity, or, where the shape changes, a 1x1 conv (no BN) of the block's activated input.
- A final BN + ReLU, global average pool: 64k-d features (640 for k = 10).
- Kaiming-normal (fan_out, relu) conv init (their normal(0, sqrt(2 / (k k out)))), BN 1 / 0.
No dropout (RCS and TRADES train with dropRate 0).

The projection head defaults to feature_dim -> feature_dim (640), as RCS' proj_head_module(ch),
with three linear layers as every fastacl model; ``head_layers=2`` gives theirs (fc1-BN-ReLU-
fc2-BN), which their published checkpoints hold.
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
from fastacl.models.resnets import STEMS
from fastacl.utils import check_choice

__all__ = ["WideBasicBlock", "WideResNetBackbone", "wide_resnet_acl"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm2d: type[nn.Module]) -> None:
        super().__init__()
        self.bn1 = norm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x), inplace=True)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        # Where the shape changes the shortcut sees the activated input, as in TRADES / RCS.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNetBackbone(nn.Module):
    """The encoder f: images in [0, 1] -> 64 x widen_factor features (640 for WRN-*-10).

    ``forward(x, branch=None)`` as fastacl.models.ResNet18Backbone's.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        stem: str = "cifar",
        in_channels: int = 3,
        dual_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, "
                              f"34, ...), got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"widen_factor must be a positive integer, got {widen_factor!r}")
        norm2d, _ = norm_layers(dual_bn)
        blocks_per_group = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = widths[0]
        for index, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), 1):
            blocks = []
            for position in range(blocks_per_group):
                blocks.append(WideBasicBlock(in_planes, planes, stride if position == 0 else 1,
                                             norm2d))
                in_planes = planes
            self.add_module(f"block{index}", nn.Sequential(*blocks))
        self.bn = norm2d(in_planes)  # the final BN + ReLU of the pre-activation network
        self.feature_dim = in_planes

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        check_images(x, self.in_channels)
        with bn_branch(self, branch):
            out = self.maxpool(self.conv1(self.normalize(x)))
            out = self.block3(self.block2(self.block1(out)))
            out = F.relu(self.bn(out), inplace=True)
            return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def wide_resnet_acl(depth: int = 28, widen_factor: int = 10, stem: str = "cifar",
                    in_channels: int = 3, head_dim: int | None = None, dual_bn: bool = True,
                    mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None,
                    head_layers: int = 3) -> ContrastiveModel:
    """WideResNet-depth-widen_factor + projection head (WRN-28-10: 36.5 M backbone parameters).

    Args:
        depth: 6 n + 4 (n blocks per group): 28 or 34 in the papers; 10 is the smallest.
        widen_factor: k, the groups have 16k, 32k, 64k channels (10 in the papers).
        stem: "cifar" (32x32 / 28x28) or "stl" (96x96: 7x7/2 conv + max-pool, fastacl's).
        in_channels, dual_bn, mean, std: as fastacl.models.resnet18_acl.
        head_dim: the projection head's width; None: the feature size (640 for k = 10).
        head_layers: 3 (fastacl's head) or 2 (the head of RCS' released ImageNet-32 code,
            which its published checkpoints hold; fastacl/models/published.py).
    """
    if head_dim is not None and head_dim < 1:
        raise ConfigError(f"head_dim must be positive, got {head_dim}")
    mean, std = resolve_normalization(in_channels, mean, std)
    backbone = WideResNetBackbone(depth, widen_factor, stem, in_channels, dual_bn, mean, std)
    head_dim = backbone.feature_dim if head_dim is None else head_dim
    head = ProjectionHead(backbone.feature_dim, head_dim, dual_bn, layers=head_layers)
    # A registered name of this builder (build_model sets the one it was called by); the kwargs
    # carry the depth and width, so any WideResNet rebuilds from its spec.
    name = "wrn-34-10" if (depth, widen_factor) == (34, 10) else "wrn-28-10"
    spec: dict[str, Any] = {"name": name, "kwargs": {
        "depth": depth, "widen_factor": widen_factor, "stem": stem, "in_channels": in_channels,
        "head_dim": head_dim, "dual_bn": dual_bn, "mean": mean, "std": std,
        "head_layers": head_layers}}
    return ContrastiveModel(backbone, head, spec)
