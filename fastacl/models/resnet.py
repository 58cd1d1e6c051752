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

The blocks and the backbone are the ResNet family's (fastacl.models.resnets), the head and the
model class every fastacl model's (fastacl.models.contrastive); this module fixes the paper's
ResNet-18 on them. Registry (fastacl.models.registry): ``build_model("resnet18")`` is the paper
model; ``build_model("resnet18-small")`` is the demo model (width 16, head 128: about 1/16 of the
paper model's conv FLOPs and parameters). Every model carries ``model.spec`` = {"name",
"kwargs"}; ``build_model(spec["name"], **spec["kwargs"])`` rebuilds it (checkpoints store it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastacl.errors import ConfigError
from fastacl.models.contrastive import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    ContrastiveModel,
    Normalize,
    ProjectionHead,
    resolve_normalization,
)
from fastacl.models.resnets import STEMS, BasicBlock, ResNetBackbone, Shortcut

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "STEMS",
    "BasicBlock",
    "ContrastiveResNet18",
    "Normalize",
    "ProjectionHead",
    "ResNet18Backbone",
    "Shortcut",
    "resnet18_acl",
]


class ResNet18Backbone(ResNetBackbone):
    """The encoder f: images in [0, 1] -> ``feature_dim`` features (512 in the paper).

    A ResNetBackbone with BasicBlocks 2-2-2-2. ``forward(x, branch=None)``: ``branch``
    ("normal" / "adv") routes every dual-BN layer for this call; None uses the branch routed by
    an enclosing ``bn_branch`` block.
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
        super().__init__(BasicBlock, (2, 2, 2, 2), stem, in_channels, width, dual_bn, mean, std)


class ContrastiveResNet18(ContrastiveModel):
    """ResNet-18 backbone f plus projection head g; ``forward`` returns z = g(f(x)).

    A ContrastiveModel (attributes and ``forward(x, branch=None, return_features=False)`` as
    documented there) whose spec is {"name": "resnet18", "kwargs": {...}}.
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
        backbone = ResNet18Backbone(stem, in_channels, width, dual_bn, mean, std)
        head = ProjectionHead(backbone.feature_dim, head_dim, dual_bn)
        spec: dict[str, Any] = {
            "name": "resnet18",
            "kwargs": {
                "stem": stem, "in_channels": in_channels, "width": width, "head_dim": head_dim,
                "dual_bn": dual_bn, "mean": [float(m) for m in mean],
                "std": [float(s) for s in std],
            },
        }
        super().__init__(backbone, head, spec)


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
    mean, std = resolve_normalization(in_channels, mean, std)
    return ContrastiveResNet18(stem, in_channels, width, head_dim, dual_bn, mean, std)

