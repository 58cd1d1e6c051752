"""Tiny models (width 4, head 16) and tiny synthetic sets shared by the evaluation tests."""

import torch

from fastacl.evaluation import FinetuneSettings
from fastacl.models import build_model

EPS = 8 / 255


def tiny_model(dual_bn=True, in_channels=3, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet18", width=4, head_dim=16, dual_bn=dual_bn,
                        in_channels=in_channels)
    # Distinct, non-trivial BN statistics and affine parameters in every branch, so that a
    # copy that took the wrong branch (or a fresh init) is told apart.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("bn" in name or "shortcut.bn" in name):
                tensor.add_(0.1 * torch.rand(tensor.shape, generator=generator))
    return model.eval()


def tiny_data(n=24, classes=3, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return images, labels


def settings(mode, **overrides):
    values = dict(epochs=1, batch_size=8, lr=0.1, milestones=[], train_attack_steps=2)
    values.update(overrides)
    return FinetuneSettings(mode=mode, **values)
