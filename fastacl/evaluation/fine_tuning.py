"""The fine-tuning loop of SLF, ALF and AFF (docs/acl-air.md section 8), with its TRADES loss
and the batched RandomCrop + flip every mode trains with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastacl.attacks import pgd, trades_perturb
from fastacl.evaluation.protocols import MODES, STEP_FRACTION, FinetuneSettings, draw_seed
from fastacl.utils import check_choice
from fastacl.utils import progress as progress_bar

__all__ = ["finetune", "random_crop_flip", "trades_loss"]


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size of x, padding, zero fill) + horizontal flip (p 0.5) on a whole batch.

    x: float [N, C, H, W]. Each image gets its own offset in 0..2 * padding on each axis (drawn
    on the host from `generator`), gathered in one call; torchvision's per-image semantics.
    """
    n, c, h, w = x.shape
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        width = w + 2 * padding
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [N, H]
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [N, W]
        index = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, -1)
        x = padded.flatten(2).gather(2, index).view(n, c, h, w)
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def trades_loss(network: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """TRADES: CE(f(x, normal), y) + beta KL(f(x, normal) || f(x_adv, adv)), batch mean."""
    logits_natural = network(x, branch="normal")
    logits_adversarial = network(x_adv, branch="adv")
    robust = F.kl_div(F.log_softmax(logits_adversarial, dim=1),
                      F.softmax(logits_natural, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_natural, y) + beta * robust


def _training_loss(network: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor,
                   settings: FinetuneSettings, eps: float,
                   generator: torch.Generator) -> torch.Tensor:
    """One batch's loss under `mode`'s protocol; its attack draws its start from `generator`."""
    step_size = eps * STEP_FRACTION
    if mode == "aff":
        # The attack runs in eval mode; the update in train mode (both BN branches).
        x_adv = trades_perturb(network, x, eps=eps, step_size=step_size,
                               steps=settings.train_attack_steps, branch="adv",
                               natural_branch="normal", generator=generator)
        return trades_loss(network, x, x_adv, y, settings.beta)
    if mode == "alf":
        x = pgd(network, x, y, eps=eps, step_size=step_size, steps=settings.train_attack_steps,
                random_start=True, generator=generator)
    with torch.no_grad():  # the encoder is frozen: features only
        features = network.encoder(x)
    return F.cross_entropy(network.fc(features), y)


def finetune(network: nn.Module, mode: str, images: torch.Tensor, labels: torch.Tensor,
             settings: FinetuneSettings, eps: float, seed: int = 0,
             progress: bool | None = None, history: list | None = None) -> nn.Module:
    """Fine-tune `network` in place by `mode`'s protocol; returns it in eval mode.

    network: `linear_network(...)` for "slf" / "alf", `aff_network(...)` for "aff".
    images: uint8 [N, C, H, W] (on the network's device), labels: int64 [N].
    Random draws (shuffle, crops, flips, attack starts) come from generators seeded by `seed`.
    SGD, MultiStepLR (gamma 0.1); AFF trains every parameter, SLF / ALF the head alone.
    history: if given, one {"epoch", "lr", "loss"} (mean training loss) is appended per epoch.
    """
    check_choice("mode", mode, MODES)
    device = images.device
    data_generator = torch.Generator().manual_seed(draw_seed(seed, "data"))
    attack_generator = torch.Generator(device).manual_seed(draw_seed(seed, "train attack"))
    parameters = ([p for p in network.parameters() if p.requires_grad] if mode == "aff"
                  else list(network.fc.parameters()))
    optimizer = torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, settings.milestones, gamma=0.1)
    n = images.shape[0]
    bar = progress_bar(settings.epochs * math.ceil(n / settings.batch_size),
                       f"{mode} fine-tuning", progress)
    for epoch in range(1, settings.epochs + 1):
        network.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, generator=data_generator).to(device)
        for index in order.split(settings.batch_size):
            x = random_crop_flip(images[index].float() / 255, settings.crop_padding,
                                 settings.flip, data_generator)
            loss = _training_loss(network, mode, x, labels[index], settings, eps,
                                  attack_generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            batches += 1
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            bar.update(1)
        scheduler.step()
        if history is not None:
            history.append({"epoch": epoch, "lr": lr, "loss": loss_sum.item() / batches})
    bar.close()
    return network.eval()
