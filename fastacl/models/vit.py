"""A plain Vision Transformer (Dosovitskiy et al., 2021) for small images, with dual LayerNorm.

- Patch embedding: a patch_size x patch_size conv with stride patch_size (a linear map of each
  patch), patch 4 for 32x32 images (64 patches; 49 at 28x28), the normalised image as input.
- A learned class token and a learned position embedding over the (image_size / patch_size)^2
  patches + the class token: the grid is fixed at construction (``image_size``), and other input
  sizes are refused rather than silently interpolated.
- ``depth`` pre-norm blocks: x + Attention(LN(x)), then x + MLP(LN(x)); multi-head
  self-attention with a qkv bias, MLP Linear-GELU-Linear (``mlp_dim`` hidden); LayerNorm eps 1e-6
  (the original ViT / timm).
- A final LayerNorm; the features are the class token's output (``feature_dim`` = dim), as the
  original ViT (not the mean over the patches).
- Init as timm's ViT: linear layers (the patch projection included, which is one) truncated
  normal with std 0.02 and zero bias, position embedding truncated normal 0.02, class token
  normal 1e-6, LayerNorm 1 / 0.
- dual_bn: every LayerNorm is a DualLayerNorm ("normal" / "adv" affine parameters; a LayerNorm has
  no running statistics) and the projection head's BNs are dual; False: plain LayerNorm and BN.

Presets (fastacl.models.registry): vit-tiny (dim 192, depth 12, 3 heads, MLP 768) and vit-small
(384, 12, 6, 1536), the ViT-Ti / ViT-S of DeiT, at patch 4. The projection head defaults to
dim -> dim (192 / 384).
"""

from __future__ import annotations

import functools
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
    resolve_normalization,
)
from fastacl.models.dual_bn import DualLayerNorm, bn_branch

__all__ = ["Attention", "TransformerBlock", "ViTBackbone", "vit_acl"]

# LayerNorm eps of the original ViT (big_vision) and timm's VisionTransformer.
LAYER_NORM_EPS = 1e-6
# Truncated-normal std of timm's ViT init (trunc_normal_(std=.02) for linear layers and pos_embed).
INIT_STD = 0.02


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection (with bias), softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).view(n, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, tokens, dim / heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = norm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTBackbone(nn.Module):
    """The encoder f: images [N, C, image_size, image_size] in [0, 1] -> ``dim`` features (the
    class token). ``forward(x, branch=None)`` as fastacl.models.ResNet18Backbone's."""

    def __init__(
        self,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_dim: int = 768,
        patch_size: int = 4,
        image_size: int = 32,
        in_channels: int = 3,
        dual_bn: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads),
                            ("mlp_dim", mlp_dim), ("patch_size", patch_size),
                            ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ViT {name} must be a positive integer, got {value!r}")
        if dim % heads:
            raise ConfigError(f"ViT dim must be a multiple of heads, got dim={dim}, heads={heads}")
        if image_size % patch_size:
            raise ConfigError(f"image_size must be a multiple of patch_size, got image_size="
                              f"{image_size}, patch_size={patch_size}")
        norm = functools.partial(DualLayerNorm if dual_bn else nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.in_channels = in_channels
        self.image_size = image_size
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, patches + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim, norm)
                                      for _ in range(depth)))
        self.norm = norm(dim)
        self.feature_dim = dim

        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        check_images(x, self.in_channels)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} images (its "
                f"position embedding has one entry per patch), got {tuple(x.shape)}; build it "
                "with image_size= the data's size"
            )
        with bn_branch(self, branch):
            tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)
            cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed.to(tokens.dtype)
            return self.norm(self.blocks(tokens))[:, 0]


def vit_acl(dim: int = 192, depth: int = 12, heads: int = 3, mlp_dim: int = 768,
            patch_size: int = 4, image_size: int = 32, in_channels: int = 3,
            head_dim: int | None = None, dual_bn: bool = True,
            mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None) -> ContrastiveModel:
    """ViT (class-token features) + projection head; the defaults are ViT-Ti at patch 4.

    Args:
        dim, depth, heads, mlp_dim: width, blocks, attention heads, MLP hidden size.
        patch_size, image_size: square patches and images; image_size must be the data's size
            (32 for CIFAR, 28 for MNIST, 96 for STL-10) and a multiple of patch_size.
        in_channels, dual_bn, mean, std: as fastacl.models.resnet18_acl (dual_bn: dual
            LayerNorm in the blocks, dual BN in the head).
        head_dim: the projection head's width; None: dim.
    """
    if head_dim is not None and head_dim < 1:
        raise ConfigError(f"head_dim must be positive, got {head_dim}")
    mean, std = resolve_normalization(in_channels, mean, std)
    backbone = ViTBackbone(dim, depth, heads, mlp_dim, patch_size, image_size, in_channels,
                           dual_bn, mean, std)
    head_dim = dim if head_dim is None else head_dim
    head = ProjectionHead(dim, head_dim, dual_bn)
    # A registered name of this builder (build_model sets the one it was called by).
    name = "vit-small" if (dim, depth, heads, mlp_dim) == (384, 12, 6, 1536) else "vit-tiny"
    spec: dict[str, Any] = {"name": name, "kwargs": {
        "dim": dim, "depth": depth, "heads": heads, "mlp_dim": mlp_dim, "patch_size": patch_size,
        "image_size": image_size, "in_channels": in_channels, "head_dim": head_dim,
        "dual_bn": dual_bn, "mean": mean, "std": std}}
    return ContrastiveModel(backbone, head, spec)
