"""Lower bounds on the time of fastacl's Triton kernels: the FLOPs, DRAM bytes and exponentials of
each kernel as its launcher runs it, against the peaks of an H100 SXM.

A kernel takes at least max(FLOPs / peak of its arithmetic, bytes / HBM bandwidth, exponentials /
special-function rate); kernels of one call run one after another, so a call's bound is the sum
over its kernels. Counted: tl.dot FLOPs (2 per multiply-add) and the elementwise arithmetic of
the row passes; bytes each buffer needs at least once (every read after the first assumed to hit
L2); exp / exp2. Not counted: the elementwise work around the similarity tiles (masks, scaling,
the online max), launch latency, and the limited parallelism of one-program reductions, so a
bound is optimistic and can be far from reachable at small N.

    python benchmarks/roofline.py                      the tables, as markdown
    python benchmarks/roofline.py --update docs/gpu-compile.md

The op benchmarks (bench_nt_xent.py, bench_sir_air.py, bench_attacks.py) print the fraction of
the bound they reach on a GPU: bound / measured time, 100 % being the peak.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Peaks:
    name: str
    bandwidth: float  # bytes / s
    flops: dict  # arithmetic -> FLOP / s
    exponentials: float  # exp2 / s (the special-function units)


# NVIDIA H100 datasheet, SXM5, dense (no sparsity); exponentials: FlashAttention-3 (Shah et al.,
# 2024, section 3.1): "3.9 TFLOPS of special functions" on the H100 SXM5.
H100_SXM = Peaks(
    "H100 SXM",
    bandwidth=3.35e12,
    flops={"fp32": 67e12, "tf32": 495e12, "bf16": 990e12},
    exponentials=3.9e12,
)

# The benchmarks' shapes (bench_nt_xent.py / bench_sir_air.py SIZES; bench_attacks.py test_pgd_step)
SIZES = [(n, d) for n in (512, 4096, 16384) for d in (128, 512)]
PGD_SHAPE = (256, 3, 32, 32)
ELEMENT_SIZE = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class KernelCost:
    kernel: str
    flops: float
    arithmetic: str  # "fp32" (CUDA cores), "tf32" or "bf16" (tensor cores)
    bytes: float
    exponentials: float = 0.0

    def seconds(self, peaks: Peaks = H100_SXM) -> float:
        return max(self.flops / peaks.flops[self.arithmetic], self.bytes / peaks.bandwidth,
                   self.exponentials / peaks.exponentials)  # fmt: skip

    def limit(self, peaks: Peaks = H100_SXM) -> str:
        times = {
            f"{self.arithmetic} FLOPs": self.flops / peaks.flops[self.arithmetic],
            "memory": self.bytes / peaks.bandwidth,
            "exp": self.exponentials / peaks.exponentials,
        }
        return max(times, key=times.get)


def bound_seconds(costs: list[KernelCost], peaks: Peaks = H100_SXM) -> float:
    return sum(cost.seconds(peaks) for cost in costs)


def nt_xent_costs(n: int, d: int, dtype: str, tf32: bool = False) -> list[KernelCost]:
    """Forward + backward of ops.nt_xent (kernels/nt_xent.py), R = 2N rows: two row
    normalisations, the forward, the backward (which recomputes the similarity tiles once per
    BLOCK_DV-wide slice of d), and the normalisation's backward. dtype "fp32" or "bf16"."""
    rows, size = 2 * n, ELEMENT_SIZE[dtype]
    dot = "bf16" if dtype == "bf16" else ("tf32" if tf32 else "fp32")
    slices = math.ceil(d / _backward_config(d, dtype, tf32)["BLOCK_DV"])
    normalize = KernelCost("_normalize_rows_kernel", 3 * rows * d, "fp32",
                           2 * rows * d * size + 4 * rows)  # fmt: skip
    return [
        normalize,
        KernelCost("_nt_xent_forward_kernel", 2 * rows**2 * d, dot, rows * d * size + 8 * rows,
                   rows**2),  # fmt: skip
        normalize,
        KernelCost("_nt_xent_backward_kernel", 2 * rows**2 * d * (slices + 1), dot,
                   rows * d * (size + 4) + 4 * rows, 2 * rows**2 * slices),  # fmt: skip
        KernelCost("_normalize_rows_backward_kernel", 6 * rows * d, "fp32",
                   rows * d * (2 * size + 4) + 4 * rows),  # fmt: skip
    ]


def sir_air_costs(op: str, n: int, d: int, dtype: str) -> list[KernelCost]:
    """Forward + backward of ops.sir / ops.air (kernels/sir_air.py): the similarity pass twice
    (forward, and again in the backward), the two one-program reductions, the gradient pass."""
    factors, inputs = (1, 3) if op == "sir" else (2, 5)
    size = ELEMENT_SIZE[dtype]
    # per row and column: SIR 2 dot products + 3 squared norms, AIR 4 + 5 (2 FLOPs each); the
    # gradient pass's multiply-adds: SIR 8, AIR 16
    similarity_flops = (10 if op == "sir" else 18) * n * d
    gradient_flops = (16 if op == "sir" else 32) * n * d
    small = 4 * n * (4 * factors + 1)  # the similarity and norm buffers (fp32)
    similarity = KernelCost("_similarity_kernel", similarity_flops, "fp32",
                            inputs * n * d * size + small)  # fmt: skip
    reduction = 2 * factors * n * 4
    return [
        similarity,
        KernelCost("_loss_kernel", 12 * factors * n, "fp32", reduction, 4 * factors * n),
        similarity,
        KernelCost("_coefficient_kernel", 20 * factors * n, "fp32", 2 * reduction,
                   6 * factors * n),  # fmt: skip
        KernelCost("_gradient_kernel", gradient_flops, "fp32",
                   2 * inputs * n * d * size + small + reduction),  # fmt: skip
    ]


def pgd_step_costs(shape=PGD_SHAPE, dtype: str = "fp32", norm: str = "linf") -> list[KernelCost]:
    """One ops.pgd_step_ (kernels/pgd_step.py): x_adv, grad and x_nat read once, x_adv written."""
    elements = math.prod(shape)
    flops = (6 if norm == "linf" else 12) * elements
    name = f"pgd_step_{norm}_kernel"
    return [KernelCost(name, flops, "fp32", 4 * elements * ELEMENT_SIZE[dtype])]


def _backward_config(d: int, dtype: str, tf32: bool) -> dict:
    """The config the backward launcher picks on an H100 (its slice width sets the recompute)."""
    import torch
    from fastacl.kernels.nt_xent import backward_config

    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    matmul.allow_tf32 = tf32  # what the launcher reads to pick the fp32 dot path
    try:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        return backward_config(torch_dtype, d, (9, 0))
    finally:
        matmul.allow_tf32 = allowed


def fraction_of_bound(costs: list[KernelCost], seconds: float) -> float:
    """bound / measured: 1.0 would be the H100 SXM's peak."""
    return bound_seconds(costs) / seconds


def _cases():
    """(benchmark, label, costs) for every case the op benchmarks time."""
    for path, dtype, tf32 in [("fp32 ieee", "fp32", False), ("fp32 tf32", "fp32", True),
                              ("bf16", "bf16", False)]:  # fmt: skip
        for n, d in SIZES:
            yield "nt_xent", f"{path}, N={n}, d={d}", nt_xent_costs(n, d, dtype, tf32)
    for op in ("sir", "air"):
        for dtype in ("fp32", "bf16"):
            for n, d in SIZES:
                yield op, f"{dtype}, N={n}, d={d}", sir_air_costs(op, n, d, dtype)
    yield "pgd_step", f"fp32 linf, {list(PGD_SHAPE)}", pgd_step_costs()


def _si(value: float) -> str:
    if value == 0:
        return "0 "
    for scale, prefix in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]:
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def summary_table() -> str:
    lines = [
        "| op (forward + backward) | case | FLOPs | bytes | exp | H100 SXM bound | bound by |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, label, costs in _cases():
        flops = sum(c.flops for c in costs)
        total_bytes = sum(c.bytes for c in costs)
        exps = sum(c.exponentials for c in costs)
        slowest = max(costs, key=lambda c: c.seconds())
        lines.append(f"| {op} | {label} | {_si(flops)}FLOP | {_si(total_bytes)}B | {_si(exps)}"
                     f" | {bound_seconds(costs) * 1e6:.1f} us | {slowest.kernel}: "
                     f"{slowest.limit()} |")  # fmt: skip
    return "\n".join(lines)


def kernel_table(n: int = 16384) -> str:
    """Per kernel and launch at one batch size (a kernel launched twice in a call is listed once,
    with its count)."""
    lines = [
        f"| op | case (N = {n}) | kernel | launches | FLOPs each | bytes each | exp each "
        "| bound each | bound by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, label, costs in _cases():
        if f"N={n}," not in label and op != "pgd_step":
            continue
        counts: dict[KernelCost, int] = {}
        for cost in costs:
            counts[cost] = counts.get(cost, 0) + 1
        for cost, count in counts.items():
            lines.append(f"| {op} | {label} | `{cost.kernel}` | {count} | {_si(cost.flops)}FLOP "
                         f"({cost.arithmetic}) | {_si(cost.bytes)}B | {_si(cost.exponentials)} | "
                         f"{cost.seconds() * 1e6:.2f} us | {cost.limit()} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", type=Path, help="write the tables into this markdown file")
    args = parser.parse_args(argv)
    tables = {"roofline-summary": summary_table(), "roofline-kernels": kernel_table()}
    if not args.update:
        for table in tables.values():
            print(table, end="\n\n")
        return
    document = args.update.read_text()
    for section, table in tables.items():
        begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
        if begin not in document or end not in document:
            raise SystemExit(f"{args.update} has no {begin} ... {end} block to replace")
        head, rest = document.split(begin, 1)
        document = f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}"
    args.update.write_text(document)


if __name__ == "__main__":
    main()
