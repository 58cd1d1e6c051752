"""A plain eager PyTorch ACL-AIR training step, written the way the published code runs it.

A yardstick for benchmarks/bench_train_step.py (issues 5 and 9), nothing more: fastacl never
imports it. It computes what fastacl.pretrain.train_step computes (tests/test_baseline_step.py
checks the loss terms, the adversarial examples and the update against fastacl in fp32), the
way the ACL / DynACL / AIR code computes it:

- Data: a torch.utils.data Dataset whose __getitem__ augments ONE image at a time (two views
  and the original), with torchvision's per-image semantics: parameters drawn per call as
  torchvision's get_params does, then crop + antialiased resize, flip, ColorJitter in a random
  op order, grayscale, using the per-image reference ops of fastacl.data.reference (no PIL: the
  published code's PIL conversions would only add cost). Served by a DataLoader with worker
  processes (`num_workers`: the published code uses 4 on a GPU machine; 2 = every core of the
  2-core development CPU). fastacl instead keeps the uint8 set on the device and augments both
  views of the whole batch in one batched call.
- Attack: PGD on NT-Xent with model.eval(), every parameter keeping requires_grad, and a full
  loss.backward() in each step (all weight gradients computed and thrown away), the
  perturbation's .grad read, model.zero_grad() every step. fastacl: parameters frozen,
  autograd.grad with respect to the input only, fused update.
- fp32 throughout: no autocast, no channels_last.
- Three separate train-mode forwards: adversarial views ("adv" BN), natural views and
  originals ("normal" BN).
- Losses written plainly from docs/acl-air.md sections 4 and 6: NT-Xent materialising the
  2N x 2N similarity matrix, SIR / AIR as softmaxes, logs and sums. fastacl.ops is not used.
- Optimiser: fastacl.optim.LARS, the same as fastacl's: the optimiser is not what is compared.

Loss: L = (1 - w) NTX(nat) + (1 + w) NTX(adv) + lambda1 SIR + lambda2 AIR, NOT halved (as
fastacl's ACLLoss; the original ACL code halves it, which LARS makes immaterial).
Random start: delta ~ U[-eps, eps] (the published torch.rand_like(x) * 2 eps - eps, drawn with
uniform_ so that a shared generator gives fastacl's exact start); x + delta is clipped to [0, 1]
when cfg.attack.clip_random_start (--fidelity corrected; False, the default, is the released
behaviour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from fastacl.data.reference import (
    adjust_brightness_reference,
    adjust_contrast_reference,
    adjust_hue_reference,
    adjust_saturation_reference,
    crop_box_reference,
    resized_crop_reference,
    rgb_to_grayscale_reference,
)

# torchvision ColorJitter's fn_idx numbering
_JITTER = (
    adjust_brightness_reference,
    adjust_contrast_reference,
    adjust_saturation_reference,
    adjust_hue_reference,
)


# ---- data: per-image augmentation in DataLoader workers -----------------------------------------

def augment_one(image: torch.Tensor, strength: float = 1.0, interpolation: str = "bicubic",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of ONE uint8 image [C, H, W] (docs/acl-air.md section 1), float [C, H, W]
    in [0, 1].

    Compose([RandomResizedCrop(size, scale=(1 - 0.9 s, 1)), RandomHorizontalFlip(),
    RandomApply([ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s)], p=0.8 s), RandomGrayscale(0.2 s)]),
    each transform drawing its own parameters per call as torchvision's do.
    """
    size = (image.shape[-2], image.shape[-1])
    x = image.float() / 255.0
    top, left, height, width = crop_box_reference(size, (1.0 - 0.9 * strength, 1.0),
                                                  generator=generator)
    x = resized_crop_reference(x, top, left, height, width, size, interpolation).clamp(0.0, 1.0)
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=generator).item() < 0.8 * strength:
        # ColorJitter.get_params: a random op order, then one factor per op.
        order = torch.randperm(4, generator=generator).tolist()
        magnitude = 0.4 * strength
        factors = [
            torch.empty(1).uniform_(max(0.0, 1.0 - magnitude), 1.0 + magnitude,
                                    generator=generator).item()
            for _ in range(3)
        ]
        factors.append(torch.empty(1).uniform_(-0.1 * strength, 0.1 * strength,
                                               generator=generator).item())
        for op in order:
            x = _JITTER[op](x, factors[op])
    if torch.rand(1, generator=generator).item() < 0.2 * strength and x.shape[0] == 3:
        x = rgb_to_grayscale_reference(x).expand(3, -1, -1).contiguous()
    return x


class PerImageACLDataset(Dataset):
    """uint8 images [N, C, H, W]; item i = (view 1, view 2, original), float [C, H, W] each.

    Every item is augmented on its own in __getitem__ (in a DataLoader worker), as the published
    code's CIFAR10Pair-style datasets do. Randomness: torch's global RNG, which the DataLoader
    seeds per worker.
    """

    def __init__(self, images: torch.Tensor, strength: float = 1.0,
                 interpolation: str = "bicubic"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images = images
        self.strength = strength
        self.interpolation = interpolation

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        return (augment_one(image, self.strength, self.interpolation),
                augment_one(image, self.strength, self.interpolation),
                image.float() / 255.0)


def make_loader(images: torch.Tensor, batch_size: int, num_workers: int = 2, *,
                strength: float = 1.0, interpolation: str = "bicubic", seed: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """The published-style loader: shuffled, full batches, `num_workers` worker processes.

    persistent_workers keeps the workers across epochs (the published code restarts them every
    epoch; a benchmark that measures steps inside one epoch is not affected).
    """
    return DataLoader(
        PerImageACLDataset(images, strength, interpolation), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )


# ---- losses, written plainly (docs/acl-air.md sections 4 and 6) ---------------------------------

def nt_xent_plain(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with the full 2N x 2N similarity matrix; the anchor itself masked out as the
    published code does (minus 1e5 on the diagonal: exp of it is exactly 0 in fp32)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits - torch.eye(2 * n, device=z.device, dtype=z.dtype) * 1e5
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def matched_softmax(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigma(D(a, b)): softmax over the sample index k of cos(a_k, b_k) / t."""
    return F.softmax(F.cosine_similarity(a, b, dim=1) / temperature, dim=0)


def _kl(ref: torch.Tensor, other: torch.Tensor, form: str) -> torch.Tensor:
    if form == "exact":
        return (ref * (torch.log(ref) - torch.log(other))).sum()
    return (ref * (torch.log(ref) - other)).sum()  # the released code's form


def sir_plain(z1, z2, z_orig, temperature: float = 0.5, form: str = "exact") -> torch.Tensor:
    p_i = matched_softmax(z1, z_orig, temperature)
    p_j = matched_softmax(z2, z_orig, temperature)
    return _kl(p_j, p_i, form)


def air_plain(z1, z2, z_orig, z1_adv, z2_adv, temperature: float = 0.5,
              form: str = "exact") -> torch.Tensor:
    r_i = matched_softmax(z1_adv, z_orig, temperature) * matched_softmax(z1_adv, z1, temperature)
    r_j = matched_softmax(z2_adv, z_orig, temperature) * matched_softmax(z2_adv, z2, temperature)
    return _kl(r_j, r_i, form)


def loss_terms_plain(z1, z2, z_orig, z1_adv, z2_adv, *, weight_w: float = 0.0,
                     lambda1: float = 0.5, lambda2: float = 0.5, temperature: float = 0.5,
                     form: str = "exact") -> dict[str, torch.Tensor]:
    """The ACL / DynACL / AIR objective (docs/acl-air.md section 5); 'total' is differentiable."""
    natural = nt_xent_plain(z1, z2, temperature)
    adversarial = nt_xent_plain(z1_adv, z2_adv, temperature)
    total = (1 - weight_w) * natural + (1 + weight_w) * adversarial
    terms = {"natural": natural, "adversarial": adversarial}
    if lambda1 > 0:
        terms["sir"] = sir_plain(z1, z2, z_orig, temperature, form)
        total = total + lambda1 * terms["sir"]
    if lambda2 > 0:
        terms["air"] = air_plain(z1, z2, z_orig, z1_adv, z2_adv, temperature, form)
        total = total + lambda2 * terms["air"]
    terms["total"] = total
    return terms


# ---- the step ------------------------------------------------------------------------------------

def pgd_contrastive_published(model, x1, x2, eps: float, step_size: float, steps: int,
                              temperature: float = 0.5, clip_random_start: bool = False,
                              generator: torch.Generator | None = None):
    """The published attack loop: a perturbation leaf, model.zero_grad() + loss.backward()
    through every parameter each step, delta.grad read, delta updated in the canonical form."""
    n = x1.shape[0]
    model.eval()
    x_nat = torch.cat([x1, x2]).detach()
    delta = torch.empty_like(x_nat).uniform_(-eps, eps, generator=generator)
    if clip_random_start:
        delta = (x_nat + delta).clamp(0.0, 1.0) - x_nat
    delta.requires_grad_(True)
    for _ in range(steps):
        z = model(x_nat + delta, branch="adv")
        model.zero_grad()
        loss = nt_xent_plain(z[:n], z[n:], temperature)
        loss.backward()
        delta.data = delta.data + step_size * delta.grad.sign()
        delta.grad = None
        delta.data = torch.clamp(delta.data, -eps, eps)
        delta.data = torch.clamp(x_nat + delta.data, 0.0, 1.0) - x_nat
    model.train()
    x_adv = (x_nat + delta).detach()
    return x_adv[:n], x_adv[n:]


def baseline_step(model, optimizer, x_orig, x1, x2, cfg, generator=None, weight_w: float = 0.0):
    """One ACL-AIR step the published way; same arguments as fastacl.pretrain.train_step (cfg: a
    resolved TrainConfig; precision and channels_last are ignored: fp32, contiguous).
    Returns the loss terms as detached 0-d tensors."""
    # The same profiler phase names as fastacl.pretrain.train_step (benchmarks/profile_step.py).
    with record_function("fastacl.attack"):
        x1_adv, x2_adv = pgd_contrastive_published(
            model, x1, x2, cfg.attack.eps, cfg.attack.step_size, cfg.attack.steps,
            cfg.loss.temperature, cfg.attack.clip_random_start, generator,
        )
    model.train()
    with record_function("fastacl.forward"):
        features_adv = model(torch.cat([x1_adv, x2_adv]), branch="adv")
        features = model(torch.cat([x1, x2]), branch="normal")
        # The originals' pass: SIR / AIR only (the AIR code runs it, the ACL code does not).
        features_orig = (model(x_orig, branch="normal")
                         if cfg.loss.lambda1 > 0 or cfg.loss.lambda2 > 0 else None)
        z1_adv, z2_adv = features_adv.chunk(2)
        z1, z2 = features.chunk(2)
        terms = loss_terms_plain(
            z1, z2, features_orig, z1_adv, z2_adv, weight_w=weight_w, lambda1=cfg.loss.lambda1,
            lambda2=cfg.loss.lambda2, temperature=cfg.loss.temperature, form=cfg.loss.air_form,
        )
    with record_function("fastacl.backward"):
        optimizer.zero_grad()
        terms["total"].backward()
    with record_function("fastacl.optimizer"):
        optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


__all__ = [
    "PerImageACLDataset",
    "air_plain",
    "augment_one",
    "baseline_step",
    "loss_terms_plain",
    "make_loader",
    "matched_softmax",
    "nt_xent_plain",
    "pgd_contrastive_published",
    "sir_plain",
]
