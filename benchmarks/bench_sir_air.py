"""SIR and AIR on the GPU, forward + backward: the fused Triton ops ("ours") against the plain
PyTorch formulation ("torch": sir_reference / air_reference under autograd).

    python -m pytest benchmarks/bench_sir_air.py      pytest-benchmark; skips without CUDA
    python benchmarks/bench_sir_air.py                a table (triton.testing.do_bench medians)

Peak memory is what one forward + backward allocates above the inputs (torch.cuda peak stats),
in benchmark.extra_info["peak_mib"]. Both forms cost the same; the exact one is timed. "of bound"
is the H100 SXM lower bound of the kernels' work (benchmarks/roofline.py, docs/gpu-compile.md)
over the time "ours" took: 100 % would be the peak. No CPU suite: the CPU path is the reference
itself.
"""

from __future__ import annotations

import pytest
import torch

try:  # run as a script (python benchmarks/bench_x.py) or collected by pytest from the root
    from gpu_measure import peak_mib, provenance
    from roofline import bound_seconds, fraction_of_bound, sir_air_costs
except ImportError:
    from benchmarks.gpu_measure import peak_mib, provenance
    from benchmarks.roofline import bound_seconds, fraction_of_bound, sir_air_costs
from fastacl import ops
from fastacl.ops.sir_air import air_reference, sir_reference

SIZES = [(n, d) for n in (512, 4096, 16384) for d in (128, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 0.5

# op -> (number of [N, d] inputs, ours, the plain PyTorch way)
OPS = {"sir": (3, ops.sir, sir_reference), "air": (5, ops.air, air_reference)}


def _inputs(count, n, d, dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(n, d, device="cuda", dtype=dtype, generator=generator).requires_grad_()
        for _ in range(count)
    ]


def _step(op, implementation, inputs):
    """One forward + backward, from no gradients (the same allocations every call)."""
    _, ours, reference = OPS[op]

    def step():
        for z in inputs:
            z.grad = None
        if implementation == "ours":
            with ops.use_backend("triton"):  # forward and backward both on the kernels
                ours(*inputs, temperature=TEMPERATURE).backward()
        else:
            reference(*inputs, TEMPERATURE).backward()

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["ours", "torch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n, d", SIZES, ids=[f"N{n}-d{d}" for n, d in SIZES])
@pytest.mark.parametrize("op", list(OPS))
def test_sir_air_forward_backward(benchmark, op, implementation, dtype, n, d):
    step = _step(op, implementation, _inputs(OPS[op][0], n, d, DTYPES[dtype]))
    peak = peak_mib(step)

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        op=op,
        implementation=implementation,
        n=n,
        d=d,
        dtype=dtype,
        peak_mib=round(peak, 2),
    )
    benchmark.pedantic(synchronized_step, rounds=20, warmup_rounds=3)
    if implementation == "ours":
        costs = sir_air_costs(op, n, d, dtype)
        fraction = fraction_of_bound(costs, benchmark.stats.stats.median)
        benchmark.extra_info["fraction_of_h100_bound"] = round(fraction, 4)
        print(f"{op} ours {dtype} N={n} d={d}: {fraction:.1%} of the H100 SXM bound")


def main() -> None:
    import triton.testing

    if not torch.cuda.is_available():
        raise SystemExit("bench_sir_air needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    print(f"SIR / AIR forward + backward, t = {TEMPERATURE}, exact form: {provenance()}")
    header = ("device", "op", "dtype", "N", "d", "ms ours", "ms torch", "torch/ours",
              "MiB ours", "MiB torch", "us bound", "of bound")  # fmt: skip
    print(" | ".join(f"{h:>9}" for h in header))
    for op, (count, _, _) in OPS.items():
        for dtype_name, dtype in DTYPES.items():
            for n, d in SIZES:
                ms, mib = {}, {}
                for implementation in ("ours", "torch"):
                    step = _step(op, implementation, _inputs(count, n, d, dtype))
                    mib[implementation] = peak_mib(step)
                    ms[implementation] = triton.testing.do_bench(step, return_mode="median")
                    del step
                    torch.cuda.empty_cache()
                costs = sir_air_costs(op, n, d, dtype_name)
                row = (device, op, dtype_name, n, d, ms["ours"], ms["torch"],
                       ms["torch"] / ms["ours"], mib["ours"], mib["torch"],
                       bound_seconds(costs) * 1e6,
                       f"{fraction_of_bound(costs, ms['ours'] / 1e3):.1%}")  # fmt: skip
                print(" | ".join(f"{v:>9.3f}" if isinstance(v, float) else f"{v:>9}" for v in row))


if __name__ == "__main__":
    main()
