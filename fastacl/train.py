"""fastacl.train: robust contrastive pre-training (ACL, DynACL, ACL-AIR, DynACL-AIR) and the
non-robust SimCLR baseline ("cl"). Spec: spec/acl-air.md sections 1-6.

One step reads top to bottom in `train_step`: two augmented views on the device, PGD on the
contrastive loss through the "adv" BN branch with input-only gradients, the train-mode forwards,
ACLLoss, LARS. Everything else here is bookkeeping: presets, schedules, checkpoints, resume, logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

from fastacl.models.folded import FoldedResNet18, can_fold, folded_for_attack

METHODS = ("cl", "acl", "acl-air", "dynacl", "dynacl-air")
PRESETS = ("demo", "paper")
PAPER_DATASETS = ("cifar10", "cifar100", "stl10")
CHECKPOINT_NAME = "checkpoint.pt"

# Preset values; an explicit argument (anything not None) overrides them.
_PRESET_VALUES: dict[str, dict[str, Any]] = {
    # The published recipe (spec sections 3 and 5).
    "paper": dict(
        dataset="cifar10", model="resnet18", epochs=1000, batch_size=512, lr=5.0,
        eps=8 / 255, step_size=2 / 255, attack_steps=5, eval_epochs=25, eval_max_test=None,
    ),
    # The embedded MNIST sample on a small ResNet-18, sized to finish with its evaluation within
    # 10 minutes on a 2-core CPU. eps 0.15 is an MNIST-sized budget (8/255 is meaningless there).
    "demo": dict(
        dataset="mnist5k", model="resnet18-small", epochs=5, batch_size=128, lr=5.0,
        eps=0.15, step_size=0.05, attack_steps=5, eval_epochs=20, eval_max_test=500,
    ),
}

# Loss weights per method (spec section 5): w is per epoch for DynACL, lambda1 = lambda2 = 0.5
# for the AIR variants.
_METHOD_LAMBDAS = {"cl": 0.0, "acl": 0.0, "dynacl": 0.0, "acl-air": 0.5, "dynacl-air": 0.5}


@dataclass
class TrainConfig:
    """Everything a run depends on. None means "from the preset" (see `resolve`)."""

    method: str = "acl"
    dataset: str | None = None
    data_dir: str | None = None
    preset: str | None = None  # "demo" | "paper"; None: "demo" without a dataset, else "paper"
    model: str | None = None
    epochs: int | None = None
    batch_size: int | None = None  # global batch (N images, 2N views)
    lr: float | None = None  # LARS base lr
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001
    min_lr: float = 1e-6
    warmup_epochs: int | None = None  # default max(1, round(E / 100))
    eps: float | None = None
    step_size: float | None = None
    attack_steps: int | None = None
    clip_random_start: bool = True  # False reproduces the published (unclipped) random start
    temperature: float = 0.5
    lambda1: float | None = None  # SIR weight; default from the method
    lambda2: float | None = None  # AIR weight; default from the method
    air_form: str = "exact"  # "exact" | "reference-code"
    dynaug_period: int | None = None  # default max(1, round(E / 20))
    interpolation: str = "bicubic"
    # Speed (issue 9; README "Speed"): bf16 autocast on the images' device (CUDA, or a CPU with
    # AMX / AVX512-BF16: elsewhere bf16 on the CPU is slower than fp32), channels_last memory
    # format, and torch.compile of the attack's forward/backward (static shapes; CUDA graphs
    # with compile_mode="reduce-overhead"). None of them changes the algorithm.
    precision: str = "fp32"  # "fp32" | "bf16"
    # The PGD attack's precision alone; default: `precision`. "bf16" with precision "fp32" keeps
    # the training gradients fp32 and speeds up the attack, which only uses gradient signs.
    attack_precision: str | None = None
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; None: its default
    # Fold the eval-mode BN into the convolutions for the attacks (fastacl.models.folded): the
    # same function up to float rounding, without the BN kernels. False: the model as it is.
    fold_bn: bool = True
    # Bit-reproducible runs (same machine, thread count and versions): deterministic kernels,
    # no TF32, fp32, no compile. Slower; see `deterministic_mode`.
    deterministic: bool = False
    seed: int = 0
    device: str = "auto"
    # Under torchrun (DDP; batch_size stays the global batch): gather_negatives computes every
    # loss term on the global batch (cross-rank negatives; the gradient equals single-process);
    # sync_bn normalises with the global batch's BN statistics instead of each rank's own.
    gather_negatives: bool = True
    sync_bn: bool = False
    out_dir: str | None = None
    max_train: int | None = None  # use only the first N training images (quick runs, tests)
    evaluate: bool = True  # quick SLF + PGD evaluation at the end
    eval_epochs: int | None = None
    eval_max_test: int | None = None
    eval_eps: float | None = None  # default: the training eps
    # Coreset training (spec/rcs.md, fastacl.coreset): after coreset_warmup epochs on the full
    # pool, train on a fraction k of it, re-selected every coreset_interval epochs ("rcs") or
    # drawn once ("random"). The validation set U (coreset_validation of the training images,
    # at least 8) is held out of training in every run, the full-data baseline included.
    coreset: str | None = None  # None | "rcs" | "random"
    coreset_fraction: float = 0.2
    coreset_warmup: int | None = None  # default max(1, round(E / 10))
    coreset_interval: int | None = None  # default max(1, round(E / 50))
    coreset_granularity: str = "batch"  # "batch" | "sample"
    coreset_refresh: str = "exact"  # "exact" | "cached"
    coreset_refresh_every: int = 20  # "cached": re-attack U every m picks
    # PGD steps of the pool pass (spec: the training attack's, 5). Fewer make a round cheaper
    # (the pass is 75-90% of it) and change what the selection sees: benchmarks/RESULTS.md.
    coreset_attack_steps: int | None = None  # default: attack_steps
    # Precision of the pool pass (PGD and backbone features): "fp32" | "bf16"; default: the
    # training's. The head gradients, U's attack and the greedy loop stay fp32.
    coreset_precision: str | None = None
    coreset_divergence: str = "minmax-kl"  # "minmax-kl" | "softmax-kl"
    coreset_simulated_lr: float = 0.01  # eta' of the simulated head step
    coreset_simulated_steps: int = 1  # 2 reproduces the published code's doubled step
    coreset_budget_rounding: str = "truncate"  # "truncate" | "floor" (published)
    coreset_validation: float = 0.01  # fraction held out as U; 0: none (only without a coreset)

    def resolve(self) -> TrainConfig:
        """A copy with the preset, method defaults and epoch-relative schedules filled in."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        preset = self.preset or ("demo" if self.dataset in (None, "mnist5k") else "paper")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in _PRESET_VALUES[preset].items():
            if values[key] is None:
                values[key] = value
        values["preset"] = preset
        cfg = TrainConfig(**values)
        from fastacl.data import DATASETS

        if cfg.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if cfg.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
        if cfg.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (NT-Xent needs negatives), got {cfg.batch_size}"
            )
        if cfg.attack_precision is None:
            cfg.attack_precision = cfg.precision
        for name in ("precision", "attack_precision"):
            if getattr(cfg, name) not in ("fp32", "bf16"):
                raise ValueError(f"{name} must be 'fp32' or 'bf16', got {getattr(cfg, name)!r}")
        if cfg.compile_mode is not None and not cfg.compile:
            raise ValueError(f"compile_mode={cfg.compile_mode!r} needs compile=True (--compile)")
        if cfg.deterministic and (cfg.precision != "fp32" or cfg.attack_precision != "fp32"
                                  or cfg.compile):
            raise ValueError(
                "deterministic=True trades speed for bit-reproducibility and runs fp32 eager "
                f"kernels: it cannot be combined with precision={cfg.precision!r} / "
                f"attack_precision={cfg.attack_precision!r} / compile={cfg.compile}"
            )
        if cfg.air_form not in ("exact", "reference-code"):
            raise ValueError(f"air_form must be 'exact' or 'reference-code', got {cfg.air_form!r}")
        default_lambda = _METHOD_LAMBDAS[cfg.method]
        cfg.lambda1 = default_lambda if cfg.lambda1 is None else cfg.lambda1
        cfg.lambda2 = default_lambda if cfg.lambda2 is None else cfg.lambda2
        # Spec section 5: schedules scale with E so a short run keeps the published shape.
        cfg.warmup_epochs = cfg.warmup_epochs or max(1, round(cfg.epochs / 100))
        cfg.dynaug_period = cfg.dynaug_period or max(1, round(cfg.epochs / 20))
        cfg.eval_eps = cfg.eps if cfg.eval_eps is None else cfg.eval_eps
        _resolve_coreset(cfg)
        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        return cfg

    @property
    def is_adversarial(self) -> bool:
        return self.method != "cl"

    @property
    def is_dynamic(self) -> bool:
        return self.method.startswith("dynacl")


_CORESETS = (None, "rcs", "random")


def _resolve_coreset(cfg: TrainConfig) -> None:
    """Validate the coreset fields and fill in the epoch-relative schedule (spec section 5)."""
    from fastacl import coreset

    if cfg.coreset not in _CORESETS:
        raise ValueError(f"coreset must be None, 'rcs' or 'random', got {cfg.coreset!r}")
    if not 0.0 <= cfg.coreset_validation < 1.0:
        raise ValueError(f"coreset_validation must be in [0, 1) (the share of the training "
                         f"images held out as U), got {cfg.coreset_validation}")
    if cfg.coreset is None:
        return
    if not 0.0 < cfg.coreset_fraction < 1.0:
        raise ValueError(f"coreset_fraction must be in (0, 1) (the share of the pool trained "
                         f"on), got {cfg.coreset_fraction}")
    if cfg.coreset == "rcs" and not cfg.is_adversarial:
        raise ValueError("coreset='rcs' selects for robustness (RD uses the adversarial BN "
                         f"branch): use an adversarial method, not {cfg.method!r}, or "
                         "coreset='random'")
    if cfg.coreset == "rcs" and cfg.coreset_validation == 0:
        raise ValueError("coreset='rcs' needs a validation set U: coreset_validation must be > 0")
    for name, choices in (("granularity", coreset.GRANULARITIES), ("refresh", coreset.REFRESHES),
                          ("divergence", coreset.DIVERGENCES),
                          ("budget_rounding", coreset.BUDGET_ROUNDINGS)):
        value = getattr(cfg, "coreset_" + name)
        if value not in choices:
            raise ValueError(f"coreset_{name} must be one of {', '.join(choices)}, got {value!r}")
    if cfg.coreset_refresh_every < 1 or cfg.coreset_simulated_steps < 0 or not (
            cfg.coreset_simulated_lr >= 0):
        raise ValueError(
            f"coreset_refresh_every must be >= 1 and coreset_simulated_lr / _steps >= 0, got "
            f"{cfg.coreset_refresh_every}, {cfg.coreset_simulated_lr}, "
            f"{cfg.coreset_simulated_steps}"
        )
    if cfg.coreset_attack_steps is None:
        cfg.coreset_attack_steps = cfg.attack_steps
    if cfg.coreset_precision is None:
        cfg.coreset_precision = cfg.precision
    if cfg.coreset_precision not in ("fp32", "bf16"):
        raise ValueError(f"coreset_precision must be 'fp32' or 'bf16' (the selection's pass "
                         f"over the pool), got {cfg.coreset_precision!r}")
    if cfg.deterministic and cfg.coreset_precision != "fp32":
        raise ValueError("deterministic=True runs fp32 kernels: coreset_precision must be fp32")
    if cfg.coreset_attack_steps < 0:
        raise ValueError(f"coreset_attack_steps must be >= 0 (PGD steps of the selection's pass "
                         f"over the pool), got {cfg.coreset_attack_steps}")
    # spec/acl-air.md section 5: RCS warm-up E/10 and interval E/50 (100 and 20 at E = 1000).
    if cfg.coreset_warmup is None:
        cfg.coreset_warmup = max(1, round(cfg.epochs / 10))
    if cfg.coreset_interval is None:
        cfg.coreset_interval = max(1, round(cfg.epochs / 50))
    if not 0 <= cfg.coreset_warmup < cfg.epochs or cfg.coreset_interval < 1:
        raise ValueError(
            f"coreset_warmup must be in [0, epochs = {cfg.epochs}) (else the coreset is never "
            f"used) and coreset_interval >= 1, got {cfg.coreset_warmup} and "
            f"{cfg.coreset_interval}"
        )


def _is_selection_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """RCS re-selects at epochs W + 1, W + 1 + I, ... (spec/rcs.md section 4); the random
    subset is drawn once, at W + 1."""
    if cfg.coreset is None:
        return False
    after = epoch - cfg.coreset_warmup - 1
    if after < 0:
        return False
    return after == 0 or (cfg.coreset == "rcs" and after % cfg.coreset_interval == 0)


def _select(cfg: TrainConfig, model, dataset, pool, validation, epoch: int, device) -> dict:
    """The coreset for the epochs from `epoch` on: {"indices", "coreset_size",
    "selection_seconds"}. Seeded by (seed, epoch) only, so a resumed run selects the same."""
    from fastacl import coreset
    from fastacl.ops import use_backend

    start = time.perf_counter()
    seed = cfg.seed * 1_000_003 + epoch + 500_009
    if cfg.coreset == "random":
        indices = coreset.random_coreset(pool, cfg.coreset_fraction,
                                         torch.Generator().manual_seed(cfg.seed + 500_009))
    else:
        # Deterministic mode: the PyTorch reference instead of the CUDA kernels' atomics.
        backend = use_backend("torch") if cfg.deterministic else contextlib.nullcontext()
        with backend:
            indices = coreset.select_coreset(
                model, dataset, pool, validation, cfg.coreset_fraction, batch_size=cfg.batch_size,
                eps=cfg.eps, step_size=cfg.step_size, attack_steps=cfg.coreset_attack_steps,
                temperature=cfg.temperature, granularity=cfg.coreset_granularity,
                refresh=cfg.coreset_refresh, refresh_every=cfg.coreset_refresh_every,
                divergence=cfg.coreset_divergence, simulated_lr=cfg.coreset_simulated_lr,
                simulated_steps=cfg.coreset_simulated_steps,
                budget_rounding=cfg.coreset_budget_rounding,
                strength=augmentation_strength(cfg, epoch), interpolation=cfg.interpolation,
                generator=torch.Generator().manual_seed(seed),
                attack_generator=torch.Generator(device).manual_seed(seed),
                autocast_dtype=torch.bfloat16 if cfg.coreset_precision == "bf16" else None,
                fold_bn=cfg.fold_bn,
            ).indices
    return {"indices": indices.cpu(), "coreset_size": int(indices.numel()),
            "selection_seconds": time.perf_counter() - start}


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    config: TrainConfig
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The step


def augmentation_strength(cfg: TrainConfig, epoch: int) -> float:
    """s(e): 1 for ACL, the DynAug staircase for DynACL (spec section 1). epoch is 1-based."""
    if not cfg.is_dynamic:
        return 1.0
    from fastacl.data import dynaug_strength

    return dynaug_strength(epoch, cfg.epochs, period=cfg.dynaug_period)


def train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg: TrainConfig, attack_generator):
    """One training step on a batch; returns the loss terms as detached 0-d tensors."""
    from fastacl.attacks import pgd_contrastive
    from fastacl.distributed import unwrap_ddp
    from fastacl.ops import nt_xent

    bf16 = cfg.precision == "bf16"
    autocast = torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=bf16)
    # record_function: the phases are named in torch.profiler traces (benchmarks/profile_step.py)
    if not cfg.is_adversarial:
        with record_function("fastacl.forward"):
            with autocast:
                z1, z2 = model(torch.cat([x1, x2]), branch="normal").float().chunk(2)
            terms = {"total": nt_xent(z1, z2, cfg.temperature,
                                      gather_distributed=cfg.gather_negatives)}
    else:
        # The attack puts the model in eval mode and computes input gradients only. Under DDP it
        # runs on the inner module (no gradient all-reduce) with this rank's negatives only.
        attack_model = unwrap_ddp(model)
        if cfg.fold_bn and can_fold(attack_model):
            attack_model = folded_for_attack(attack_model, "adv")  # refreshed: current weights
        if cfg.compile:
            attack_model = compiled_for_attack(attack_model, cfg.compile_mode)
        with record_function("fastacl.attack"):
            x1_adv, x2_adv = pgd_contrastive(
                attack_model, x1, x2, eps=cfg.eps, step_size=cfg.step_size,
                steps=cfg.attack_steps, branch="adv", generator=attack_generator,
                temperature=cfg.temperature, clip_random_start=cfg.clip_random_start,
                autocast_dtype=torch.bfloat16 if cfg.attack_precision == "bf16" else None,
            )
        with record_function("fastacl.forward"):
            with autocast:
                z1_adv, z2_adv = model(torch.cat([x1_adv, x2_adv]),
                                       branch="adv").float().chunk(2)
                z1, z2 = model(torch.cat([x1, x2]), branch="normal").float().chunk(2)
                # The originals' pass is needed by SIR / AIR only.
                z_orig = (model(x_orig, branch="normal").float()
                          if loss_fn.lambda1 > 0 or loss_fn.lambda2 > 0 else None)
            # The losses in fp32, outside autocast (softmaxes over the batch need the range).
            terms = loss_fn(z1, z2, z_orig, z1_adv, z2_adv)._asdict()
    with record_function("fastacl.backward"):
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
    with record_function("fastacl.optimizer"):
        optimizer.step()
    return {name: value.detach() for name, value in terms.items() if value is not None}


# torch.compile'd wrappers of models, one per (model, mode); weak keys, so a model's wrapper goes
# with the model.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_for_attack(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """`torch.compile(model)` for the PGD loop, built once per model and reused every step.

    The attack always calls it the same way (eval mode, frozen parameters, one batch shape, the
    "adv" branch), so after the first step every call reuses one compiled graph (static
    shapes); the backward that autograd.grad runs is compiled too and computes input gradients
    only. The wrapper shares the model's parameters (or, for a folded mirror, its buffers,
    refreshed in place), so optimiser updates need no recompile.
    """
    # A folded mirror keeps its own wrappers (a weak-keyed entry whose value references the key
    # would never be freed).
    if isinstance(model, FoldedResNet18):
        by_mode = model.compiled
    else:
        by_mode = _COMPILED.setdefault(model, {})
    if mode not in by_mode:
        by_mode[mode] = torch.compile(model, mode=mode, dynamic=False)
    return by_mode[mode]


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True):
    """Bit-reproducible kernels inside the block; every global flag it touches restored after.

    Sets torch.use_deterministic_algorithms(True) (an op without a deterministic kernel raises
    instead of silently varying), cuDNN deterministic with autotuning off, TF32 off for matmul
    and cuDNN, and CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset (cuBLAS needs it before its first
    use; set it in the environment if CUDA ran before). fastacl's own Triton kernels reduce in a
    fixed order (no atomics); RCS's CUDA kernels accumulate with atomics, so `fastacl.train` runs
    RCS through the PyTorch reference in this mode. Reproducible means: same machine, versions
    and CPU thread count. On the CPU fastacl's step is already deterministic, so the cost is on
    CUDA (no cuDNN autotuning, fp32 matmuls, slower deterministic kernels).
    """
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved[2:6]
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ---------------------------------------------------------------------------------------------
# Run bookkeeping


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step, so the checkpoint it then
    writes holds a consistent model / optimiser / RNG state (never a half-applied update)."""

    def __init__(self, verbose: bool = True) -> None:
        self.requested = False
        self.verbose = verbose  # under DDP only rank 0 says it

    def __call__(self, signum=None, frame=None) -> None:
        if self.requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("\nfastacl: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again aborts without one)", file=sys.stderr)


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
            capture_output=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import numpy

    import fastacl

    return {"fastacl": fastacl.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "git_commit": _git_commit(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _default_out_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{cfg.method}-{cfg.dataset}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started in the same second must not collide
        suffix += 1
        path = Path("runs") / f"{cfg.method}-{cfg.dataset}-{stamp}-{suffix}"
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state(data_generator: torch.Generator, attack_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state(),
             "attack": attack_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, data_generator, attack_generator) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    attack_generator.set_state(state["attack"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rank_state(model, attack_generator: torch.Generator, cfg: TrainConfig) -> list:
    """Under DDP, what differs between the ranks, from every rank (a collective): its PGD
    random-start stream and, without sync BN, its BN running statistics (the checkpoint's
    state_dict holds rank 0's). Everything else is the same on every rank."""
    from fastacl import distributed

    own = {"attack": attack_generator.get_state()}
    if not cfg.sync_bn:
        own["buffers"] = {name: buffer.detach().cpu()
                          for name, buffer in distributed.unwrap_ddp(model).named_buffers()}
    return list(distributed.gather_objects(own))


def _restore_rank_state(saved: list | None, model, attack_generator: torch.Generator,
                        attack_seed: int) -> None:
    """This rank's part of `_gather_rank_state` (after DDP's construction, which copies rank 0's
    buffers to every rank). A checkpoint of another world size: ranks > 0 restart their PGD
    streams from the seed and keep rank 0's BN statistics."""
    from fastacl import distributed

    rank = distributed.rank()
    if saved is None or len(saved) != distributed.world_size():
        if rank > 0:
            attack_generator.manual_seed(attack_seed)
        return
    attack_generator.set_state(saved[rank]["attack"])
    if "buffers" in saved[rank]:
        with torch.no_grad():
            for name, buffer in distributed.unwrap_ddp(model).named_buffers():
                buffer.copy_(saved[rank]["buffers"][name])


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    # A bar on a terminal; plain log lines (written by the loop) otherwise.
    return tqdm(total=total, desc=desc, unit="step", disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False)


def _rank_views(dataset, index: torch.Tensor, strength: float, generator: torch.Generator,
                interpolation: str, rank: int, world_size: int):
    """(view 1, view 2, originals) of this rank's images of the global batch `index`.

    Under DDP every rank draws the augmentation of the whole global batch from the same
    generator (the same 2B draws as DeviceDataset.views: view 1 of every image, then view 2) and
    applies only the rows of its contiguous block: the views are exactly the single-process
    ones, and the generator stays the same on every rank (rank 0's checkpoint resumes them all).
    """
    if world_size == 1:
        return dataset.views(index, strength, generator, interpolation)
    from fastacl.data import apply_augment, sample_augment_params

    batch, local = index.shape[0], index.shape[0] // world_size
    rows = torch.arange(rank * local, (rank + 1) * local)
    params = sample_augment_params(2 * batch, dataset.image_shape[1:], strength, generator)
    images = dataset.fetch(index[rank * local : (rank + 1) * local])
    views = apply_augment(torch.cat([images, images]),
                          params.select(torch.cat([rows, batch + rows])),
                          interpolation=interpolation)
    view_1, view_2 = views.chunk(2)
    return view_1, view_2, images.to(torch.float32) / 255.0


def _prepare_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir(cfg)
    if out.exists() and any((out / name).exists() for name in ("config.json", CHECKPOINT_NAME)):
        raise FileExistsError(
            f"{out} already holds a run; pass resume={str(out)!r} (--resume {out}) to continue "
            "it, or choose another out dir"
        )
    return out


def _load_resume(resume_dir: str | os.PathLike, overrides: dict) -> tuple[TrainConfig, dict]:
    from fastacl.models import load_checkpoint

    path = Path(resume_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"cannot resume: {path} does not exist (is {resume_dir} a run dir?)"
        )
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("extra", {}).get("train_state")
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"cannot resume from {path}: it is not a fastacl.train checkpoint")
    # resolve(): a checkpoint written before a field existed gets that field's default (the
    # saved values are resolved already, and resolve() only fills in what is None).
    cfg = TrainConfig(**saved["config"]).resolve()
    for key, value in overrides.items():
        if getattr(cfg, key) != value:
            raise ValueError(
                f"cannot change {key} on resume (run has {getattr(cfg, key)!r}, got {value!r}); "
                "a resumed run continues with its saved config"
            )
    return cfg, checkpoint


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None,
          on_step: Callable[[int, int, dict], bool] | None = None, **overrides) -> TrainResult:
    """Pre-train an encoder. `fastacl.train(method="acl-air", dataset="cifar10", epochs=100)`.

    config: a TrainConfig (or None for the defaults); overrides: TrainConfig fields.
    resume: a run dir; continues from its checkpoint with its saved config.
    on_step(epoch, step, terms): called after every step; returning True stops the run as Ctrl-C
    does (a checkpoint is written, the run can be resumed). Used by tests and tools.
    """
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - field_names)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(field_names)}")
    import fastacl
    from fastacl import distributed

    checkpoint = None
    if resume is not None:
        cfg, checkpoint = _load_resume(resume, overrides)
    else:
        cfg = dataclasses.replace(config or TrainConfig(), **overrides).resolve()
    # Under torchrun: one process per device, DDP (see `_run` and fastacl.distributed).
    owns_group = distributed.init_from_env(cfg.device)
    try:
        distributed.check_same_on_all_ranks(
            {**dataclasses.asdict(cfg), "resume": None if resume is None else str(resume),
             "fastacl_version": fastacl.__version__}
        )
        _check_world_size(cfg, distributed.world_size())
        # Rank 0 alone decides a new run's directory (and whether it is taken).
        out = (Path(resume) if resume is not None
               else distributed.on_main_process(lambda: _prepare_out_dir(cfg)))
        with deterministic_mode(cfg.deterministic):
            return _run(cfg, out, checkpoint, on_step)
    finally:
        if owns_group:
            distributed.destroy()


def _check_world_size(cfg: TrainConfig, world_size: int) -> None:
    local = cfg.batch_size // world_size
    if cfg.batch_size % world_size or local < 2:
        fit = max(2, local) * world_size
        raise ValueError(
            f"batch_size {cfg.batch_size} is the global batch, split over {world_size} ranks: it "
            f"must be a multiple of the world size giving each rank >= 2 images (NT-Xent and BN "
            f"need a batch), e.g. {fit}"
        )


def _run(cfg: TrainConfig, out: Path, checkpoint: dict | None, on_step) -> TrainResult:
    from fastacl import distributed
    from fastacl.data import DeviceDataset, load_dataset
    from fastacl.losses import ACLLoss
    from fastacl.models import build_model, save_checkpoint
    from fastacl.optim import LARS, warmup_cosine_lr

    # Under DDP (torchrun): rank 0 writes every file and log line; see `_rank_views` for the data.
    rank, world_size = distributed.rank(), distributed.world_size()
    main = distributed.is_main_process()
    device = distributed.rank_device(cfg.device)
    # Load (and so validate) the data before anything is written.
    images, _ = load_dataset(cfg.dataset, cfg.data_dir, split="train")
    if cfg.max_train is not None:
        images = images[: cfg.max_train]
    # The pool: the training images less the RCS validation set U, held out in every run
    # (spec/rcs.md section 3) so that full, RCS and random runs train on the same pool.
    from fastacl.coreset import coreset_budget, validation_split

    pool, validation = validation_split(images.shape[0], cfg.coreset_validation, seed=cfg.seed)
    n_images = pool.numel()
    # Steps of a full-pool epoch; the LR schedule counts these epochs (a coreset epoch has fewer
    # steps and sweeps the same stretch of the schedule).
    steps_per_epoch = n_images // cfg.batch_size  # drop_last: NT-Xent wants full batches
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n_images} training images")
    if cfg.coreset is not None and coreset_budget(cfg.coreset_fraction, n_images) < cfg.batch_size:
        raise ValueError(
            f"the coreset (coreset_fraction {cfg.coreset_fraction} of {n_images} images = "
            f"{coreset_budget(cfg.coreset_fraction, n_images)}) is smaller than batch_size "
            f"{cfg.batch_size}: no training step would be left"
        )
    # uint8 images resident on the device (pinned host memory if they do not fit); the views
    # are augmented there in one batched call.
    dataset = DeviceDataset(images, device=device)

    torch.manual_seed(cfg.seed)
    data_generator = torch.Generator().manual_seed(cfg.seed)  # augmentation draws (CPU)
    # PGD random starts; under DDP each rank its own stream (rank 0's is the single-process one).
    attack_seed = cfg.seed + 1 + 1_000_003 * rank
    attack_generator = torch.Generator(device).manual_seed(attack_seed)
    model = build_model(
        cfg.model, in_channels=images.shape[1], dual_bn=cfg.is_adversarial,
        stem="stl" if images.shape[-1] >= 96 else "cifar",
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    loss_fn = ACLLoss(weight_w=0.0, lambda1=cfg.lambda1, lambda2=cfg.lambda2,
                      temperature=cfg.temperature, form=cfg.air_form,
                      gather_distributed=cfg.gather_negatives)
    total_iterations = cfg.epochs * steps_per_epoch
    warmup_iterations = cfg.warmup_epochs * steps_per_epoch

    start_epoch, start_step, sums = 1, 0, {}
    # The current coreset (None: the whole pool) and the record of the epoch's selection.
    subset, selection = None, {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])  # strict
        state = checkpoint["extra"]["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], data_generator, attack_generator)
        start_epoch, start_step, sums = state["epoch"], state["step"], state["sums"]
        subset, selection = state.get("coreset_indices"), state.get("coreset_selection", {})
        if main:
            print(f"fastacl: resuming {out} at epoch {start_epoch}, step {start_step}")
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        saved = {"config": dataclasses.asdict(cfg), "versions": _versions(),
                 "steps_per_epoch": steps_per_epoch, "train_images": n_images,
                 "validation_images": validation.numel(),
                 "world_size": world_size}
        _atomic_write_text(out / "config.json", json.dumps(saved, indent=2))
    if main:
        print("fastacl: config\n" + json.dumps(dataclasses.asdict(cfg), indent=2))
    if world_size > 1:
        if cfg.sync_bn:  # shares the parameters: the optimiser above stays valid
            model = distributed.convert_sync_batchnorm(model, device)
        # Each rank keeps its own BN running statistics (rank 0's are saved), unless sync_bn.
        model = distributed.wrap_ddp(model, device)
        if checkpoint is not None:
            _restore_rank_state(checkpoint["extra"]["train_state"].get("ranks"), model,
                                attack_generator, attack_seed)

    def write_checkpoint(epoch: int, step: int) -> Path:
        ranks = _gather_rank_state(model, attack_generator, cfg) if world_size > 1 else None
        if not main:
            return out / CHECKPOINT_NAME
        train_state = {"config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                       "rng": _rng_state(data_generator, attack_generator), "epoch": epoch,
                       "step": step, "sums": sums, "coreset_indices": subset,
                       "coreset_selection": selection, "ranks": ranks}
        return save_checkpoint(
            out / CHECKPOINT_NAME, model, method=cfg.method,
            encoder_branch="adv" if cfg.is_adversarial else "normal",
            attack={"norm": "linf", "eps": cfg.eps, "step_size": cfg.step_size,
                    "steps": cfg.attack_steps},
            dataset=cfg.dataset, train_state=train_state,
        )

    checkpoint_path = out / CHECKPOINT_NAME
    stop = _StopRequest(verbose=main)
    previous_handler = signal.signal(signal.SIGINT, stop)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            strength = augmentation_strength(cfg, epoch)
            # DynACL: w(e) = (2/3)(1 - s(e)) shifts weight towards the adversarial term.
            loss_fn.weight_w = (2 / 3) * (1 - strength) if cfg.is_dynamic else 0.0
            # The epoch's shuffle depends only on (seed, epoch): a resumed run finds its place.
            shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            if start_step == 0 and _is_selection_epoch(cfg, epoch):  # rank 0 selects for all
                selection = distributed.on_main_process(functools.partial(
                    _select, cfg, distributed.unwrap_ddp(model), dataset, pool, validation, epoch,
                    device))
                subset = selection.pop("indices")
            epoch_pool = pool if subset is None else subset
            epoch_steps = epoch_pool.numel() // cfg.batch_size
            batches = itertools.islice(
                dataset.batches(cfg.batch_size, shuffle, indices=epoch_pool), start_step, None)
            bar = _progress(epoch_steps, f"epoch {epoch}/{cfg.epochs}", enabled=main)
            bar.update(start_step)
            model.train()
            epoch_start = time.perf_counter()
            for step, index in enumerate(batches, start=start_step):
                # The schedule counts epochs: a coreset epoch's steps sweep a whole epoch of it.
                iteration = (epoch - 1) * steps_per_epoch + step * steps_per_epoch / epoch_steps
                lr = warmup_cosine_lr(iteration, total_iterations, warmup_iterations, cfg.lr,
                                      cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x1, x2, x_orig = _rank_views(dataset, index, strength, data_generator,
                                             cfg.interpolation, rank, world_size)
                if cfg.channels_last:
                    x1, x2, x_orig = (t.contiguous(memory_format=torch.channels_last)
                                      for t in (x1, x2, x_orig))
                terms = train_step(model, loss_fn, optimizer, x_orig, x1, x2, cfg,
                                   attack_generator)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                sums["steps"] = sums.get("steps", 0) + 1
                bar.set_postfix(loss=f"{float(terms['total']):.4f}", lr=f"{lr:.3g}")
                bar.update(1)
                if on_step is not None and on_step(epoch, step, terms):
                    stop()
                if world_size > 1:  # every rank stops after the same step
                    stop.requested = distributed.any_rank(stop.requested)
                if stop.requested:
                    bar.close()
                    path = write_checkpoint(epoch, step + 1)
                    if main:
                        print(f"fastacl: interrupted; checkpoint {path}; continue with "
                              f"`fastacl train --resume {out}`")
                    return TrainResult(out, path, cfg, {"interrupted": True})
            bar.close()
            sums = distributed.mean_over_ranks(sums)  # the same on every rank when gathered
            seconds = time.perf_counter() - epoch_start
            done = epoch_steps - start_step
            last_lr = warmup_cosine_lr(epoch * steps_per_epoch - 1, total_iterations,
                                       warmup_iterations, cfg.lr, cfg.min_lr)
            record = {"epoch": epoch, "lr": last_lr, "strength": strength, "w": loss_fn.weight_w,
                      **{name: value / sums["steps"] for name, value in sums.items()
                         if name != "steps"},
                      "images_per_second": done * cfg.batch_size / max(seconds, 1e-9),
                      "epoch_seconds": seconds, "train_images": epoch_pool.numel(), **selection}
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                print("fastacl: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                             else f"{k}={v}" for k, v in record.items()),
                      flush=True)
            start_step, sums, selection = 0, {}, {}
            checkpoint_path = write_checkpoint(epoch + 1, 0)
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if not main:
        return TrainResult(out, checkpoint_path, cfg, {})
    summary = _finish(cfg, out, distributed.unwrap_ddp(model), checkpoint_path)
    return TrainResult(out, checkpoint_path, cfg, summary)


def _finish(cfg: TrainConfig, out: Path, model, checkpoint_path: Path) -> dict:
    """The end of a run: quick evaluation, summary.json, curves.png."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Selection rounds are part of the training time.
    train_seconds = sum(r["epoch_seconds"] + r.get("selection_seconds", 0.0) for r in records)
    summary = {
        "method": cfg.method, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "final_loss": records[-1]["total"],
        "images_per_second": (sum(r["images_per_second"] * r["epoch_seconds"] for r in records)
                              / max(train_seconds, 1e-9)),
        "train_seconds": train_seconds, "checkpoint": str(checkpoint_path),
    }
    if cfg.coreset is not None:
        summary["selection_seconds"] = sum(r.get("selection_seconds", 0.0) for r in records)
    if cfg.evaluate:
        from fastacl.finetune import quick_evaluation

        summary.update(quick_evaluation(model, cfg))
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_curves(records, out / "curves.png")
    if "standard_accuracy" in summary:
        print(f"fastacl: {cfg.method} on {cfg.dataset}: standard accuracy "
              f"{100 * summary['standard_accuracy']:.2f}%, robust accuracy "
              f"{100 * summary['robust_accuracy']:.2f}% ({summary['attack']})")
    print(f"fastacl: run written to {out}")
    return summary


def plot_curves(records: list[dict], path: Path) -> None:
    """Each loss term, lr and augmentation strength per epoch, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    terms = [k for k in ("total", "natural", "adversarial", "sir", "air") if k in records[0]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in terms:
        axes[0].plot(epochs, [r[name] for r in records], marker=".", label=name)
    axes[0].set_title("loss terms")
    axes[0].legend()
    axes[1].plot(epochs, [r["lr"] for r in records], marker=".")
    axes[1].set_title("learning rate (end of epoch)")
    axes[2].plot(epochs, [r["strength"] for r in records], marker=".", label="strength s")
    axes[2].plot(epochs, [r["w"] for r in records], marker=".", label="w")
    axes[2].set_title("augmentation strength and w")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
