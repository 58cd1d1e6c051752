"""ACL on the demo set: full pool vs RCS vs a random subset at k = 0.2 (docs/rcs.md).

    python benchmarks/bench_coreset_demo.py                      full x 1 seed, RCS and random x 3
    python benchmarks/bench_coreset_demo.py --full-seeds 0 1 2   full ACL over 3 seeds too
    python benchmarks/bench_coreset_demo.py --table runs/coreset-demo   reprint a finished table

Every run is `fastacl.train` with the demo preset (mnist5k, resnet18-small, 5 epochs, eps 0.15)
and its closing quick evaluation (SLF linear probe, clean and PGD-20 accuracy on 500 test images).
The validation set U (1%, drawn by the seed) is held out of training in all three. With E = 5 the
epoch-relative RCS schedule is warm-up max(1, round(E/10)) = 1 epoch on the full pool, then a
selection every max(1, round(E/50)) = 1 epoch (RCS) or one draw (random) for epochs 2-5.
Runs are interleaved by seed (full, RCS, random, RCS, random, ...) so that a partial table is
balanced; each finished run is appended to <out>/results.jsonl and the table is printed after
every run. Times are wall-clock seconds on this machine: "train" is training plus selection,
"total" adds the closing evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

FRACTION = 0.2
LABELS = {"full": "ACL (full pool)", "rcs": "ACL + RCS, k = 0.2", "random": "ACL + Random, k = 0.2"}


def _runs(full_seeds, seeds):
    runs = [("full", seed) for seed in full_seeds]
    for seed in seeds:
        runs += [("rcs", seed), ("random", seed)]
    # Interleave: full seed s first where it exists, then RCS / random of each seed.
    order = []
    for seed in sorted(set(full_seeds) | set(seeds)):
        order += [run for run in runs if run[1] == seed]
    return order


def run_one(kind: str, seed: int, out: Path) -> dict:
    import fastacl

    overrides = {} if kind == "full" else {"coreset": kind, "coreset_fraction": FRACTION}
    start = time.perf_counter()
    result = fastacl.train(out_dir=str(out / f"{kind}-seed{seed}"), seed=seed, **overrides)
    total = time.perf_counter() - start
    summary = result.summary
    return {"kind": kind, "seed": seed, "standard_accuracy": summary["standard_accuracy"],
            "robust_accuracy": summary["robust_accuracy"], "attack": summary["attack"],
            "train_seconds": summary["train_seconds"],
            "selection_seconds": summary.get("selection_seconds", 0.0), "total_seconds": total}


def _mean_sd(values, scale=1.0, digits=2):
    values = [scale * v for v in values]
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    sd_text = f"{sd:.{digits}f}" if len(values) > 1 else "n/a"
    return f"{mean:.{digits}f} +- {sd_text}"


def table(records: list[dict]) -> str:
    lines = ["| run | seeds | standard acc. (%) | robust acc. (%, PGD-20) | train time (s) | "
             "of which selection (s) | total with eval (s) |",
             "|---|---|---|---|---|---|---|"]
    for kind in ("full", "rcs", "random"):
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        lines.append(
            f"| {LABELS[kind]} | {len(rows)} | "
            f"{_mean_sd([r['standard_accuracy'] for r in rows], 100)} | "
            f"{_mean_sd([r['robust_accuracy'] for r in rows], 100)} | "
            f"{_mean_sd([r['train_seconds'] for r in rows], digits=0)} | "
            f"{_mean_sd([r['selection_seconds'] for r in rows], digits=0)} | "
            f"{_mean_sd([r['total_seconds'] for r in rows], digits=0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/coreset-demo", help="run folders + results.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the RCS and random runs")
    parser.add_argument("--full-seeds", type=int, nargs="*", default=[0],
                        help="seeds of the full-pool ACL runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--table", metavar="DIR", default=None,
                        help="only print the table of DIR/results.jsonl")
    args = parser.parse_args()
    if args.table is not None:
        path = Path(args.table) / "results.jsonl"
        print(table([json.loads(line) for line in path.read_text().splitlines()]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = ([json.loads(line) for line in results_path.read_text().splitlines()]
            if results_path.exists() else [])
    finished = {(r["kind"], r["seed"]) for r in done}
    print(f"device: cpu, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind, seed in _runs(args.full_seeds, args.seeds):
        if (kind, seed) in finished:  # a restarted benchmark continues where it stopped
            continue
        record = run_one(kind, seed, out)
        done.append(record)
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"\n[{kind} seed {seed}] done in {record['total_seconds']:.0f} s\n" + table(done),
              flush=True)
    print("\n" + table(done))


if __name__ == "__main__":
    main()
