"""RCS round cost vs selection quality as the pool pass gets cheaper: fewer PGD steps, bf16.

    python benchmarks/bench_rcs_pool_steps.py --checkpoint runs/demo/checkpoint.pt
    python benchmarks/bench_rcs_pool_steps.py                  # trains a 2-epoch demo model first

Three quarters or more of an RCS round is the PGD pass over the pool (docs/rcs.md section 5), so
the round's cost is roughly proportional to 1 + its PGD steps. This script runs one selection
round (granularity batch, k = 0.2, the demo preset's eps and batch) at the same model state and
the same minibatches for each number of pool PGD steps and each precision of the pass (fp32, and
bf16 autocast where the device has fast bf16), with two attack seeds each, and compares every
round with the default 5-step fp32 round (attack seed 0):

- gain correlation: Spearman correlation of the first pick's scores <r_e, v> over all elements;
- overlap: |S ∩ S_ref| / budget of the selected images (a random subset: k in expectation);
- the noise floor: the 5-step round with attack seed 1 against seed 0 (same everything else).

It also times one training epoch over the pool (fastacl's step, same batch) so that a round's
cost reads as a fraction of an epoch, and prints the amortised overhead for the paper's
schedule: a round every I = 20 epochs on k = 0.2 of the data, round / (I k epoch + round).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastacl import TrainConfig, train
from fastacl.coreset import select_coreset, validation_split
from fastacl.data import DeviceDataset, load_dataset
from fastacl.models import build_model_from_checkpoint
from fastacl.optim import LARS
from fastacl.pretrain import loss_for, train_step

FRACTION, INTERVAL = 0.2, 20  # k and I of the paper's CIFAR-10 schedule (docs/rcs.md section 4)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.double().argsort().argsort().double() for t in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] @ ranks[1]) / (ranks[0].norm() * ranks[1].norm()))


def epoch_seconds(model, dataset, pool, cfg: TrainConfig) -> float:
    """Wall time of one fastacl training epoch over the pool, on a copy of the model."""
    import copy

    model = copy.deepcopy(model).train()
    optimizer = LARS(model.parameters(), lr=cfg.optim.lr)
    loss_fn = loss_for(cfg)
    generator, attack_generator = torch.Generator().manual_seed(0), torch.Generator()
    order = pool[torch.randperm(pool.numel(), generator=generator)]
    start = time.perf_counter()
    for index in order.split(cfg.optim.batch_size):
        if index.numel() < 2:
            continue
        x1, x2, x_orig = dataset.views(index, 1.0, generator, cfg.data.interpolation)
        train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg, attack_generator)
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="a fastacl demo training checkpoint (default: train 2 epochs first)")
    parser.add_argument("--steps", type=int, nargs="*", default=[5, 3, 2, 1, 0])
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_options(method="acl", evaluate=False).resolve()  # the demo preset
    checkpoint = args.checkpoint
    if checkpoint is None:
        result = train(TrainConfig.from_options(method="acl", epochs=2, evaluate=False,
                                   out_dir="runs/rcs-pool-steps-model"))
        checkpoint = result.checkpoint
    model = build_model_from_checkpoint(checkpoint)
    images = load_dataset(cfg.data.dataset, split="train")[0]
    dataset = DeviceDataset(images)
    pool, validation = validation_split(images.shape[0], cfg.coreset.validation, seed=0)

    def round_with(steps: int, attack_seed: int, precision: str = "fp32"):
        return select_coreset(
            model, dataset, pool, validation, FRACTION, batch_size=cfg.optim.batch_size,
            eps=cfg.attack.eps,
            step_size=cfg.attack.step_size, attack_steps=steps, temperature=cfg.loss.temperature,
            generator=torch.Generator().manual_seed(0),  # the same minibatches every round
            attack_generator=torch.Generator().manual_seed(attack_seed),
            autocast_dtype=torch.bfloat16 if precision == "bf16" else None)

    epoch = epoch_seconds(model, dataset, pool, cfg)
    print(f"checkpoint {checkpoint}; one training epoch over the pool ({pool.numel()} images, "
          f"batch {cfg.optim.batch_size}, {torch.get_num_threads()} threads): {epoch:.1f} s")
    reference = round_with(5, 0)
    rows = []
    header = (f"{'pass':>4} {'pool PGD steps':>14} {'attack seed':>11} {'round s':>8} "
              f"{'pass s':>7} {'round / epoch':>13} {'amortised':>9} {'gain Spearman':>13} "
              f"{'overlap':>7}")
    print(header + "\n" + "-" * len(header))
    runs = [(p, steps, seed) for p in args.precisions for steps in args.steps for seed in (0, 1)]
    for precision, steps, attack_seed in runs:
        if (precision, steps, attack_seed) == ("fp32", 5, 0):
            selection = reference
        else:
            selection = round_with(steps, attack_seed, precision)
        fraction = selection.seconds / epoch
        shared = torch.isin(selection.indices, reference.indices).sum().item()
        row = {"precision": precision, "pool_steps": steps, "attack_seed": attack_seed,
               "round_seconds": selection.seconds,
               "pass_seconds": selection.details["pass_seconds"],
               "epoch_seconds": epoch, "round_per_epoch": fraction,
               "amortised": fraction / (INTERVAL * FRACTION + fraction),
               "gain_spearman": spearman(selection.initial_gains, reference.initial_gains),
               "overlap": shared / reference.budget}
        rows.append(row)
        print(f"{precision:>4} {steps:>14} {attack_seed:>11} {row['round_seconds']:>8.1f} "
              f"{row['pass_seconds']:>7.1f} {fraction:>13.2f} {row['amortised']:>9.3f} "
              f"{row['gain_spearman']:>13.3f} {row['overlap']:>7.2f}", flush=True)
    print(f"(a random subset overlaps the reference by {FRACTION:.2f} in expectation)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
