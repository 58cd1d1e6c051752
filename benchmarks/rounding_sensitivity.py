"""How far rounding-level changes move the demo's training (why one seed is not a verdict).

    python benchmarks/rounding_sensitivity.py            # demo preset, seed 0, 12 steps

Part 1: the first attack at initialisation, same weights, views and random start, computed
three ways that differ only in float rounding: the model as it is, its BN-folded mirror
(`fastacl.models.folded`), and the model in channels_last. Prints the share of adversarial
pixels that differ from the first way's.

Part 2: the training step with and without BN folding from the same initial weights, data and
RNG: per step, both runs' losses and the share of adversarial pixels that differ. Once a
rounding difference flips the sign of one input gradient, the LARS update (lr 5 in the demo)
carries it into every later step.
"""

from __future__ import annotations

import argparse
import copy

import torch

import fastacl.attacks as attacks
from fastacl import TrainConfig
from fastacl.data import DeviceDataset, load_dataset
from fastacl.models import build_model
from fastacl.models.folded import folded_for_attack
from fastacl.optim import LARS
from fastacl.pretrain import loss_for, train_step


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() > 1e-6).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_options(method="acl", evaluate=False, seed=args.seed).resolve()
    images = load_dataset(cfg.data.dataset, split="train")[0]
    dataset = DeviceDataset(images)
    torch.manual_seed(args.seed)
    initial = build_model(cfg.model.name, in_channels=images.shape[1]).train()

    g = torch.Generator().manual_seed(args.seed)
    x1, x2, _ = dataset.views(torch.randperm(images.shape[0], generator=g)[: cfg.optim.batch_size],
                              1.0, g)

    def attack(model, memory_format=torch.contiguous_format):
        views = [x.contiguous(memory_format=memory_format) for x in (x1, x2)]
        return torch.cat(attacks.pgd_contrastive(
            model, *views, eps=cfg.attack.eps, step_size=cfg.attack.step_size,
            steps=cfg.attack.steps,
            generator=torch.Generator().manual_seed(1)))

    reference = attack(initial)
    channels_last = copy.deepcopy(initial).to(memory_format=torch.channels_last)
    print(f"first attack at initialisation (seed {args.seed}), pixels that differ from the "
          f"model as it is: BN folded {differ(reference, attack(folded_for_attack(initial))):.4f}"
          f", channels_last {differ(reference, attack(channels_last, torch.channels_last)):.4f}")

    runs = {}
    for fold_bn in (False, True):
        step_cfg = TrainConfig.from_options(method="acl", evaluate=False, fold_bn=fold_bn).resolve()
        model = copy.deepcopy(initial)
        optimizer = LARS(model.parameters(), lr=step_cfg.optim.lr)
        loss_fn = loss_for(step_cfg)
        g, attack_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        views, losses = [], []
        original = attacks.pgd_contrastive

        def recording(*a, _original=original, _views=views, **k):  # keep each step's views
            out = _original(*a, **k)
            _views.append(torch.cat(out))
            return out

        attacks.pgd_contrastive = recording  # train_step imports it from the module per call
        try:
            for _ in range(args.steps):
                index = torch.randperm(images.shape[0], generator=g)[: step_cfg.optim.batch_size]
                v1, v2, originals = dataset.views(index, 1.0, g)
                terms = train_step(model, loss_fn, optimizer, originals, v1, v2, step_cfg,
                                   attack_generator)
                losses.append(float(terms["total"]))
        finally:
            attacks.pgd_contrastive = original
        runs[fold_bn] = (losses, views)
    print("\nstep  loss not folded  loss folded  adversarial pixels that differ")
    for step in range(args.steps):
        print(f"{step:>4} {runs[False][0][step]:>15.6f} {runs[True][0][step]:>12.6f} "
              f"{differ(runs[False][1][step], runs[True][1][step]):>31.4f}")


if __name__ == "__main__":
    main()
