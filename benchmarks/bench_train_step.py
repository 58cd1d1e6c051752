"""Training-step throughput (issue 5; issue 9 deliverables 1 and 3): fastacl's ACL-AIR step vs
the plain published-style step of benchmarks/baseline_step.py, same data, same model init, same
run, images per second and the ratio.

    python benchmarks/bench_train_step.py [--threads 1] [--workers 2] [--steps 3]   # table
    python -m pytest benchmarks/bench_train_step.py         # pytest-benchmark (gpu tier skips)
    python -m pytest benchmarks/bench_train_step.py -m gpu  # the GPU suite only

fastacl: uint8 set resident on the device (fastacl.data.DeviceDataset), both views of the batch
augmented in one batched call, then fastacl.train.train_step (PGD with input-only gradients,
fused ops, optional bf16 autocast / channels_last). Timed per step: index batch + augmentation +
step. Baseline: a DataLoader whose workers augment one image at a time, fp32, PGD with a full
loss.backward() through the parameters each step, three forwards, plain losses (see
baseline_step.py). Timed per step: waiting for the loader's batch (so its cost shows wherever
the workers do not keep up) + the copy to the device + the step. Both use fastacl.optim.LARS
(the optimiser is not what is compared) and the same TrainConfig (ACL-AIR: lambda1 = lambda2 =
0.5, 5 PGD steps, the preset's eps and step).

Cases. CPU: ResNet-18-small (width 16, head 128) on the 1x28x28 mnist5k training set, batch
128 (the demo preset); the paper's full-width ResNet-18 on synthetic uint8 3x32x32 data, batch
32. GPU (marker gpu): the paper's ResNet-18 on synthetic 3x32x32, batch 512, fastacl with fp32,
bf16, channels_last, bf16 + channels_last; the baseline is fp32 (with PyTorch's default
cudnn.allow_tf32 = True for both sides). No torch.compile toggle: the trainer has no compile
option yet.

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
import time
from dataclasses import dataclass, field

import pytest
import torch

from fastacl.data import DeviceDataset, load_dataset
from fastacl.losses import ACLLoss
from fastacl.models import build_model
from fastacl.optim import LARS
from fastacl.train import TrainConfig, train_step

try:  # run as a script or collected by pytest from benchmarks/
    from baseline_step import baseline_step, make_loader
except ImportError:  # imported as benchmarks.bench_train_step
    from benchmarks.baseline_step import baseline_step, make_loader

HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    model: str
    data: str  # "mnist5k" or "synthetic"
    batch: int
    steps: int  # timed steps (after 1 warm-up step)
    options: tuple[tuple[str, bool], ...] = field(default=(("fp32", False),))
    # (precision, channels_last) per fastacl variant; the baseline is always fp32, contiguous


CPU_CASES = (
    Case("cpu-small-mnist", "cpu", "resnet18-small", "mnist5k", 128, 3),
    Case("cpu-resnet18-32px", "cpu", "resnet18", "synthetic", 32, 2),
)
GPU_CASES = (
    Case("gpu-resnet18-32px", "cuda", "resnet18", "synthetic", 512, 5,
         options=(("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True))),
)
DEFAULT_WORKERS = {"cpu": 2, "cuda": 4}


def option_label(precision: str, channels_last: bool) -> str:
    return precision + ("+channels_last" if channels_last else "")


def case_images(case: Case) -> torch.Tensor:
    """uint8 [N, C, H, W]: the mnist5k training set, or synthetic 3x32x32 with room for every
    step of one measurement without wrapping an epoch."""
    if case.data == "mnist5k":
        return load_dataset("mnist5k", split="train")[0]
    g = torch.Generator().manual_seed(0)
    count = max(1024, case.batch * (case.steps + 4))
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=g)


def case_config(case: Case, precision: str = "fp32", channels_last: bool = False) -> TrainConfig:
    return TrainConfig(
        method="acl-air", dataset="mnist5k" if case.data == "mnist5k" else "cifar10",
        model=case.model, batch_size=case.batch, precision=precision,
        channels_last=channels_last, device=case.device, evaluate=False,
    ).resolve()


def _initial_model(case: Case, in_channels: int):
    torch.manual_seed(0)
    return build_model(case.model, in_channels=in_channels, dual_bn=True, stem="cifar")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FastaclRunner:
    """fastacl's training loop body (fastacl.train._run) with a fixed learning rate."""

    def __init__(self, images: torch.Tensor, model, cfg: TrainConfig):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.dataset = DeviceDataset(images, device=self.device)
        self.model = model.to(self.device).train()
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = LARS(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
        self.loss_fn = ACLLoss(0.0, cfg.lambda1, cfg.lambda2, cfg.temperature, cfg.air_form)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        self.attack_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.epoch = 0
        self._batches = iter(())

    def _next_index(self) -> torch.Tensor:
        index = next(self._batches, None)
        if index is None:
            self.epoch += 1
            shuffle = torch.Generator().manual_seed(self.epoch)
            self._batches = self.dataset.batches(self.cfg.batch_size, shuffle)
            index = next(self._batches)
        return index

    def step(self) -> None:
        cfg = self.cfg
        x1, x2, x_orig = self.dataset.views(self._next_index(), 1.0, self.data_generator,
                                            cfg.interpolation)
        if cfg.channels_last:
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
        self.optimizer = LARS(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
        self.loader = make_loader(images, cfg.batch_size, num_workers,
                                  interpolation=cfg.interpolation, seed=cfg.seed,
                                  pin_memory=self.device.type == "cuda")
        self.num_workers = num_workers
        self._iterator = None

    def step(self) -> None:
        if self._iterator is None:
            self._iterator = iter(self.loader)  # workers start here (the warm-up step)
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


def make_runner(implementation: str, case: Case, images: torch.Tensor, precision="fp32",
                channels_last=False, num_workers: int | None = None):
    model = _initial_model(case, images.shape[1])
    if implementation == "fastacl":
        return FastaclRunner(images, model, case_config(case, precision, channels_last))
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
    return runner.cfg.batch_size * steps / seconds


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
_IMAGES_PER_S: dict[str, dict[str, float]] = {}


def _params(cases, marks=()):
    params = []
    for case in cases:
        for precision, channels_last in case.options:
            label = option_label(precision, channels_last)
            params.append(pytest.param(case, "fastacl", precision, channels_last,
                                       id=f"{case.name}-fastacl-{label}", marks=marks))
        params.append(pytest.param(case, "baseline", "fp32", False,
                                   id=f"{case.name}-baseline-fp32", marks=marks))
    return params


@pytest.mark.parametrize(
    "case, implementation, precision, channels_last",
    _params(CPU_CASES) + _params(GPU_CASES, marks=pytest.mark.gpu),
)
def test_train_step(benchmark, case, implementation, precision, channels_last):
    images = case_images(case)
    runner = make_runner(implementation, case, images, precision, channels_last)
    try:
        benchmark.group = f"train step {case.name} batch {case.batch}"
        benchmark.pedantic(runner.step, rounds=case.steps, warmup_rounds=1, iterations=1)
    finally:
        runner.close()
    images_per_s = case.batch / benchmark.stats.stats.median
    label = (option_label(precision, channels_last) if implementation == "fastacl"
             else f"baseline ({runner.num_workers} workers)")
    results = _IMAGES_PER_S.setdefault(case.name, {})
    results[label] = images_per_s
    benchmark.extra_info.update(
        implementation=implementation, options=label, batch=case.batch, model=case.model,
        device=torch.cuda.get_device_name() if case.device == "cuda" else "cpu",
        threads=torch.get_num_threads(), images_per_s=round(images_per_s, 2),
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
# Table
# ----------------------------------------------------------------------------------------------
def run_case(case: Case, steps: int, num_workers: int | None):
    """[(options, fastacl images/s)], baseline images/s, workers: fastacl variants first."""
    images = case_images(case)
    fastacl = []
    for precision, channels_last in case.options:
        runner = make_runner("fastacl", case, images, precision, channels_last)
        fastacl.append((option_label(precision, channels_last), measure(runner, steps)))
        runner.close()
        del runner
    runner = make_runner("baseline", case, images, num_workers=num_workers)
    baseline = measure(runner, steps)
    runner.close()
    return fastacl, baseline, runner.num_workers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=None,
                        help="baseline DataLoader workers (default: 2 on CPU, 4 on GPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per measurement (default: per case, 2-5)")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="case names (default: the CPU cases, plus the GPU one with CUDA)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [*CPU_CASES, *(GPU_CASES if HAS_CUDA else ())]
    if args.cases:
        known = {c.name: c for c in (*CPU_CASES, *GPU_CASES)}
        cases = [known[name] for name in args.cases]
    print(f"ACL-AIR training step, fastacl vs published-style baseline; torch "
          f"{torch.__version__}, CPU threads {torch.get_num_threads()}; 1 warm-up step, then "
          "the mean over the timed steps")
    header = (f"{'device':<18} {'model':<15} {'data':<16} {'batch':>5} {'fastacl options':<22} "
              f"{'fastacl img/s':>13} {'baseline img/s':>14} {'workers':>7} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for case in cases:
        steps = args.steps or case.steps
        fastacl, baseline, workers = run_case(case, steps, args.workers)
        device = torch.cuda.get_device_name() if case.device == "cuda" else "cpu"
        data = "mnist5k 1x28x28" if case.data == "mnist5k" else "synth. 3x32x32"
        for label, images_per_s in fastacl:
            print(f"{device:<18} {case.model:<15} {data:<16} {case.batch:>5} {label:<22} "
                  f"{images_per_s:>13.1f} {baseline:>14.1f} {workers:>7} "
                  f"{images_per_s / baseline:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
