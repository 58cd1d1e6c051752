"""Is the training attack still strong against a trained encoder? (gradient masking check)

    python benchmarks/attack_strength.py --checkpoint runs/acl-mnist5k-...
    python benchmarks/attack_strength.py --checkpoint RUN --attacks 5x0.05,5x0.02,20x0.0125

Takes one batch of two augmented views from the run's training set and prints the contrastive
loss (NT-Xent at the run's temperature, through the branch the attack uses) clean and after
contrastive PGD (fastacl.attacks.pgd_contrastive) at the run's eps, for several
(steps x step size) pairs, each from `--seeds` random starts. A setting whose loss stays far
below a finer attack's is one the encoder has learned to defeat without being robust: training
with it teaches gradient masking, not robustness (docs/backbones.md, ViTs). The run's own
training attack is always included. A DynACL run with a momentum encoder is checked through its
online encoder alone (both views), not the pair its training attack used.
"""

from __future__ import annotations

import argparse

import torch

from fastacl.attacks import pgd_contrastive
from fastacl.data import DeviceDataset, load_dataset
from fastacl.models import build_model_from_checkpoint, load_checkpoint
from fastacl.ops import nt_xent


def parse_attacks(text: str) -> list[tuple[int, float]]:
    """'5x0.05,20x0.0125' -> [(5, 0.05), (20, 0.0125)]."""
    pairs = []
    for item in text.split(","):
        steps, _, step_size = item.partition("x")
        pairs.append((int(steps), float(step_size)))
    return pairs


def main(argv=None) -> dict:
    """Prints the table; returns {"clean": loss, "attacked": {(steps, step_size): [losses]}}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint.pt")
    parser.add_argument("--attacks", default="5x0.05,5x0.03,5x0.02,10x0.02,20x0.0125",
                        help="comma-separated STEPSxSTEP_SIZE pairs (pixel units)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2, help="random starts per setting")
    parser.add_argument("--data-dir", default=None, help="default: the run's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(args.checkpoint)
    extra = checkpoint.get("extra") or {}
    if "train_state" not in extra:
        raise SystemExit(f"{args.checkpoint}: not a fastacl training checkpoint (the check needs "
                         "the run's attack, loss and data)")
    config = extra["train_state"]["config"]  # resolved: every default filled in
    attack = extra["attack"]
    branch = "normal" if config["method"] == "cl" else "adv"
    temperature = config["loss"]["temperature"]
    model = build_model_from_checkpoint(checkpoint).eval()

    data = config["data"]
    images = load_dataset(data["dataset"], args.data_dir or data["data_dir"], split="train")[0]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randperm(images.shape[0], generator=generator)[: args.batch_size]
    x1, x2, _ = DeviceDataset(images).views(batch, 1.0, generator,
                                            interpolation=data["interpolation"])
    n = x1.shape[0]

    def loss(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            z = model(torch.cat([a, b]), branch=branch)
        return nt_xent(z[:n], z[n:], temperature).item()

    settings = parse_attacks(args.attacks)
    own = (attack["steps"], attack["step_size"])
    if own not in settings:
        settings.insert(0, own)
    print(f"{config['method']} {checkpoint['model_spec']['name']}, eps {attack['eps']:.4g}, "
          f"{n} image pairs, NT-Xent at temperature {temperature}, branch {branch!r}")
    print(f"| attack | NT-Xent ({args.seeds} random starts) |\n|---|---|")
    clean = loss(x1, x2)
    print(f"| clean | {clean:.3f} |")
    attacked = {}
    for steps, step_size in settings:
        values = attacked[steps, step_size] = []
        for seed in range(args.seeds):
            a, b = pgd_contrastive(model, x1, x2, eps=attack["eps"], step_size=step_size,
                                   steps=steps, branch=branch, temperature=temperature,
                                   generator=torch.Generator().manual_seed(seed))
            values.append(loss(a, b))
        mark = " (the run's)" if (steps, step_size) == own else ""
        print(f"| {steps} x {step_size:g}{mark} | {', '.join(f'{v:.3f}' for v in values)} |",
              flush=True)
    return {"clean": clean, "attacked": attacked}


if __name__ == "__main__":
    main()
