"""Augmentation throughput: fastacl's batched `augment` against per-image loops, same inputs.

    python -m pytest benchmarks/bench_augment.py            # pytest-benchmark (gpu tier skips)
    python benchmarks/bench_augment.py [--size 32] [--batch 512] [--threads N]   # table

Three ways to make one view of each of 512 uint8 CIFAR-size images (docs/acl-air.md section 1,
s = 1, bicubic), all producing the same float [0, 1] result for the same parameters:
- batched: fastacl.data.augment on the whole batch (parameters drawn for the batch, crop +
  resize as two batched matmuls, jitter by slots);
- per-image reference: a Python loop over images doing what torchvision's tensor transforms do
  (crop slice + F.interpolate(antialias=True), torchvision's ColorJitter functions), i.e. the
  usual per-sample Dataset transform minus the PIL conversions, with the parameters drawn
  per image (torchvision's get_params loop);
- per-image batched ops: fastacl's own ops called on batches of one (isolates the gain of
  batching from the gain of cheaper formulas).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from fastacl.data import augment, sample_augment_params
from fastacl.data.augmentation import crop_scale
from fastacl.data.reference import augment_reference, crop_box_reference

BATCH = 512
SIZE = 32
STRENGTH = 1.0


def _images(batch=BATCH, size=SIZE, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)


def batched(x, generator):
    return augment(x, STRENGTH, generator)


def per_image_reference(x, generator):
    """Per-image loop, parameters drawn per image as torchvision does (get_params per call)."""
    size = (x.shape[-2], x.shape[-1])
    params = sample_augment_params(x.shape[0], size, STRENGTH, generator)
    # Re-draw the crop boxes one by one with torchvision's loop (the per-sample cost it has).
    boxes = [crop_box_reference(size, crop_scale(STRENGTH), generator=generator) for _ in x]
    params.top, params.left, params.height, params.width = (
        torch.tensor(column) for column in zip(*boxes, strict=True)
    )
    return augment_reference(x, params)


def per_image_batched_ops(x, generator):
    return torch.cat([augment(x[i : i + 1], STRENGTH, generator) for i in range(x.shape[0])])


METHODS = {
    "batched (fastacl)": batched,
    "per-image reference loop": per_image_reference,
    "per-image loop of fastacl ops": per_image_batched_ops,
}


def _run(method, x, generator):
    out = method(x, generator)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_augment_cpu(benchmark, name):
    x = _images()
    generator = torch.Generator().manual_seed(1)
    benchmark.extra_info.update(
        device="cpu", batch=BATCH, size=SIZE, threads=torch.get_num_threads()
    )
    rounds = 5 if name.startswith("batched") else 2
    out = benchmark.pedantic(_run, args=(METHODS[name], x, generator), rounds=rounds, iterations=1)
    assert out.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["batched (fastacl)", "per-image loop of fastacl ops"])
def test_augment_cuda(benchmark, name):
    x = _images(device="cuda")
    generator = torch.Generator().manual_seed(1)
    _run(METHODS[name], x, generator)  # warm-up
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), batch=BATCH, size=SIZE)
    out = benchmark.pedantic(_run, args=(METHODS[name], x, generator), rounds=5, iterations=1)
    assert out.is_cuda


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------
def _median_seconds(method, x, repeats):
    generator = torch.Generator().manual_seed(1)
    _run(method, x, generator)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(method, x, generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"augment, s = {STRENGTH}, bicubic, uint8 3 x {args.size} x {args.size}, "
        f"batch {args.batch}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
    )
    print(f"{'device':<28} {'method':<32} {'ms / batch':>11} {'images / s':>11} {'time ratio':>11}")
    for device in devices:
        label = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        x = _images(args.batch, args.size, device)
        baseline = None
        for name, method in METHODS.items():
            if device == "cuda" and name == "per-image reference loop":
                continue  # its parameter loop is host-side; the fastacl-ops loop shows the point
            repeats = args.repeats if name.startswith("batched") else max(1, args.repeats // 2)
            seconds = _median_seconds(method, x, repeats)
            baseline = baseline or seconds
            print(
                f"{label:<28} {name:<32} {seconds * 1e3:>11.1f} {args.batch / seconds:>11.0f} "
                f"{seconds / baseline:>10.1f}x"
            )


if __name__ == "__main__":
    main()
