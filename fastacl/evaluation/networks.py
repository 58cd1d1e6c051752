"""The classifiers the protocols fine-tune: a frozen encoder + linear head (SLF, ALF, the quick
check) and the whole dual-BN backbone + linear head (AFF, "++"); every head starts at zero."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.models import bn_branch, convert_to_dual_bn, encoder_from_branch, has_dual_bn
from fastacl.utils import unwrap

__all__ = [
    "DualBNClassifier",
    "LinearClassifier",
    "aff_network",
    "encoder_features",
    "fit_linear_head",
    "frozen_encoder",
    "linear_network",
    "zero_linear",
]


def frozen_encoder(model: nn.Module, branch: str) -> nn.Module:
    """The single-BN encoder of `branch` (a copy; the pre-trained model is left untouched)."""
    encoder = encoder_from_branch(model, branch).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def zero_linear(in_features: int, num_classes: int) -> nn.Linear:
    """A Linear(in_features, num_classes) with zero weight and bias (the published head init)."""
    classifier = nn.Linear(in_features, num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return classifier


class LinearClassifier(nn.Module):
    """A frozen encoder (always in eval mode: its BN statistics never move) + a linear head.

    SLF and ALF train `fc` only; `train()` switches the head alone.
    """

    def __init__(self, encoder: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.fc = encoder, fc

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


class DualBNClassifier(nn.Module):
    """The dual-BN backbone + a linear head, routed per call: forward(x, branch)."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.fc = backbone, fc

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        with bn_branch(self.backbone, branch):
            return self.fc(self.backbone(x))


def _feature_dim(encoder: nn.Module) -> int:
    dim = getattr(encoder, "feature_dim", None)
    if dim is None:
        raise ValueError(f"{type(encoder).__name__} has no feature_dim attribute; fastacl's "
                         "ResNet18Backbone has one")
    return dim


def linear_network(model: nn.Module, branch: str, num_classes: int) -> LinearClassifier:
    """SLF / ALF: the frozen `branch` encoder (a copy) + a zero-initialised linear head."""
    encoder = frozen_encoder(model, branch)
    return LinearClassifier(encoder, zero_linear(_feature_dim(encoder), num_classes))


def aff_network(model: nn.Module, num_classes: int) -> DualBNClassifier:
    """AFF: a copy of the whole pre-trained backbone with its dual BN + a zero-init linear head.

    The copy holds every pre-trained backbone tensor (both BN branches, their running stats);
    the projection head is dropped (docs/acl-air.md section 8). A single-BN ("cl") backbone is
    converted to dual BN with both branches starting from its only BN.
    """
    model = unwrap(model)
    backbone = copy.deepcopy(model.backbone if hasattr(model, "backbone") else model)
    if not has_dual_bn(backbone):
        backbone = convert_to_dual_bn(backbone)
    for p in backbone.parameters():
        p.requires_grad_(True)
    return DualBNClassifier(backbone, zero_linear(_feature_dim(backbone), num_classes))


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512
                     ) -> torch.Tensor:
    """The encoder's features of uint8 images [N, C, H, W], computed in chunks (no gradient)."""
    return torch.cat([encoder(images[i:i + batch_size].float() / 255)
                      for i in range(0, images.shape[0], batch_size)])


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
                    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                    batch_size: int, seed: int) -> nn.Linear:
    """A zero-initialised linear classifier trained on fixed features with cross-entropy.

    optimizer: builds the optimizer from the head's parameters. Each epoch visits the features in
    an order drawn from a CPU generator seeded by `seed`, in batches of `batch_size`.
    """
    generator = torch.Generator().manual_seed(seed)
    classifier = zero_linear(features.shape[1], num_classes).to(features.device)
    step = optimizer(list(classifier.parameters()))
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for index in order.split(batch_size):
            loss = F.cross_entropy(classifier(features[index]), labels[index])
            step.zero_grad(set_to_none=True)
            loss.backward()
            step.step()
    return classifier
