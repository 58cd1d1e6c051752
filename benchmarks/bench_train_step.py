"""Training-step throughput: fastacl's ACL-AIR step vs
the plain published-style step of benchmarks/baseline_step.py, same data, same model init, same
run, images per second and the ratio.

    python benchmarks/bench_train_step.py [--threads 1] [--workers 2] [--steps 3]   # table
    fastacl bench [same options] [--variants fp32 bf16+channels_last] [--json OUT]  # the same
    python -m pytest benchmarks/bench_train_step.py         # pytest-benchmark (gpu tier skips)
    python -m pytest benchmarks/bench_train_step.py -m gpu  # the GPU suite only

fastacl: uint8 set resident on the device (fastacl.data.DeviceDataset), both views of the batch
augmented in one batched call, then fastacl.pretrain.train_step (PGD with input-only gradients,
fused ops, optional bf16 autocast / channels_last / compile). Timed per step: index batch +
augmentation + step. Baseline: a DataLoader whose workers augment one image at a time, fp32,
PGD with a full loss.backward() through the parameters each step, three forwards, plain losses
(see baseline_step.py). Timed per step: waiting for the loader's batch (so its cost shows
wherever the workers do not keep up) + the copy to the device + the step. Both use
fastacl.optim.LARS (the optimiser is not what is compared) and the same TrainConfig (ACL-AIR:
lambda1 = lambda2 = 0.5, 5 PGD steps, the preset's eps and step).

Cases. CPU: ResNet-18-small (width 16, head 128) on the 1x28x28 mnist5k training set, batch
128 (the demo preset); the paper's full-width ResNet-18 on synthetic uint8 3x32x32 data, batch
32. fastacl variants: fp32 (the like-for-like row), fp32 + channels_last, that +
torch.compile of the attack, bf16 + channels_last (pays only on a CPU with AMX /
AVX512-BF16), and that + compile. GPU (marker gpu): the paper's ResNet-18 on synthetic
3x32x32, batch 512, fastacl fp32, bf16, bf16 + channels_last, + compile, + compile with CUDA
graphs ("reduce-overhead"); every other registered backbone (gpu-<name>-32px) the same way at
fp32 and bf16 + channels_last; the baseline is fp32 (with PyTorch's default
cudnn.allow_tf32 = True for both sides). The compile warm-up (tens of seconds) is in the
untimed warm-up step.

Measurement: one warm-up step (excluded: extension / oneDNN / cuDNN set-up and the loader's
worker start), then `steps` timed steps; images/s = batch / mean step time (table) or batch /
median step time (pytest-benchmark). fastacl runs first and the baseline's workers start only
after it, so they neither prefetch during nor compete with fastacl's steps; they are shut down
before the next case. Baseline workers: 2 on the CPU (every core of the 2-core development
machine), 4 on a GPU machine (the published setting); --workers overrides.

On a CPU shared with other jobs, two OpenMP threads spin-wait on each other and step times
swing by several x; --threads 1 (or OMP_NUM_THREADS=1) gives steadier figures. The baseline's
workers are separate processes (one thread each) and use cores beyond --threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import torch
from torch.profiler import record_function

from fastacl import TrainConfig
from fastacl.data import DeviceDataset, load_dataset
from fastacl.errors import ConfigError
from fastacl.models import build_model, model_arguments
from fastacl.optim import LARS
from fastacl.pretrain import loss_for, train_step

try:  # run as a script or collected by pytest from benchmarks/
    from baseline_step import baseline_step, make_loader
except ImportError:  # imported as benchmarks.bench_train_step
    from benchmarks.baseline_step import baseline_step, make_loader

HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Variant:
    """fastacl's speed options (TrainConfig fields); the baseline is always fp32, contiguous."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    fold_bn: bool = True  # "no_fold": the attack runs the model's own BN layers
    attack_bf16: bool = False  # "bf16_attack": the attack alone in bf16 (fp32 training pass)

    @property
    def label(self) -> str:
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile" + (f"({self.compile_mode})" if self.compile_mode else ""))
        if not self.fold_bn:
            parts.append("no_fold")
        if self.attack_bf16:
            parts.append("bf16_attack")
        return "+".join(parts)


FP32 = Variant()


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    model: str
    data: str  # "mnist5k" or "synthetic"
    batch: int
    steps: int  # timed steps (after 1 warm-up step)
    variants: tuple[Variant, ...] = field(default=(FP32,))


# bf16 on the CPU pays only with AMX / AVX512-BF16 (the development CPU has both); fp32 rows are
# the like-for-like comparison.
_CPU_VARIANTS = (FP32, Variant("fp32", True), Variant("fp32", True, True), Variant("bf16", True),
                 Variant("bf16", True, True))
CPU_CASES = (
    Case("cpu-small-mnist", "cpu", "resnet18-small", "mnist5k", 128, 3, _CPU_VARIANTS),
    Case("cpu-resnet18-32px", "cpu", "resnet18", "synthetic", 32, 2, _CPU_VARIANTS),
)
# Every other registered backbone at the paper's batch on 3x32x32 (ACL-AIR images/s per backbone,
# docs/backbones.md): fp32 and bf16 + channels_last against the same baseline. WRN-28-10-rcs
# computes what WRN-28-10 does and is left out.
BACKBONES = ("resnet34", "resnet50", "wrn-28-10", "wrn-34-10", "vit-tiny", "vit-small")
GPU_CASES = (
    Case("gpu-resnet18-32px", "cuda", "resnet18", "synthetic", 512, 5,
         variants=(FP32, Variant("bf16"), Variant("bf16", True),
                   Variant("bf16", True, True, fold_bn=False), Variant("bf16", True, True),
                   Variant("bf16", True, True, "reduce-overhead"))),
    *(Case(f"gpu-{name}-32px", "cuda", name, "synthetic", 512, 5,
           variants=(FP32, Variant("bf16", True))) for name in BACKBONES),
)
DEFAULT_WORKERS = {"cpu": 2, "cuda": 4}
CIFAR10_TRAIN_IMAGES = 50_000  # seconds per epoch = this / images per second


def case_images(case: Case) -> torch.Tensor:
    """uint8 [N, C, H, W]: the mnist5k training set, or synthetic 3x32x32 with room for every
    step of one measurement without wrapping an epoch."""
    if case.data == "mnist5k":
        return load_dataset("mnist5k", split="train")[0]
    g = torch.Generator().manual_seed(0)
    count = max(1024, case.batch * (case.steps + 4))
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)


def case_config(case: Case, variant: Variant = FP32) -> TrainConfig:
    return TrainConfig.from_options(
        method="acl-air", dataset="mnist5k" if case.data == "mnist5k" else "cifar10",
        model=case.model, batch_size=case.batch, precision=variant.precision,
        channels_last=variant.channels_last, compile=variant.compile,
        compile_mode=variant.compile_mode, fold_bn=variant.fold_bn,
        attack_precision="bf16" if variant.attack_bf16 else None, device=case.device,
        evaluate=False,
    ).resolve()


def _initial_model(case: Case, in_channels: int, size: int):
    torch.manual_seed(0)
    arguments = model_arguments(case.model)
    kwargs = {"stem": "cifar"} if "stem" in arguments else {}
    if "image_size" in arguments:  # a ViT's patch grid
        kwargs["image_size"] = size
    return build_model(case.model, in_channels=in_channels, dual_bn=True, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FastaclRunner:
    """fastacl's training loop body (fastacl.pretrain.loop) with a fixed learning rate."""

    def __init__(self, images: torch.Tensor, model, cfg: TrainConfig):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.dataset = DeviceDataset(images, device=self.device)
        self.model = model.to(self.device).train()
        if cfg.speed.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = LARS(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay, eta=cfg.optim.lars_eta)
        self.loss_fn = loss_for(cfg)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        self.attack_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.epoch = 0
        self._batches = iter(())

    def _next_index(self) -> torch.Tensor:
        index = next(self._batches, None)
        if index is None:
            self.epoch += 1
            shuffle = torch.Generator().manual_seed(self.epoch)
            self._batches = self.dataset.batches(self.cfg.optim.batch_size, shuffle)
            index = next(self._batches)
        return index

    def step(self) -> None:
        cfg = self.cfg
        with record_function("fastacl.data"):
            x1, x2, x_orig = self.dataset.views(self._next_index(), 1.0, self.data_generator,
                                                cfg.data.interpolation)
            if cfg.speed.channels_last:
                x1, x2, x_orig = (t.contiguous(memory_format=torch.channels_last)
                                  for t in (x1, x2, x_orig))
        train_step(self.model, self.loss_fn, self.optimizer, x_orig, x1, x2, cfg,
                   self.attack_generator)
        _sync(self.device)

    def close(self) -> None:
        pass


class BaselineRunner:
    """The published way: per-image augmentation in DataLoader workers, baseline_step."""

    def __init__(self, images: torch.Tensor, model, cfg: TrainConfig, num_workers: int):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.model = model.to(self.device).train()
        self.optimizer = LARS(self.model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay, eta=cfg.optim.lars_eta)
        self.loader = make_loader(images, cfg.optim.batch_size, num_workers,
                                  interpolation=cfg.data.interpolation, seed=cfg.seed,
                                  pin_memory=self.device.type == "cuda")
        self.num_workers = num_workers
        self._iterator = None

    def step(self) -> None:
        if self._iterator is None:
            self._iterator = iter(self.loader)  # workers start here (the warm-up step)
        with record_function("fastacl.data"):  # waiting for the workers, then the copy
            batch = next(self._iterator, None)
            if batch is None:  # end of an epoch
                self._iterator = iter(self.loader)
                batch = next(self._iterator)
            x1, x2, x_orig = (t.to(self.device, non_blocking=True) for t in batch)
        baseline_step(self.model, self.optimizer, x_orig, x1, x2, self.cfg)
        _sync(self.device)

    def close(self) -> None:
        # Stop the workers now, so that they cannot compete with whatever is measured next.
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        del iterator
        gc.collect()


def make_runner(implementation: str, case: Case, images: torch.Tensor,
                variant: Variant = FP32, num_workers: int | None = None):
    model = _initial_model(case, images.shape[1], images.shape[-1])
    if implementation == "fastacl":
        return FastaclRunner(images, model, case_config(case, variant))
    workers = DEFAULT_WORKERS[case.device] if num_workers is None else num_workers
    return BaselineRunner(images, model, case_config(case), workers)


def measure(runner, steps: int, warmup: int = 1) -> float:
    """images/s over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        runner.step()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    seconds = time.perf_counter() - start
    return runner.cfg.optim.batch_size * steps / seconds


def device_name(case: Case) -> str:
    return torch.cuda.get_device_name() if case.device == "cuda" else f"cpu ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
_IMAGES_PER_S: dict[str, dict[str, float]] = {}


def _params(cases, marks=()):
    params = []
    for case in cases:
        for variant in case.variants:
            params.append(pytest.param(case, "fastacl", variant,
                                       id=f"{case.name}-fastacl-{variant.label}", marks=marks))
        params.append(pytest.param(case, "baseline", FP32, id=f"{case.name}-baseline-fp32",
                                   marks=marks))
    return params


@pytest.mark.parametrize(
    "case, implementation, variant",
    _params(CPU_CASES) + _params(GPU_CASES, marks=pytest.mark.gpu),
)
def test_train_step(benchmark, case, implementation, variant):
    images = case_images(case)
    runner = make_runner(implementation, case, images, variant)
    try:
        benchmark.group = f"train step {case.name} batch {case.batch}"
        benchmark.pedantic(runner.step, rounds=case.steps, warmup_rounds=1, iterations=1)
    finally:
        runner.close()
    images_per_s = case.batch / benchmark.stats.stats.median
    label = (variant.label if implementation == "fastacl"
             else f"baseline ({runner.num_workers} workers)")
    results = _IMAGES_PER_S.setdefault(case.name, {})
    results[label] = images_per_s
    benchmark.extra_info.update(
        implementation=implementation, options=label, batch=case.batch, model=case.model,
        device=device_name(case), threads=torch.get_num_threads(),
        images_per_s=round(images_per_s, 2),
    )
    baseline = next((v for k, v in results.items() if k.startswith("baseline")), None)
    if baseline is not None:  # print every ratio known so far for this case
        for key, value in results.items():
            if not key.startswith("baseline"):
                print(f"\n{case.name}: fastacl {key} {value:.1f} images/s vs baseline "
                      f"{baseline:.1f} images/s: {value / baseline:.2f}x")
                if key == label:
                    benchmark.extra_info["ratio_to_baseline"] = round(value / baseline, 3)


# ----------------------------------------------------------------------------------------------
# Table (also `fastacl bench`)
# ----------------------------------------------------------------------------------------------
def run_case(case: Case, steps: int, num_workers: int | None, variants=None):
    """[(variant label, fastacl images/s)], baseline images/s, workers: fastacl first."""
    images = case_images(case)
    fastacl = []
    for variant in variants or case.variants:
        runner = make_runner("fastacl", case, images, variant)
        fastacl.append((variant.label, measure(runner, steps)))
        runner.close()
        del runner
        gc.collect()
    runner = make_runner("baseline", case, images, num_workers=num_workers)
    baseline = measure(runner, steps)
    runner.close()
    return fastacl, baseline, runner.num_workers


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def parse_variant(text: str) -> Variant:
    """"bf16+channels_last+compile" -> Variant; parts: fp32 | bf16, channels_last, compile,
    no_fold (the attack without BN folding), bf16_attack (the attack alone in bf16)."""
    parts = [part.strip() for part in text.split("+") if part.strip()]
    if not parts or parts[0] not in ("fp32", "bf16"):
        raise ConfigError(f"variant {text!r} must start with fp32 or bf16, e.g. "
                         "bf16+channels_last+compile")
    unknown = set(parts[1:]) - {"channels_last", "compile", "no_fold", "bf16_attack"}
    if unknown:
        raise ConfigError(f"variant {text!r}: unknown part(s) {sorted(unknown)}; known: "
                         "channels_last, compile, no_fold, bf16_attack")
    return Variant(parts[0], "channels_last" in parts, "compile" in parts,
                   fold_bn="no_fold" not in parts, attack_bf16="bf16_attack" in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastacl bench",
        description="ACL-AIR training-step throughput: fastacl vs the published-style "
        "baseline (benchmarks/baseline_step.py), same data, same run.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=None,
                        help="baseline DataLoader workers (default: 2 on CPU, 4 on GPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default: per case, 2-5)")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="case names (default: the CPU cases, plus the GPU one with CUDA): "
                        + ", ".join(c.name for c in (*CPU_CASES, *GPU_CASES)))
    parser.add_argument("--variants", nargs="*", default=None,
                        help="fastacl variants instead of each case's own, e.g. fp32 "
                        "bf16+channels_last+compile")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the rows here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [*CPU_CASES, *(GPU_CASES if HAS_CUDA else ())]
    if args.cases:
        known = {c.name: c for c in (*CPU_CASES, *GPU_CASES)}
        unknown = [name for name in args.cases if name not in known]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; known: {', '.join(known)}")
        cases = [known[name] for name in args.cases]
    if any(case.device == "cuda" for case in cases) and not HAS_CUDA:
        parser.error("a GPU case was asked for but torch sees no CUDA device")
    variants = [parse_variant(v) for v in args.variants] if args.variants else None
    commit, date = _git_commit(), time.strftime("%Y-%m-%d")
    print(f"ACL-AIR training step, fastacl vs published-style baseline; torch "
          f"{torch.__version__}, CPU threads {torch.get_num_threads()}, commit {commit}, {date}; "
          "1 warm-up step, then the mean over the timed steps")
    header = (f"{'model':<15} {'data':<15} {'batch':>5} {'fastacl options':<28} "
              f"{'fastacl img/s':>13} {'baseline img/s':>14} {'workers':>7} {'ratio':>6}")
    rows = []
    for case in cases:
        steps = args.steps or case.steps
        print(f"\n{device_name(case)}\n{header}\n{'-' * len(header)}", flush=True)
        fastacl, baseline, workers = run_case(case, steps, args.workers, variants)
        data = "mnist5k 1x28x28" if case.data == "mnist5k" else "synth. 3x32x32"
        for label, images_per_s in fastacl:
            row = {"case": case.name, "device": device_name(case), "model": case.model,
                   "data": data, "batch": case.batch, "variant": label, "steps": steps,
                   "threads": torch.get_num_threads(), "fastacl_images_per_s": images_per_s,
                   "baseline_images_per_s": baseline, "baseline_workers": workers,
                   "ratio": images_per_s / baseline, "commit": commit, "date": date,
                   "torch": torch.__version__}
            if case.device == "cuda":
                row["fastacl_seconds_per_cifar10_epoch"] = CIFAR10_TRAIN_IMAGES / images_per_s
            rows.append(row)
            print(f"{case.model:<15} {data:<15} {case.batch:>5} {label:<28} "
                  f"{images_per_s:>13.1f} {baseline:>14.1f} {workers:>7} "
                  f"{images_per_s / baseline:>5.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nrows written to {args.json}")
    return rows


if __name__ == "__main__":
    main()
