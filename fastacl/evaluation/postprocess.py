"""The "++" post-processing of DynACL++ / AIR++ (docs/acl-air.md section 7): k-means
pseudo-labels, a linear probe on them, then TRADES fine-tuning of the whole backbone."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from fastacl.evaluation.fine_tuning import finetune
from fastacl.evaluation.networks import (
    aff_network,
    encoder_features,
    fit_linear_head,
    frozen_encoder,
)
from fastacl.evaluation.protocols import (
    FinetuneSettings,
    PostProcessSettings,
    draw_seed,
    subset_indices,
)

__all__ = ["kmeans", "post_process"]


def _kmeans_plus_plus(x: torch.Tensor, k: int, squared_distances, generator: torch.Generator
                      ) -> list[int]:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    nearest = squared_distances(x[chosen]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.cpu().double()
        if weights.sum() <= 0:  # every point sits on a centre already
            weights = torch.ones_like(weights)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, squared_distances(x[chosen[-1:]]).squeeze(1))
    return chosen


def kmeans(x: torch.Tensor, k: int, iterations: int = 100, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (Lloyd) with k-means++ seeding; returns (labels int64 [N], centroids [k, D]).

    All draws come from a CPU generator seeded by `seed`, so the result is reproducible. A
    cluster that empties is re-seeded with the point farthest from its centroid.
    """
    if x.dim() != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: need x [N, D] with 1 <= k <= N, got x {tuple(x.shape)}, k={k}")
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().float()
    squared_norms = (x * x).sum(1)

    def squared_distances(centroids: torch.Tensor) -> torch.Tensor:
        d = squared_norms[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]
        return d.clamp_min_(0)

    centroids = x[_kmeans_plus_plus(x, k, squared_distances, generator)].clone()
    labels = None
    for _ in range(iterations):
        distances = squared_distances(centroids)
        new_labels = distances.argmin(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        for empty in (counts == 0).nonzero().flatten().tolist():
            farthest = distances.gather(1, labels[:, None]).squeeze(1).argmax()
            centroids[empty] = x[farthest]
    return squared_distances(centroids).argmin(1), centroids


def post_process(model: nn.Module, images: torch.Tensor, num_classes: int, eps: float,
                 settings: PostProcessSettings | None = None, seed: int = 0,
                 progress: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The "++" post-processing (DynACL++ / AIR++, docs/acl-air.md section 7); (model, info).

    1. k-means (K = num_classes) on the normal-branch backbone features of the unaugmented
       training images -> pseudo-labels;
    2. a zero-initialised linear probe on those features and pseudo-labels (SGD, lr 0.01,
       momentum 0.9, weight decay 1e-4, 10 epochs);
    3. TRADES fine-tuning of the whole dual-BN backbone + the probe as its head, on the
       pseudo-labels (as AFF: beta 6, 10 steps of eps / 4, natural pass "normal", adversarial
       "adv"; 25 epochs, lr 0.1, milestones 10/20).
    The returned model is a copy of `model` whose backbone is the fine-tuned one (the projection
    head is kept unchanged); evaluate it like any pre-trained model. images: uint8, true labels
    are never used.
    """
    settings = settings or PostProcessSettings()
    start = time.perf_counter()
    device = images.device
    seed_data = draw_seed(seed, "data")
    if settings.max_train is not None and settings.max_train < images.shape[0]:
        images = images[subset_indices(images.shape[0], settings.max_train, seed_data).to(device)]
    features = encoder_features(frozen_encoder(model, "normal"), images)
    pseudo_labels, _ = kmeans(features, num_classes, settings.kmeans_iterations, seed_data)
    # Linear probe on the frozen features (no augmentation).
    probe = fit_linear_head(
        features, pseudo_labels, num_classes, settings.probe_epochs,
        lambda parameters: torch.optim.SGD(parameters, lr=settings.probe_lr, momentum=0.9,
                                           weight_decay=settings.probe_weight_decay),
        settings.probe_batch_size, seed_data)
    with torch.no_grad():
        probe_agreement = (probe(features).argmax(1) == pseudo_labels).float().mean().item()
    network = aff_network(model, num_classes)
    network.fc.load_state_dict(probe.state_dict())
    trades = FinetuneSettings(
        mode="aff", epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
        milestones=settings.milestones, train_attack_steps=settings.attack_steps,
        beta=settings.beta, crop_padding=2 if images.shape[-1] <= 28 else 4,
        flip=images.shape[-1] > 28, source=settings.source)
    finetune(network, "aff", images, pseudo_labels, trades, eps,
             draw_seed(seed, "post-process trades"), progress)
    processed = copy.deepcopy(model)
    processed.backbone = network.backbone  # dual BN (a "cl" backbone was converted)
    info = {"settings": asdict(settings), "train_images": int(images.shape[0]),
            "cluster_sizes": torch.bincount(pseudo_labels, minlength=num_classes).tolist(),
            "probe_agreement": probe_agreement, "seconds": time.perf_counter() - start}
    return processed, info
