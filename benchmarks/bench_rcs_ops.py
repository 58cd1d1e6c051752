"""RCS hot loops on the CPU: the C++ extension ("ours") against the PyTorch reference ("torch"),
same inputs, same run (docs/rcs.md section 5: at sample granularity these dominate selection).

    python -m pytest benchmarks/bench_rcs_ops.py        pytest-benchmark, small pick counts
    python benchmarks/bench_rcs_ops.py [--threads N] [--picks 5000] [--budget 20]   a table
    python benchmarks/bench_rcs_ops.py --skip-project --greedy-dtypes fp32 --budget 0   all picks

- rcs_project: per-sample projections of the ResNet-18 head (3 Linear layers 512 -> 512, fc1 with
  bias, so D = 1537 in rowmean mode) for n = 50,000 samples: H and Delta per layer, one row per
  sample; also kronecker (k1 = k2 = 16) and the per-sample sum of 4 rows each (n = 200,000 rows:
  both views, natural and adversarial).
- greedy core: N = 50,000 candidates x D = 1537 (CIFAR-10 at sample granularity), `picks` greedy
  picks, v refreshed after each by a cheap head-only-sized op (a rank-one nudge towards the pick:
  no host synchronisation, like the cached refresh). Each pick reads R once, so the loop is
  memory-bound; the table gives seconds for the picks run and the per-pick time. `--budget`
  caps the seconds per row (the rest of the picks are extrapolated and marked so); `--budget 0`
  runs every pick.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from fastacl import ops

N_SAMPLES = 50_000
HEAD = [(512, 512)] * 3  # (in, out) of fc1, fc2, fc3
HEAD_BIAS = [True, False, False]
KRONECKER_K = 16
GREEDY_N, GREEDY_D = 50_000, 1537
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLEMENTATIONS = {"ours": "cpp", "torch": "torch"}


def _head_cache(n, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, i, generator=generator).to(dtype) for i, _ in HEAD]
    grad_outputs = [torch.randn(n, o, generator=generator).to(dtype) for _, o in HEAD]
    return inputs, grad_outputs


def _projections(seed=1):
    generator = torch.Generator().manual_seed(seed)
    k = KRONECKER_K
    return [(torch.randn(k, o, generator=generator) / k**0.5,
             torch.randn(k, i, generator=generator) / k**0.5) for i, o in HEAD]


def _project_call(mode, dtype, rows_per_sample=1):
    inputs, grad_outputs = _head_cache(N_SAMPLES * rows_per_sample, dtype)
    projections = _projections() if mode == "kronecker" else None
    segment_ids = None
    if rows_per_sample > 1:
        segment_ids = torch.arange(N_SAMPLES).repeat(rows_per_sample)
    num_segments = N_SAMPLES if rows_per_sample > 1 else None
    return lambda: ops.rcs_project(inputs, grad_outputs, mode, HEAD_BIAS, projections,
                                   segment_ids, num_segments)


def _greedy_inputs(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    R = torch.randn(GREEDY_N, GREEDY_D, generator=generator).to(dtype)
    v = torch.randn(GREEDY_D, generator=generator)
    return R, v


def _greedy_loop(R, v, picks, budget_s=0.0):
    """`picks` greedy picks with a v refresh each; returns (picks run, seconds, indices)."""
    taken = torch.zeros(R.shape[0], dtype=torch.bool)
    picked = []
    start = time.perf_counter()
    for _ in range(picks):
        index = ops.greedy_pick(R, v, taken)
        picked.append(index)
        # Cheap refresh: move v towards the picked row (a stand-in for the head-only update).
        v = 0.999 * v + 1e-3 * R.index_select(0, index.clamp_min(0).view(1))[0].float()
        if budget_s and time.perf_counter() - start > budget_s:
            break
    seconds = time.perf_counter() - start
    return len(picked), seconds, torch.stack(picked)


# --------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(autouse=True)
def _extension_loaded():
    if ops.extension_status()["state"] == "unavailable":
        pytest.skip("the C++ extension is unavailable: " + ops.extension_status()["detail"])


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("mode, dtype", [("rowmean", "fp32"), ("rowmean", "bf16"),
                                         ("kronecker", "fp32")])
def test_rcs_project_resnet18_head(benchmark, implementation, mode, dtype):
    call = _project_call(mode, DTYPES[dtype])
    benchmark.extra_info.update(implementation=implementation, mode=mode, dtype=dtype,
                                n=N_SAMPLES, threads=torch.get_num_threads())
    with ops.use_backend(IMPLEMENTATIONS[implementation]):
        benchmark.pedantic(call, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_greedy_picks(benchmark, implementation):
    R, v = _greedy_inputs(torch.float32)
    picks = 20
    benchmark.extra_info.update(implementation=implementation, N=GREEDY_N, D=GREEDY_D,
                                picks=picks, threads=torch.get_num_threads())
    with ops.use_backend(IMPLEMENTATIONS[implementation]):
        benchmark.pedantic(lambda: _greedy_loop(R, v, picks), rounds=3, warmup_rounds=1)


# --------------------------------------------------------------------------------------------
# Table


def _seconds(call, repeats):
    call()  # warm-up (and first-touch of the output pages)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    import datetime
    import platform
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--picks", type=int, default=5000)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per greedy row before extrapolating (0: run every pick)")
    parser.add_argument("--greedy-dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--skip-project", action="store_true", help="only the greedy table")
    parser.add_argument("--skip-segments", action="store_true",
                        help="leave out the 200,000-row segment-sum row (2.4 GB of inputs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    status = ops.extension_status()
    if status["state"] == "unavailable":
        raise SystemExit(f"the C++ extension is unavailable: {status['detail']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"RCS ops on the CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)), torch {torch.__version__}, extension {status['state']}, "
          f"commit {commit or '?'}, {datetime.date.today()}")

    if not args.skip_project:
        _project_table(args)
    _greedy_table(args)


def _project_table(args) -> None:
    print(f"\nrcs_project, ResNet-18 head (3 x 512->512, fc1 bias), {N_SAMPLES:,} samples; "
          f"median (min) of {args.repeats} runs, seconds")
    print(f"{'case':<44} | {'ours':>15} | {'torch':>15} | {'torch/ours':>10}")
    cases = [("rowmean fp32 (D=1537)", "rowmean", "fp32", 1),
             ("rowmean bf16 (D=1537)", "rowmean", "bf16", 1),
             (f"kronecker k={KRONECKER_K} fp32 (D=784)", "kronecker", "fp32", 1)]
    if not args.skip_segments:
        cases.append(("rowmean fp32, 4 rows/sample summed", "rowmean", "fp32", 4))
    for label, mode, dtype, rows_per_sample in cases:
        call = _project_call(mode, DTYPES[dtype], rows_per_sample)
        result = {}
        for name, backend in IMPLEMENTATIONS.items():
            with ops.use_backend(backend):
                result[name] = _seconds(call, args.repeats)
        del call
        ours, theirs = result["ours"], result["torch"]
        print(f"{label:<44} | {ours[0]:>6.3f} ({ours[1]:>6.3f}) | "
              f"{theirs[0]:>6.3f} ({theirs[1]:>6.3f}) | {theirs[0] / ours[0]:>9.2f}x")


def _greedy_table(args) -> None:
    print(f"\ngreedy core: N={GREEDY_N:,} x D={GREEDY_D}, {args.picks:,} picks, v refreshed each "
          "pick; seconds (* = extrapolated from the picks run within the budget)")
    print(f"{'R dtype':<8} | {'impl':<6} | {'picks run':>9} | {'s run':>7} | {'ms/pick':>8} | "
          f"{'s for all':>10}")
    for dtype_name in args.greedy_dtypes:
        R, v = _greedy_inputs(DTYPES[dtype_name])
        indices = {}
        for name, backend in IMPLEMENTATIONS.items():
            with ops.use_backend(backend):
                _greedy_loop(R, v, 2)  # warm-up
                done, seconds, indices[name] = _greedy_loop(R, v, args.picks, args.budget)
            per_pick = seconds / done
            total = f"{per_pick * args.picks:>9.1f}" + ("*" if done < args.picks else " ")
            print(f"{dtype_name:<8} | {name:<6} | {done:>9,} | {seconds:>7.1f} | "
                  f"{per_pick * 1e3:>8.2f} | {total:>10}")
        common = min(len(indices["ours"]), len(indices["torch"]))
        agree = bool(torch.equal(indices["ours"][:common], indices["torch"][:common]))
        print(f"{'':<8}   same picks in the first {common:,}: {agree}")
        del R


if __name__ == "__main__":
    main()
