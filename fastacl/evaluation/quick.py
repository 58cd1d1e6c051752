"""The short check fastacl's trainer runs at the end of every run (the full protocols are
`evaluate`): a linear probe on frozen features, then clean and PGD-20 test accuracy."""

from __future__ import annotations

import os

import torch
from torch import nn

from fastacl.data import load_dataset
from fastacl.evaluation.networks import (
    LinearClassifier,
    encoder_features,
    fit_linear_head,
    frozen_encoder,
)
from fastacl.evaluation.protocols import STEP_FRACTION, draw_seed, subset_indices
from fastacl.evaluation.robustness import test_network

__all__ = ["quick_check", "train_linear_probe"]


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       epochs: int, seed: int = 0, batch_size: int = 256) -> nn.Linear:
    """A zero-initialised linear classifier on fixed features (Adam, lr 1e-3)."""
    return fit_linear_head(features, labels, num_classes, epochs,
                           lambda parameters: torch.optim.Adam(parameters, lr=1e-3),
                           batch_size, seed)


def quick_check(model: nn.Module, *, dataset: str, data_dir: str | os.PathLike | None,
                branch: str, epochs: int, max_test: int | None, eps: float, seed: int
                ) -> dict:
    """Quick SLF: a linear probe on frozen `branch` features, then clean and PGD-20 accuracy.

    The probe (Adam, no augmentation, `epochs` epochs) trains on the unaugmented training
    features; the test is on a fixed random subset of `max_test` test images (None: all), by
    fastacl.evaluation.test_network. Seeds: the probe's shuffles `seed`, the PGD-20 random start
    `seed` + 2 (protocols.draw_seed).

    Returns {"standard_accuracy", "robust_accuracy", "attack", "eval_protocol"}.
    """
    device = next(model.parameters()).device
    encoder = frozen_encoder(model, branch)
    train_images, train_labels = load_dataset(dataset, data_dir, split="train")
    test_images, test_labels = load_dataset(dataset, data_dir, split="test")
    # A fixed random subset (the same as `evaluate --max-test`): split files may be ordered by
    # class (mnist5k is), so the first N images would cover only some classes.
    subset = subset_indices(test_images.shape[0], max_test)
    test_images, test_labels = test_images[subset].to(device), test_labels[subset].to(device)
    train_labels = train_labels.to(device)
    features = encoder_features(encoder, train_images.to(device))
    classifier = train_linear_probe(features, train_labels, int(train_labels.max()) + 1, epochs,
                                    seed=draw_seed(seed, "data"))
    classifier.requires_grad_(False)
    network = LinearClassifier(encoder, classifier).eval()
    result = test_network(network, test_images, test_labels, ("pgd20",), eps, batch_size=256,
                          seed=draw_seed(seed, "test attack"), progress=False)
    n = test_labels.shape[0]
    return {"standard_accuracy": result["standard_accuracy"],
            "robust_accuracy": result["pgd20_accuracy"],
            "attack": f"pgd20 linf eps={eps:.4g} step={eps * STEP_FRACTION:.4g}",
            "eval_protocol": f"quick SLF: linear probe on frozen {branch}-branch features "
                             f"({epochs} epochs, Adam 1e-3, no augmentation), {n} test images"}
