"""Where the time of one ACL-AIR training step goes: torch.profiler over the baseline step and
each fastacl variant, grouped into a few categories.

    python benchmarks/profile_step.py [--case cpu-small-mnist] [--threads 1] [--steps 2]
        [--variants fp32 fp32+channels_last bf16+channels_last bf16+channels_last+compile]

Prints two markdown tables: per implementation, milliseconds per step in each phase of the step
(data, attack, training forwards + losses, backward, optimiser: the record_function ranges of
fastacl.pretrain.train_step and baseline_step) with the step's wall time, and milliseconds per
step by op category (self time of the ops: CPU time on the CPU, kernel time on CUDA).
Categories are by op name, so they read the same for eager and compiled code: convolution
forward / backward (oneDNN, cuDNN), batch norm, other elementwise (ReLU, add, copies, casts:
what torch.compile fuses), fastacl's ops (NT-Xent, SIR / AIR, the PGD update) and the rest
(the optimiser's and the augmentation's ops are mostly elementwise; their phases say how long
they take). Profiling adds
overhead; the benchmark (bench_train_step.py), not this, gives the throughput figures.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_train_step import (
    CPU_CASES,
    FP32,
    GPU_CASES,
    case_images,
    device_name,
    make_runner,
    parse_variant,
)
from torch.profiler import ProfilerActivity, profile

CATEGORIES = ("conv forward", "conv backward", "batch norm", "elementwise", "fastacl ops",
              "other")

_ELEMENTWISE = ("relu", "threshold", "clamp", "add", "mul", "copy", "to_copy", "cat", "fill",
                "zero", "div", "sub", "where", "sign", "cpp_fused", "triton_", "fused_")


def category(name: str) -> str:
    """The category of one profiler event (an op or a compiled kernel) by its name."""
    lowered = name.lower()
    if lowered.startswith("fastacl::"):
        return "fastacl ops"
    if "convolution_backward" in lowered or "conv_backward" in lowered:
        return "conv backward"
    if "convolution" in lowered or "mkldnn_conv" in lowered or "cudnn" in lowered \
            or "conv2d" in lowered:
        return "conv forward"
    if "batch_norm" in lowered or "bn_" in lowered:
        return "batch norm"
    if any(key in lowered for key in _ELEMENTWISE):
        return "elementwise"
    return "other"


PHASES = ("data", "attack", "forward", "backward", "optimizer")


def profile_runner(runner, steps: int, cuda: bool):
    """(ms per step per op category, ms per step per phase, wall ms per step) over `steps`
    profiled steps. Phases are the record_function ranges "fastacl.<phase>" that
    fastacl.pretrain.train_step, baseline_step and the runners open (inclusive CPU time)."""
    runner.step()  # warm-up: compile, oneDNN / cuDNN set-up, loader workers
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        wall = (time.perf_counter() - start) * 1e3 / steps
    categories: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("fastacl.") and event.key[len("fastacl."):] in PHASES:
            phases[event.key[len("fastacl."):]] += event.cpu_time_total / 1e3 / steps
            continue
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us:
            categories[category(event.key)] += self_us / 1e3 / steps
    return dict(categories), dict(phases), wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    known = {c.name: c for c in (*CPU_CASES, *GPU_CASES)}
    parser.add_argument("--case", default="cpu-small-mnist", choices=sorted(known))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="fastacl variants (default: the case's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = known[args.case]
    cuda = case.device == "cuda"
    variants = ([parse_variant(v) for v in args.variants] if args.variants
                else list(case.variants))
    images = case_images(case)
    rows = []
    for implementation, variant in [("baseline", FP32)] + [("fastacl", v) for v in variants]:
        runner = make_runner(implementation, case, images, variant)
        categories, phases, wall = profile_runner(runner, args.steps, cuda)
        runner.close()
        label = "baseline (fp32)" if implementation == "baseline" else f"fastacl {variant.label}"
        rows.append((label, categories, phases, wall))
        print(f"profiled {label}: {wall:.0f} ms per step", flush=True)
    print(f"\n{device_name(case)}, {case.model}, batch {case.batch}, threads "
          f"{torch.get_num_threads()}, {args.steps} profiled steps after 1 warm-up\n")
    print("Phases, ms per step (CPU time inside each range" + (
        "; on CUDA this is launch time, see the kernel table" if cuda else "") + "):\n")
    print("| implementation | " + " | ".join(PHASES) + " | step wall ms |")
    print("|---" * (len(PHASES) + 2) + "|")
    for label, _, phases, wall in rows:
        cells = [f"{phases.get(name, 0.0):.0f}" for name in PHASES]
        print(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} |")
    unit = "kernel ms" if cuda else "CPU ms"
    print(f"\nOps by category, {unit} per step (self time):\n")
    print("| implementation | " + " | ".join(CATEGORIES) + " |")
    print("|---" * (len(CATEGORIES) + 1) + "|")
    for label, categories, _, _ in rows:
        cells = [f"{categories.get(name, 0.0):.0f}" for name in CATEGORIES]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
