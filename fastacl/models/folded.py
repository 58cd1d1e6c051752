"""Eval-mode batch norm folded into the convolution or linear layer before it, for the attacks.

Every attack runs the model in eval mode (docs/acl-air.md section 3: model in eval mode, "adv"
BN branch), where a BN layer is a fixed per-channel affine map of its input:

    BN(y) = gamma (y - mu) / sqrt(var + eps) + beta = s y + t,  s = gamma / sqrt(var + eps),
                                                                t = beta - s mu,

with mu, var the running statistics. After a bias-free convolution y = W * x this is
(s W) * x + t: one convolution with scaled weights and a bias. Folding removes every BN kernel
from the attack's forward and from its input-gradient backward (the BN backward is a second
pass over every activation): after bf16 convolutions, BN and elementwise ops were over half of
the step (benchmarks/RESULTS.md, "Where the time goes"). The result equals the unfolded
eval-mode forward up to float rounding (tests/test_folded.py).

``FoldedResNet18(model, branch)`` is a weight-free mirror of a ``ContrastiveResNet18`` (or of
fastacl's ResNet-34: the same BasicBlocks, 3-4-6-3): its folded weights are buffers, filled from the
model by ``refresh(model)``. Training changes the weights every step, so the trainer refreshes
before each attack (about one elementwise pass over the weights, a few milliseconds for the paper
model on a CPU). The buffers are updated in place, so a ``torch.compile`` of the folded model (and
CUDA graphs captured from it) keeps reading the current weights without recompiling. It holds no
reference to the model.

Only our own BasicBlock ResNets (resnet18, resnet18-small, resnet34) are folded (``can_fold``);
attacks on any other module (ResNet-50; the WideResNets, whose pre-activation BNs normalise
residual sums that no convolution precedes; the ViTs; a user's module) run it as it is.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.models.contrastive import ContrastiveModel, ProjectionHead
from fastacl.models.dual_bn import DualBatchNorm, check_branch
from fastacl.models.resnets import BasicBlock, ResNetBackbone, Shortcut

__all__ = ["FoldedResNet18", "bn_scale_shift", "can_fold", "folded_for_attack"]


def _branch_bn(bn: nn.Module, branch: str) -> nn.modules.batchnorm._BatchNorm:
    """The plain BN layer that `branch` routes through (a single-BN model has only one)."""
    return bn.branch_module(branch) if isinstance(bn, DualBatchNorm) else bn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with eval-mode bn(y) = s y + t per channel (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {bn}: it has no running statistics (track_running_stats=False), so "
            "even in eval mode it normalises with the batch's statistics"
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _blocks(backbone: ResNetBackbone) -> list[BasicBlock]:
    return [block for stage in (backbone.layer1, backbone.layer2, backbone.layer3,
                                backbone.layer4) for block in stage]


def can_fold(model: nn.Module) -> bool:
    """True for the BasicBlock ResNets that fastacl builds (ResNet-18 and ResNet-34: a
    ContrastiveModel with a ResNetBackbone of BasicBlocks and the ProjectionHead); False for any
    other model, and for subclasses that change a forward."""
    if not (isinstance(model, ContrastiveModel)
            and type(model).forward is ContrastiveModel.forward):
        return False
    backbone, head = model.backbone, model.head
    return (isinstance(backbone, ResNetBackbone)
            and type(backbone).forward is ResNetBackbone.forward
            and isinstance(head, ProjectionHead) and type(head).forward is ProjectionHead.forward
            and all(isinstance(block, BasicBlock) and type(block).forward is BasicBlock.forward
                    for block in _blocks(backbone)))


def _backbone_named(model: nn.Module) -> str:
    backbone = getattr(model, "backbone", None)
    return f" with a {type(backbone).__name__}" if isinstance(backbone, nn.Module) else ""


class _FoldedLayer(nn.Module):
    """A conv or linear layer with the BN after it folded in: weight s W, bias s b + t."""

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        # empty_like keeps the weight's device, dtype and memory format (channels_last).
        self.register_buffer("weight", torch.empty_like(layer.weight, requires_grad=False))
        self.register_buffer("bias", layer.weight.new_empty(layer.weight.shape[0]))

    @torch.no_grad()
    def refresh(self, layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> None:
        scale, shift = bn_scale_shift(bn)
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        self.weight.copy_(layer.weight * scale.view(view))
        self.bias.copy_(shift if layer.bias is None else shift + scale * layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        return F.linear(x, self.weight, self.bias)


class _FoldedBlock(nn.Module):
    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1 = _FoldedLayer(block.conv1)
        self.conv2 = _FoldedLayer(block.conv2)
        has_shortcut = isinstance(block.shortcut, Shortcut)
        self.shortcut = _FoldedLayer(block.shortcut.conv) if has_shortcut else None

    def refresh(self, block: BasicBlock, branch: str) -> None:
        self.conv1.refresh(block.conv1, _branch_bn(block.bn1, branch))
        self.conv2.refresh(block.conv2, _branch_bn(block.bn2, branch))
        if self.shortcut is not None:
            self.shortcut.refresh(block.shortcut.conv, _branch_bn(block.shortcut.bn, branch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(out) + identity)


class FoldedResNet18(nn.Module):
    """``model`` in eval mode on BN branch ``branch``, every BN folded; call ``refresh(model)``
    after the model's weights or statistics change. ``forward(x)`` gives z = g(f(x)),
    ``features(x)`` gives h = f(x). No parameters: gradients flow to the input only."""

    def __init__(self, model: ContrastiveModel, branch: str) -> None:
        super().__init__()
        if not can_fold(model):
            raise ValueError(
                "FoldedResNet18 mirrors fastacl's ContrastiveResNet18 (or its ResNet-34), got "
                f"{type(model).__name__}{_backbone_named(model)} (attacks run other models "
                "unfolded)"
            )
        self.branch = check_branch(branch)
        backbone = model.backbone
        # The input normalisation and the max-pool have nothing to fold: the model's own modules
        # (copies; the normalisation stays separate because the convolution zero-pads the
        # normalised image, so folding (x - mean) / std into it would change the border).
        self.normalize = copy.deepcopy(backbone.normalize)
        self.maxpool = copy.deepcopy(backbone.maxpool)
        self.stem = _FoldedLayer(backbone.conv1)
        self.blocks = nn.ModuleList(_FoldedBlock(block) for block in _blocks(backbone))
        head = model.head
        self.fc1, self.fc2, self.fc3 = (_FoldedLayer(fc) for fc in (head.fc1, head.fc2, head.fc3))
        # torch.compile wrappers of this module by mode (fastacl.pretrain.compiled_for_attack); a
        # plain dict, so they are not submodules, and they go when this module goes.
        self.compiled: dict = {}
        self.refresh(model)

    def matches(self, model: ContrastiveModel) -> bool:
        """Whether the buffers still fit ``model`` (device, dtype, memory format unchanged)."""
        ours, theirs = self.stem.weight, model.backbone.conv1.weight
        return (ours.device == theirs.device and ours.dtype == theirs.dtype
                and ours.stride() == theirs.stride())

    def refresh(self, model: ContrastiveModel) -> FoldedResNet18:
        """Copy ``model``'s current weights and BN statistics in, folded (in place)."""
        backbone, head, branch = model.backbone, model.head, self.branch
        self.normalize.load_state_dict(backbone.normalize.state_dict())  # copies in place
        self.stem.refresh(backbone.conv1, _branch_bn(backbone.bn1, branch))
        for folded, block in zip(self.blocks, _blocks(backbone), strict=True):
            folded.refresh(block, branch)
        for folded, fc, bn in zip((self.fc1, self.fc2, self.fc3), (head.fc1, head.fc2, head.fc3),
                                  (head.bn1, head.bn2, head.bn3), strict=True):
            folded.refresh(fc, _branch_bn(bn, branch))
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.stem(self.normalize(x))))
        for block in self.blocks:
            out = block(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Model -> {branch: its folded mirror}. Weak keys, and a mirror holds no reference to its model,
# so the entry goes with the model.
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def folded_for_attack(model: ContrastiveModel, branch: str = "adv") -> FoldedResNet18:
    """``model``'s folded mirror on ``branch``, refreshed from its current weights.

    Built once per (model, branch) and refreshed in place on every call, so a compiled mirror
    stays valid; rebuilt if the model moved to another device, dtype or memory format.
    """
    by_branch = _FOLDED.setdefault(model, {})
    folded = by_branch.get(branch)
    if folded is None or not folded.matches(model):
        by_branch[branch] = FoldedResNet18(model, branch)  # the constructor refreshes
        return by_branch[branch]
    return folded.refresh(model)
