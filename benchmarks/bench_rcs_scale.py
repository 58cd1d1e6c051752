"""The RCS greedy core at ImageNet scale (docs/rcs.md section 5): one selection round's projection
pass and greedy picks at sample granularity, N = 1,281,167 elements, on the CPU, through the code
the round runs.

    OMP_NUM_THREADS=2 python benchmarks/bench_rcs_scale.py            # full size, ~8.5 GB, minutes
    python benchmarks/bench_rcs_scale.py --images 20000 --picks 5      # smoke test

What runs (synthetic inputs, real code; no model, no PGD: the pool pass's attacks and backbone
are not timed here, bench_rcs_pool_steps.py does that):
- the projection pass: the pool's minibatches (`fastacl.coreset._minibatches`, 512 images), each
  one random (H, Delta) pair per head layer and row (4 rows per image: both views, natural and
  adversarial) through `fastacl.coreset._minibatch_candidates`, the round's own per-minibatch
  step (the extension's `rcs_project` with the per-sample segment sum, times the minibatch size);
  its projections are written into one preallocated N x D matrix. The pairs are drawn for a few
  minibatches and reused (the op's time does not depend on the values); the round itself keeps
  every pair, which at this N does not fit here (the table says how much it would take).
- the greedy pick: `fastacl.ops.greedy_pick` (the fused masked mat-vec + argmax of the C++
  extension, the call `fastacl.coreset._greedy` makes each pick) on the whole N x D matrix and on
  one chunk's rows, `--picks` picks each, timed one by one.
- the refresh of v between picks: `fastacl.coreset._greedy` itself (pick, G_e rebuilt from the
  pick's rows, simulated step, v from U's frozen features: the "cached" refresh without a
  re-attack) on one real chunk of candidates (100 minibatches of 512, built by the round's
  `_minibatch_candidates` + `_Candidates.concatenate`), with a fastacl ProjectionHead and U's
  features random, |U| = 0.5% of the images (the ImageNet split).
- the totals for all round(k N) picks are extrapolated from the picks timed (per-pick cost times
  the number of picks; later picks skip up to k of the rows, so this is an upper bound within k),
  unchunked and in chunks (`_chunks`, `_chunk_budgets`: the shares the round uses); and the GPU
  figures are extrapolated from the bytes each pick reads at an assumed memory bandwidth. Neither
  is a measurement.

Prints markdown tables (CPU model, threads, commit, date first). `main(argv)` returns the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import statistics
import subprocess
import time

import torch
from torch import nn

from fastacl import coreset, ops
from fastacl.coreset import coreset_budget
from fastacl.models import ProjectionHead

IMAGENET_IMAGES = 1_281_167  # ImageNet-1K's training split
VALIDATION_FRACTION = 0.005  # U on ImageNet (docs/rcs.md section 1)
RELEASE_HEAD = (640, 640)  # the authors' ImageNet head: fc1 640 -> 640 (bias), fc2 640 -> 640
# Peak memory bandwidth assumed for the GPU extrapolation (vendor figures), bytes/s.
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GB = 1e9


class _HeadModel(nn.Module):
    """What the round differentiates: fastacl's 3-layer projection head (width -> width ->
    width -> width, fc1 with bias, dual BN); the backbone is not run."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone = nn.Identity()
        self.head = ProjectionHead(width, width)


class _FrozenFeaturesValidation(coreset._ValidationGradient):
    """v from U's frozen features (the round's `projection`, unchanged); U is never
    re-attacked (the "cached" refresh with refresh_every larger than the picks)."""

    def __init__(self, model, layers, bias, f_adv, f_nat, divergence) -> None:
        self.model, self.layers, self.bias, self.divergence = model, layers, bias, divergence
        self.f_adv, self.f_nat, self.attacks = f_adv, f_nat, 0

    def reattack(self) -> None:
        raise AssertionError("the benchmark times the cached refresh: no re-attack of U")


# ---- machine and memory ------------------------------------------------------------------------

def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def _rss(field: str = "VmRSS") -> int:
    """Resident set size (VmRSS) or its peak since the last reset (VmHWM), bytes (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_PROCESS_PEAK = [0]  # the largest VmHWM seen before a reset: the process's peak RSS


def _fixed_mmap_threshold() -> None:
    """Serve allocations of 1 MiB and more by mmap, returned to the system when freed. glibc's
    default threshold rises to 32 MiB after the first large free, after which each pass
    minibatch's 3 MB projections are carved from the heap between the small tensors that stay
    (the elements' indices) and are never handed back: measured +3 GB of RSS over the pass at 2
    threads, memory the data does not need."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, and the next phase
    would count it), then start a new VmHWM from the current RSS (writing 5 to clear_refs,
    Linux >= 4.0)."""
    _PROCESS_PEAK[0] = max(_PROCESS_PEAK[0], _rss("VmHWM"))
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---- the pieces ---------------------------------------------------------------------------------

def _pairs(rows: int, width: int, generator: torch.Generator):
    """(H, Delta) per head layer: unit-scale inputs, output gradients on the scale of a mean
    loss over the rows (so that the simulated steps stay small, as a real round's)."""
    inputs = [torch.randn(rows, width, generator=generator) for _ in range(3)]
    grad_outputs = [torch.randn(rows, width, generator=generator) / rows for _ in range(3)]
    return inputs, grad_outputs


def _project_pool(minibatches, width, bias, dtype, bank) -> tuple[torch.Tensor, float, float]:
    """The projection pass over every minibatch into one preallocated [N, D] of `dtype`:
    (R, seconds of the pass, seconds of the elements' bookkeeping)."""
    n = sum(index.numel() for index in minibatches)
    R = torch.empty(n, 3 * width + sum(bias), dtype=dtype)
    elements, start, seconds = [], 0, 0.0
    for k, index in enumerate(minibatches):
        b = index.numel()
        h, delta = bank[k % len(bank)]
        h, delta = [t[: 4 * b] for t in h], [t[: 4 * b] for t in delta]
        tic = time.perf_counter()
        part = coreset._minibatch_candidates(index, h, delta, bias, "sample")
        R[start : start + b] = part.projections
        seconds += time.perf_counter() - tic
        elements.append(part.elements)
        start += b
    tic = time.perf_counter()
    elements = coreset._Elements.concatenate(elements)  # two tensors, whatever N
    bookkeeping = time.perf_counter() - tic
    assert len(elements) == n and elements.size == 1
    return R, seconds, bookkeeping


def _time_picks(R: torch.Tensor, v: torch.Tensor, picks: int) -> list[float]:
    """Seconds of each of `picks` greedy picks on R (after one warm-up pick)."""
    taken = torch.zeros(R.shape[0], dtype=torch.bool)
    ops.greedy_pick(R, v, taken)
    times = []
    for _ in range(picks):
        tic = time.perf_counter()
        ops.greedy_pick(R, v, taken)
        times.append(time.perf_counter() - tic)
    return times


def _chunk_candidates(minibatches, width, bias, generator) -> tuple[coreset._Candidates, float]:
    """One chunk as the round builds it (its own pairs per minibatch, then concatenated):
    (candidates, seconds of its projections and concatenation, the draws excluded)."""
    parts, seconds = [], 0.0
    for index in minibatches:
        h, delta = _pairs(4 * index.numel(), width, generator)
        tic = time.perf_counter()
        parts.append(coreset._minibatch_candidates(index, h, delta, bias, "sample"))
        seconds += time.perf_counter() - tic
    tic = time.perf_counter()
    candidates = coreset._Candidates.concatenate(parts)
    del parts
    return candidates, seconds + time.perf_counter() - tic


def _summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "mean": statistics.fmean(times),
            "min": min(times), "max": max(times), "count": len(times)}


# ---- the benchmark -----------------------------------------------------------------------------

def run(images: int = IMAGENET_IMAGES, batch_size: int = 512, chunk_batches: int = 100,
        fraction: float = 0.05, picks: int = 30, head_width: int = 512,
        dtypes: tuple[str, ...] = ("fp32", "bf16"), seed: int = 0,
        validation_images: int | None = None, max_gb: float = 12.0) -> dict:
    """Measure the pieces and extrapolate the round; returns every figure (see the module
    docstring)."""
    _fixed_mmap_threshold()
    generator = torch.Generator().manual_seed(seed)
    model = _HeadModel(head_width).eval().requires_grad_(False)
    layers = coreset.head_linear_layers(model)
    bias = [layer.bias is not None for layer in layers]
    D = 3 * head_width + sum(bias)
    minibatches = coreset._minibatches(torch.arange(images), batch_size)
    chunks = coreset._chunks(minibatches, chunk_batches)
    chunk_images = [sum(index.numel() for index in chunk) for chunk in chunks]
    budget = coreset_budget(fraction, images)
    shares = [share for share, _ in coreset._chunk_budgets(
        chunk_images, [len(chunk) for chunk in chunks], budget, batch_size, floor=False)]
    pair_bytes = 4 * sum(2 * head_width * 4 for _ in layers)  # 4 rows x (H + Delta) fp32
    widest = max(DTYPES[d].itemsize for d in dtypes) if dtypes else 0
    chunk_peak = chunk_images[0] * (2 * pair_bytes + 2 * D * 4)  # parts + their concatenation
    needed = max(images * D * widest, chunk_peak)
    if needed > max_gb * GB:
        raise SystemExit(f"bench_rcs_scale: the largest phase needs about {needed / GB:.1f} GB "
                         f"(> --max-gb {max_gb}): use fewer --images or a larger --max-gb")
    u_images = validation_images or max(2, round(VALIDATION_FRACTION * images))
    result = {
        "images": images, "fraction": fraction, "D": D, "head_width": head_width,
        "batch_size": batch_size,
        "chunk_batches": chunk_batches, "minibatches": len(minibatches), "chunks": len(chunks),
        "chunk_images": chunk_images, "chunk_shares": shares, "budget": budget,
        "validation_images": u_images, "picks_timed": picks, "threads": torch.get_num_threads(),
        "pair_bytes_per_image": pair_bytes, "pool": {}, "load_average": [os.getloadavg()[0]],
    }

    # One chunk, built and run as the round runs it: _greedy with the cached refresh.
    _reset_peak()
    base_rss = _rss()
    candidates, chunk_seconds = _chunk_candidates(chunks[0], head_width, bias, generator)
    f_adv, f_nat = (torch.randn(u_images, head_width, generator=generator) for _ in range(2))
    rd = _FrozenFeaturesValidation(model, layers, bias, f_adv, f_nat, "softmax-kl")
    with coreset._head_restored(layers):
        v0 = rd.projection()
        chunk_picks = {"fp32": _summary(_time_picks(candidates.projections, v0, picks))}
        if "bf16" in dtypes:
            chunk_picks["bf16"] = _summary(_time_picks(
                candidates.projections.to(torch.bfloat16), v0, picks))
        greedy_picks = max(picks, 2)
        tic = time.perf_counter()
        picked, _ = coreset._greedy(candidates, rd, v0, layers, bias, budget=greedy_picks,
                                    max_picks=None, simulated_lr=0.01, simulated_steps=1,
                                    reattack_every=10**9, progress=False)
        greedy_seconds = time.perf_counter() - tic
    assert len(picked) == greedy_picks and rd.attacks == 0
    per_pick = greedy_seconds / greedy_picks
    refresh = max(0.0, (greedy_seconds - greedy_picks * chunk_picks["fp32"]["mean"])
                  / (greedy_picks - 1))
    result["chunk"] = {
        "images": chunk_images[0], "project_seconds": chunk_seconds, "picks": chunk_picks,
        "greedy_picks": greedy_picks, "greedy_seconds": greedy_seconds,
        "greedy_seconds_per_pick": per_pick, "refresh_seconds": refresh,
        "peak_rss": _rss("VmHWM") - base_rss,
        "pair_bytes": sum(t.nbytes for t in candidates.inputs + candidates.grad_outputs),
    }
    del candidates, rd, f_adv, f_nat

    # The whole pool: its projection pass into one N x D matrix, and picks over all of it.
    # (A last minibatch of one image joins the one before it: B + 1 images.)
    bank = [_pairs(4 * (batch_size + 1), head_width, generator) for _ in range(2)]
    v = v0.float()
    for name in dtypes:
        _reset_peak()
        base_rss = _rss()
        R, pass_seconds, bookkeeping = _project_pool(minibatches, head_width, bias, DTYPES[name],
                                                     bank)
        after_pass = _rss()
        _reset_peak()
        times = _time_picks(R, v, picks)
        result["pool"][name] = {
            "bytes": R.nbytes, "pass_seconds": pass_seconds, "bookkeeping_seconds": bookkeeping,
            "picks": _summary(times), "rss_after_pass": after_pass - base_rss,
            # The picks' own allocations: taken, v in fp32, a 0-d index; never N x N.
            "extra_peak_during_picks": max(0, _rss("VmHWM") - after_pass),
        }
        del R
    _reset_peak()
    result["process_peak_rss"] = _PROCESS_PEAK[0]
    result["load_average"].append(os.getloadavg()[0])
    _extrapolate(result)
    return result


def _extrapolate(result: dict) -> None:
    """Totals for all picks (CPU, from the per-pick figures) and by bandwidth for the GPUs."""
    budget, D = result["budget"], result["D"]
    sizes, shares = result["chunk_images"], result["chunk_shares"]
    refresh = result["chunk"]["refresh_seconds"]
    totals = {}
    for name, pool in result["pool"].items():
        full = pool["picks"]["median"]
        chunk = result["chunk"]["picks"].get(name, result["chunk"]["picks"]["fp32"])["median"]
        # A chunk's pick reads its rows: scale the first chunk's time by the rows.
        chunked = sum(s * chunk * n / sizes[0] for s, n in zip(shares, sizes, strict=True))
        totals[name] = {"unchunked_picks": budget * full, "chunked_picks": chunked,
                        "refresh": budget * refresh}
    result["cpu_totals"] = totals
    gpu = {}
    for name in result["pool"]:
        itemsize = DTYPES[name].itemsize
        unchunked = budget * result["images"] * (D * itemsize + 1)  # R and taken, once a pick
        chunked = sum(s * n * (D * itemsize + 1) for s, n in zip(shares, sizes, strict=True))
        gpu[name] = {"bytes_per_pick": result["images"] * (D * itemsize + 1),
                     "unchunked_bytes": unchunked, "chunked_bytes": chunked,
                     **{gpu_name: {"pick": result["images"] * (D * itemsize + 1) / bandwidth,
                                   "unchunked": unchunked / bandwidth,
                                   "chunked": chunked / bandwidth}
                        for gpu_name, bandwidth in BANDWIDTH.items()}}
    result["gpu"] = gpu
    # The cached refresh on a GPU: head forward on U's 2|U| rows (3 matmuls) and the gradients
    # of its layers' outputs (2 matmuls), 2 flops per multiply-add: a lower bound by flops.
    w, rows = result["head_width"], 2 * result["validation_images"]
    result["refresh_flops"] = 5 * 2 * rows * w * w


# ---- the tables -------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds:,.2f} s"


def report(result: dict, cpu: dict[str, str]) -> str:
    n, D, w = result["images"], result["D"], result["head_width"]
    lines = []
    add = lines.append
    add(f"RCS greedy core at scale, CPU: {cpu.get('Model name', '?')} (family "
        f"{cpu.get('CPU family', '?')} model {cpu.get('Model', '?')}, L3 "
        f"{cpu.get('L3 cache', '?')}), {result['threads']} torch thread(s), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}, extension "
        f"{ops.extension_status()['state']}; commit {_commit()}; {datetime.date.today()}; "
        f"1-min load average {result['load_average'][0]:.1f} at the start, "
        f"{result['load_average'][1]:.1f} at the end")
    add("")
    wrn = RELEASE_HEAD[0] + 1 + RELEASE_HEAD[1]
    add(f"N = {n:,} elements (sample granularity), D = {D} = {w} + 1 + {w} + {w} (fastacl's "
        f"3-layer head of width {w}, fc1 with bias; 1537 is ResNet-18's 512-wide head; "
        f"WRN-28-10's 640-d features give D = 1921 with fastacl's 3-layer 640-wide head, "
        f"{wrn} with the authors' 2-layer ImageNet head). Budget round({result['fraction']} N) "
        f"= {result['budget']:,} picks; {result['minibatches']:,} minibatches of "
        f"{result['batch_size']}; {result['chunks']} chunks of <= {result['chunk_batches']} "
        f"minibatches ({result['chunk_images'][0]:,} images; shares "
        f"{result['chunk_shares'][0]:,} ... {result['chunk_shares'][-1]:,}, sum "
        f"{sum(result['chunk_shares']):,}); |U| = {result['validation_images']:,}.")
    add("")
    add("| stored | dtype | bytes | measured peak RSS of the phase |")
    add("|---|---|---|---|")
    for name, pool in result["pool"].items():
        add(f"| N x D projections (`select_coreset` stores fp32; `greedy_pick` also takes bf16) "
            f"| {name} | {pool['bytes'] / GB:.2f} GB | {pool['rss_after_pass'] / GB:.2f} GB "
            f"(+{pool['extra_peak_during_picks'] / 1e6:.1f} MB during the picks) |")
    chunk = result["chunk"]
    add(f"| one chunk's (H, Delta) pairs + projections (the chunked round) | fp32 | "
        f"{chunk['pair_bytes'] / GB:.2f} GB + {chunk['images'] * D * 4 / GB:.2f} GB | "
        f"{chunk['peak_rss'] / GB:.2f} GB (the parts and their concatenation) |")
    add(f"| the whole benchmark process | - | - | {result['process_peak_rss'] / GB:.2f} GB |")
    add(f"| every image's pairs (the unchunked round; not allocated here) | fp32 | "
        f"{n * result['pair_bytes_per_image'] / GB:.1f} GB | - |")
    add("")
    add("| step (CPU, measured) | fp32 | bf16 |")
    add("|---|---|---|")
    pools = result["pool"]

    def cell(name, text):
        return text(pools[name]) if name in pools else "-"

    add(f"| projection pass, {n:,} images = {4 * n:,} rows through `_minibatch_candidates` "
        f"(`rcs_project` + scale), into R | "
        f"{cell('fp32', lambda p: _duration(p['pass_seconds']))} | "
        f"{cell('bf16', lambda p: _duration(p['pass_seconds']))} |")
    add(f"| elements' bookkeeping for N (`_Elements.concatenate`) | "
        f"{cell('fp32', lambda p: _ms(p['bookkeeping_seconds']))} | - |")

    def picks_cell(summary):
        return (f"{_ms(summary['median'])} (min {_ms(summary['min'])}, max "
                f"{_ms(summary['max'])})")

    add(f"| `greedy_pick` over N = {n:,} rows, median of {result['picks_timed']} | "
        f"{cell('fp32', lambda p: picks_cell(p['picks']))} | "
        f"{cell('bf16', lambda p: picks_cell(p['picks']))} |")
    add(f"| `greedy_pick` over one chunk ({chunk['images']:,} rows) | "
        f"{picks_cell(chunk['picks']['fp32'])} | "
        f"{picks_cell(chunk['picks']['bf16']) if 'bf16' in chunk['picks'] else '-'} |")
    add(f"| `_greedy` on one chunk, {chunk['greedy_picks']} picks (each: pick, then G_e, "
        f"simulated step, cached refresh of v on 2 x {result['validation_images']:,} rows of U; "
        f"none after the last) | {_duration(chunk['greedy_seconds'])} | - |")
    add(f"| the refresh (G_e, step, v), per pick: (that - its picks) / (picks - 1) | "
        f"{_ms(chunk['refresh_seconds'])} | - |")
    add("")
    add(f"| round of {result['budget']:,} picks (CPU, extrapolated from the picks timed) | "
        f"greedy_pick | + refresh | total |")
    add("|---|---|---|---|")
    for name, total in result["cpu_totals"].items():
        for label, key in (("unchunked", "unchunked_picks"), ("chunked", "chunked_picks")):
            add(f"| {label}, R in {name} | {_duration(total[key])} | "
                f"{_duration(total['refresh'])} | {_duration(total[key] + total['refresh'])} |")
    add("")
    names = list(BANDWIDTH)
    add("| greedy_pick on a GPU (extrapolated by memory bandwidth, not measured) | bytes / pick | "
        + " | ".join(f"{g} ({BANDWIDTH[g] / 1e12:.2f} TB/s): pick, unchunked, chunked"
                     for g in names) + " |")
    add("|---|---|" + "---|" * len(names))
    for name, g in result["gpu"].items():
        add(f"| R in {name} | {g['bytes_per_pick'] / GB:.2f} GB | "
            + " | ".join(f"{_ms(g[x]['pick'])}, {_duration(g[x]['unchunked'])}, "
                         f"{_duration(g[x]['chunked'])}" for x in names) + " |")
    add("")
    flops, fp32_rate = result["refresh_flops"], 67e12  # H100 SXM, fp32 without tensor cores
    add(f"The cached refresh is {flops / 1e9:.1f} GFLOP a pick (head forward and output "
        f"gradients on 2|U| rows); at the H100 SXM's 67 TFLOP/s fp32 that is at least "
        f"{_ms(flops / fp32_rate)} a pick, {_duration(result['budget'] * flops / fp32_rate)} a "
        f"round (a lower bound by flops, not a measurement).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGENET_IMAGES,
                        help="N, the pool (ImageNet-1K: 1,281,167)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk-batches", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.05, help="k")
    parser.add_argument("--picks", type=int, default=30, help="greedy picks timed per case")
    parser.add_argument("--head-width", type=int, default=512, help="D = 3 width + 1")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--validation-images", type=int, default=None,
                        help="|U| for the refresh (default 0.5%% of --images, ImageNet's U)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-gb", type=float, default=12.0,
                        help="refuse a size whose largest phase needs more memory")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    status = ops.extension_status()
    if status["state"] == "unavailable":
        raise SystemExit(f"the C++ extension is unavailable: {status['detail']}")
    result = run(images=args.images, batch_size=args.batch_size,
                 chunk_batches=args.chunk_batches, fraction=args.fraction, picks=args.picks,
                 head_width=args.head_width, dtypes=tuple(args.dtypes),
                 validation_images=args.validation_images, max_gb=args.max_gb)
    print(report(result, _lscpu()))
    return result


if __name__ == "__main__":
    main()
