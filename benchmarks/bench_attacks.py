"""PGD throughput, in the same run:

1. The ACL attack (PGD on NT-Xent over both views, docs/acl-air.md section 3) on the paper's dual-BN
   ResNet-18 at 32x32: fastacl.attacks.pgd_contrastive ("ours": parameters frozen, autograd.grad
   with respect to the input only) against the published loop ("published": loss.backward()
   through every parameter each step, then the input's .grad). Same model, loss, start and
   update rule; the difference is the weight-gradient half of every backward.
   extra_info: images_per_s = attacked images (2N views) per second.
2. The PGD update on one [256, 3, 32, 32] batch: fastacl.ops.pgd_step_ ("fused": in place; the
   Triton kernel on CUDA, the in-place reference on the CPU) against the canonical form as
   separate out-of-place PyTorch ops ("unfused"). On CUDA the fused step also reports the
   fraction of its H100 SXM memory bound it reaches (extra_info; benchmarks/roofline.py).

    python -m pytest benchmarks/bench_attacks.py            CPU suites; GPU ones need CUDA
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_attacks.py     on a shared CPU machine

CPU sizes are tiny (8 images x 2 views, 3 steps) so that the suite finishes in well under a
minute on 2 cores. On a machine whose cores other jobs are using, two OpenMP threads spin-wait
on each other and the medians swing by 3-10x; one thread gives stable figures.
"""

from __future__ import annotations

import pytest
import torch

try:  # run as a script (python benchmarks/bench_x.py) or collected by pytest from the root
    from roofline import fraction_of_bound, pgd_step_costs
except ImportError:
    from benchmarks.roofline import fraction_of_bound, pgd_step_costs
from fastacl.attacks import pgd_contrastive
from fastacl.models import resnet18_acl
from fastacl.ops import nt_xent, pgd_step_

EPS, ALPHA = 8 / 255, 2 / 255
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
ATTACK_BATCH = {"cpu": 8, "cuda": 256}  # images per view
ATTACK_STEPS = {"cpu": 3, "cuda": 5}


def published_pgd_contrastive(model, x1, x2, steps):
    """The published attack loop (ACL / DynACL / AIR code): a perturbation that requires grad,
    model.zero_grad() and loss.backward() each step, so every parameter gets a gradient too."""
    model.eval()
    n = x1.shape[0]
    x_nat = torch.cat([x1, x2])
    delta = torch.empty_like(x_nat).uniform_(-EPS, EPS).requires_grad_(True)
    for _ in range(steps):
        z = model(x_nat + delta, branch="adv")
        model.zero_grad()
        nt_xent(z[:n], z[n:]).backward()
        with torch.no_grad():
            delta += ALPHA * delta.grad.sign()
            delta.clamp_(-EPS, EPS)
            delta.copy_((x_nat + delta).clamp(0, 1) - x_nat)
        delta.grad = None
    model.train()
    x_adv = (x_nat + delta).detach()
    return x_adv[:n], x_adv[n:]


def fastacl_pgd_contrastive(model, x1, x2, steps):
    return pgd_contrastive(model, x1, x2, EPS, ALPHA, steps=steps)


ATTACKS = {"ours": fastacl_pgd_contrastive, "published": published_pgd_contrastive}


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", list(ATTACKS))
def test_contrastive_attack_resnet18(benchmark, device, implementation):
    torch.manual_seed(0)
    model = resnet18_acl().to(device).train()
    n, steps = ATTACK_BATCH[device], ATTACK_STEPS[device]
    x1 = torch.rand(n, 3, 32, 32, device=device)
    x2 = torch.rand(n, 3, 32, 32, device=device)
    attack = ATTACKS[implementation]

    def run():
        attack(model, x1, x2, steps)
        _synchronize(device)

    benchmark.group = f"pgd_contrastive resnet18 32x32 {device}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        implementation=implementation,
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        images_per_view=n,
        steps=steps,
        images_per_s=round(2 * n / seconds, 2),
        image_passes_per_s=round(2 * n * steps / seconds, 2),
    )


def unfused_pgd_step(x_adv, grad, x_nat):
    """docs/acl-air.md section 3's canonical form as separate PyTorch ops (each one a pass over
    memory)."""
    delta = x_adv - x_nat
    delta = delta + ALPHA * torch.sign(grad)
    delta = torch.clamp(delta, -EPS, EPS)
    return torch.clamp(x_nat + delta, 0, 1)


def fused_pgd_step(x_adv, grad, x_nat):
    return pgd_step_(x_adv, grad, x_nat, EPS, ALPHA)


STEPS = {"fused": fused_pgd_step, "unfused": unfused_pgd_step}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", list(STEPS))
def test_pgd_step(benchmark, device, implementation):
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (256, 3, 32, 32)
    x_nat = torch.rand(shape, device=device, generator=generator)
    x_adv = (x_nat + EPS * torch.rand(shape, device=device, generator=generator)).clamp(0, 1)
    grad = torch.randn(shape, device=device, generator=generator)
    step = STEPS[implementation]

    def run():
        # Repeated steps from the same iterate keep every round's work identical; the fused op
        # reaches a fixed point after a few steps, which changes nothing about its cost.
        step(x_adv, grad, x_nat)
        _synchronize(device)

    benchmark.group = f"pgd_step [256, 3, 32, 32] fp32 {device}"
    benchmark.extra_info.update(implementation=implementation, elements=x_nat.numel())
    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
    if device == "cuda" and implementation == "fused":
        # one read of x_adv, grad, x_nat and one write against HBM (benchmarks/roofline.py);
        # the median includes the synchronize, so small batches read low
        fraction = fraction_of_bound(pgd_step_costs(shape), benchmark.stats.stats.median)
        benchmark.extra_info["fraction_of_h100_bound"] = round(fraction, 4)
        print(f"pgd_step fused {list(shape)}: {fraction:.1%} of the H100 SXM bound")
