"""NT-Xent on the GPU, forward + backward: the tiled Triton op ("ours") against the plain PyTorch
formulation ("torch": nt_xent_reference under autograd, the 2N x 2N logits in memory).

    python -m pytest benchmarks/bench_nt_xent.py      pytest-benchmark; skips without CUDA
    python benchmarks/bench_nt_xent.py                a table (triton.testing.do_bench medians)

Peak memory is what one forward + backward allocates above the inputs (torch.cuda peak stats),
in benchmark.extra_info["peak_mib"]. fp32 runs are full fp32 on both sides (no TF32) unless
torch.backends.cuda.matmul.allow_tf32 is set, which the kernels follow. "of bound" is the H100 SXM
lower bound of the kernels' work (benchmarks/roofline.py, docs/gpu-compile.md) over the time
"ours" took: 100 % would be the peak. No CPU suite: the CPU path is the plain formulation itself.
"""

from __future__ import annotations

import pytest
import torch

try:  # run as a script (python benchmarks/bench_x.py) or collected by pytest from the root
    from gpu_measure import peak_mib, provenance
    from roofline import bound_seconds, fraction_of_bound, nt_xent_costs
except ImportError:
    from benchmarks.gpu_measure import peak_mib, provenance
    from benchmarks.roofline import bound_seconds, fraction_of_bound, nt_xent_costs
from fastacl import ops
from fastacl.ops.nt_xent import nt_xent_reference

SIZES = [(n, d) for n in (512, 4096, 16384) for d in (128, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 0.5


def _ours(z1, z2):
    with ops.use_backend("triton"):  # forward and backward both on the kernels
        ops.nt_xent(z1, z2, TEMPERATURE).backward()


def _torch(z1, z2):
    nt_xent_reference(z1, z2, TEMPERATURE).backward()


IMPLEMENTATIONS = {"ours": _ours, "torch": _torch}


def _costs(n, d, dtype):
    """The kernels' work, on the dot path the launchers take (TF32 where torch allows it)."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return nt_xent_costs(n, d, name, tf32=torch.backends.cuda.matmul.allow_tf32)


def _inputs(n, d, dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(n, d, device="cuda", dtype=dtype, generator=generator).requires_grad_()
        for _ in range(2)
    ]


def _step(implementation, z1, z2):
    """One forward + backward, from no gradients (the same allocations every call)."""

    def step():
        z1.grad = z2.grad = None
        implementation(z1, z2)

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n, d", SIZES, ids=[f"N{n}-d{d}" for n, d in SIZES])
def test_nt_xent_forward_backward(benchmark, implementation, dtype, n, d):
    z1, z2 = _inputs(n, d, DTYPES[dtype])
    step = _step(IMPLEMENTATIONS[implementation], z1, z2)
    try:
        peak = peak_mib(step)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{implementation} at N={n}, d={d}, {dtype} does not fit on this GPU")

    def synchronized_step():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        implementation=implementation,
        n=n,
        d=d,
        dtype=dtype,
        peak_mib=round(peak, 1),
    )
    benchmark.pedantic(synchronized_step, rounds=10, warmup_rounds=2)
    if implementation == "ours":
        fraction = fraction_of_bound(_costs(n, d, DTYPES[dtype]), benchmark.stats.stats.median)
        benchmark.extra_info["fraction_of_h100_bound"] = round(fraction, 4)
        print(f"nt_xent ours {dtype} N={n} d={d}: {fraction:.1%} of the H100 SXM bound")


def main() -> None:
    import triton.testing

    if not torch.cuda.is_available():
        raise SystemExit("bench_nt_xent needs a CUDA GPU")
    print(f"NT-Xent forward + backward, t = {TEMPERATURE}: {provenance()}")
    header = ("dtype", "N", "d", "ms ours", "ms torch", "torch/ours", "MiB ours", "MiB torch",
              "us bound", "of bound")  # fmt: skip
    print(" | ".join(f"{h:>9}" for h in header))
    for dtype_name, dtype in DTYPES.items():
        for n, d in SIZES:
            ms, mib = {}, {}
            for name, implementation in IMPLEMENTATIONS.items():
                z1, z2 = _inputs(n, d, dtype)
                step = _step(implementation, z1, z2)
                try:
                    mib[name] = peak_mib(step)
                    ms[name] = triton.testing.do_bench(step, return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    ms[name] = mib[name] = float("nan")
                del z1, z2, step
                torch.cuda.empty_cache()
            costs = _costs(n, d, dtype)
            row = (
                dtype_name,
                n,
                d,
                ms["ours"],
                ms["torch"],
                ms["torch"] / ms["ours"],
                mib["ours"],
                mib["torch"],
                bound_seconds(costs) * 1e6,
                f"{fraction_of_bound(costs, ms['ours'] / 1e3):.1%}",
            )
            print(" | ".join(f"{v:>9.3f}" if isinstance(v, float) else f"{v:>9}" for v in row))


if __name__ == "__main__":
    main()
