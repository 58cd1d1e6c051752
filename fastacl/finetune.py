"""Downstream evaluation of a pre-trained encoder.

For now: `quick_evaluation`, the short SLF check that `fastacl.train` runs at the end of every run
(the full SLF / ALF / AFF protocols of spec section 8 arrive with fastacl.evaluate). It trains a
zero-initialised linear classifier on the frozen encoder's features of the unaugmented training
images, then reports clean accuracy and PGD-20 robust accuracy of encoder + classifier on the test
split. A point counts as robust only if it is classified correctly both clean and under attack.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def _features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([encoder(images[i:i + batch_size].float() / 255)
                      for i in range(0, images.shape[0], batch_size)])


def frozen_encoder(model: nn.Module, branch: str) -> nn.Module:
    """The single-BN encoder of `branch` (a copy; the pre-trained model is left untouched)."""
    from fastacl.models import encoder_from_branch

    encoder = encoder_from_branch(model, branch).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       epochs: int, seed: int = 0, batch_size: int = 256) -> nn.Linear:
    """A zero-initialised linear classifier on fixed features (Adam, lr 1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for i in range(0, features.shape[0], batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(classifier(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier


def quick_evaluation(model: nn.Module, cfg) -> dict:
    """Quick SLF: linear probe on frozen features, then clean and PGD-20 test accuracy."""
    from fastacl.attacks import pgd
    from fastacl.data import load_dataset

    device = next(model.parameters()).device
    branch = "adv" if cfg.method != "cl" else "normal"
    encoder = frozen_encoder(model, branch)
    train_images, train_labels = load_dataset(cfg.dataset, cfg.data_dir, split="train")
    test_images, test_labels = load_dataset(cfg.dataset, cfg.data_dir, split="test")
    if cfg.eval_max_test is not None:
        test_images = test_images[: cfg.eval_max_test]
        test_labels = test_labels[: cfg.eval_max_test]
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = int(train_labels.max()) + 1
    features = _features(encoder, train_images.to(device))
    classifier = train_linear_probe(features, train_labels, num_classes, cfg.eval_epochs,
                                    seed=cfg.seed)
    classifier.requires_grad_(False)
    network = nn.Sequential(encoder, classifier).eval()
    eps = cfg.eval_eps
    step_size = eps / 4  # 2/255 for eps 8/255, as the published PGD-20
    correct_clean, correct_robust = 0, 0
    for i in range(0, test_images.shape[0], 256):
        x = test_images[i:i + 256].to(device).float() / 255
        y = test_labels[i:i + 256]
        with torch.no_grad():
            clean_ok = network(x).argmax(1) == y
        x_adv = pgd(network, x, y, eps=eps, step_size=step_size, steps=20, random_start=True)
        with torch.no_grad():
            adv_ok = network(x_adv).argmax(1) == y
        correct_clean += int(clean_ok.sum())
        correct_robust += int((clean_ok & adv_ok).sum())
    n = test_images.shape[0]
    return {"standard_accuracy": correct_clean / n, "robust_accuracy": correct_robust / n,
            "attack": f"pgd20 linf eps={eps:.4g} step={step_size:.4g}",
            "eval_protocol": f"quick SLF: linear probe on frozen {branch}-branch features "
                             f"({cfg.eval_epochs} epochs, Adam 1e-3, no augmentation), "
                             f"{n} test images"}
