"""A run's state on disk and in memory: the run dir, config.json, metrics, checkpoints and
resume, the random streams and their seeds, the per-rank state under DDP, Ctrl-C.

Everything a resumed run needs is in checkpoint.pt (model, optimiser, RNG states, the position
in the epoch, the epoch's running sums, the coreset), so a resumed run ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastacl import distributed
from fastacl.config import TrainConfig
from fastacl.errors import ConfigError, MissingFileError, RunDirError
from fastacl.models import load_checkpoint, save_checkpoint
from fastacl.models.checkpoint import CHECKPOINT_NAME
from fastacl.utils import atomic_write_text, unwrap, versions

# ---- seeds -------------------------------------------------------------------------------------

# One seed scheme: every random stream of a run is derived here from (seed, purpose, epoch,
# rank). The offsets are primes, so no two streams of a run share a seed; they are fixed, so a
# checkpoint resumes the same streams in any later version.
_PRIME = 1_000_003
_SELECTION_OFFSET = 500_009


def stream_seed(seed: int, purpose: str, epoch: int = 0, rank: int = 0) -> int:
    """The seed of one random stream of a run.

    "init": the global RNG (model initialisation); "augment": the views' draws; "validation":
    which images are held out as U; "attack": the PGD random starts (each rank its own; rank 0's
    is the single-process stream); "shuffle": the order of epoch `epoch`; "selection": the RCS
    round at `epoch`; "random-coreset": the random subset.
    """
    if purpose in ("init", "augment", "validation"):
        return seed
    if purpose == "attack":
        return seed + 1 + _PRIME * rank
    if purpose == "shuffle":
        return seed * _PRIME + epoch
    if purpose == "selection":
        return seed * _PRIME + epoch + _SELECTION_OFFSET
    if purpose == "random-coreset":
        return seed + _SELECTION_OFFSET
    raise ValueError(f"unknown random stream {purpose!r}")


def rng_state(data_generator: torch.Generator, attack_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state(),
             "attack": attack_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, data_generator: torch.Generator,
                  attack_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    attack_generator.set_state(state["attack"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rank_state(model: nn.Module, attack_generator: torch.Generator,
                      cfg: TrainConfig) -> list:
    """Under DDP, what differs between the ranks, from every rank (a collective): its PGD
    random-start stream and, without sync BN, its BN running statistics (the checkpoint's
    state_dict holds rank 0's). Everything else is the same on every rank."""
    own: dict[str, Any] = {"attack": attack_generator.get_state()}
    if not cfg.distributed.sync_bn:
        own["buffers"] = {name: buffer.detach().cpu()
                          for name, buffer in unwrap(model).named_buffers()}
    return list(distributed.gather_objects(own))


def restore_rank_state(saved: list | None, model: nn.Module,
                       attack_generator: torch.Generator, attack_seed: int) -> None:
    """This rank's part of `gather_rank_state` (after DDP's construction, which copies rank 0's
    buffers to every rank). A checkpoint of another world size: ranks > 0 restart their PGD
    streams from the seed and keep rank 0's BN statistics."""
    rank = distributed.rank()
    if saved is None or len(saved) != distributed.world_size():
        if rank > 0:
            attack_generator.manual_seed(attack_seed)
        return
    attack_generator.set_state(saved[rank]["attack"])
    if "buffers" in saved[rank]:
        with torch.no_grad():
            for name, buffer in unwrap(model).named_buffers():
                buffer.copy_(saved[rank]["buffers"][name])


# ---- the run dir -------------------------------------------------------------------------------

def default_out_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{cfg.method}-{cfg.data.dataset}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started in the same second must not collide
        suffix += 1
        path = Path("runs") / f"{cfg.method}-{cfg.data.dataset}-{stamp}-{suffix}"
    return path


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """The new run's directory (not created yet). A dir holds a run once it holds a checkpoint:
    one that does is refused; one that does not (a start that failed or was killed before its
    first checkpoint) may be used again."""
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out dir {out} is a file, not a directory: choose another out dir")
    if (out / CHECKPOINT_NAME).exists():
        raise RunDirError(
            f"{out} already holds a run; pass resume={str(out)!r} (--resume {out}) to continue "
            "it, or choose another out dir"
        )
    return out


# What a run writes besides its checkpoint; a new start in a dir without a checkpoint replaces
# these, a resume drops what the checkpoint does not account for.
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png")


def remove_temporary_files(out: Path) -> None:
    """Half-written files of a crashed write (atomic writes go through *.tmp files)."""
    for path in out.glob("*.tmp"):
        path.unlink(missing_ok=True)
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in out.glob("*.tmp.png"):
        path.unlink(missing_ok=True)


def write_config(out: Path, cfg: TrainConfig, **facts: Any) -> None:
    """config.json: the resolved config, the library versions and facts of the run's data.
    Files of an earlier start in this dir that never reached a checkpoint are removed."""
    out.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(out)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    saved = {"config": cfg.to_dict(), "versions": versions(), **facts}
    atomic_write_text(out / "config.json", json.dumps(saved, indent=2))


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_before(out: Path, epoch: int) -> None:
    """Drop the metrics of epochs >= `epoch` (and a torn last line): after a crash between an
    epoch's metrics line and its checkpoint, the resumed run logs that epoch again."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            continue
        if record.get("epoch", epoch) < epoch:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def write_checkpoint(out: Path, model: nn.Module, cfg: TrainConfig, train_state: dict) -> Path:
    """checkpoint.pt, written atomically: the model with the schema `fastacl evaluate` reads,
    and `train_state` (optimiser, RNG, position, coreset) for resume."""
    return save_checkpoint(
        out / CHECKPOINT_NAME, model, method=cfg.method, encoder_branch=cfg.encoder_branch,
        attack={"norm": "linf", "eps": cfg.attack.eps, "step_size": cfg.attack.step_size,
                "steps": cfg.attack.steps},
        dataset=cfg.data.dataset, train_state={"config": cfg.to_dict(), **train_state},
        # Which encoder the model is: DynACL's momentum encoder k, or the trained one.
        kept_encoder="momentum" if cfg.model.momentum_encoder else "online",
    )


def load_resume(resume_dir: str | os.PathLike,
                options: dict) -> tuple[TrainConfig, dict, Path]:
    """The saved config, the checkpoint and the run dir of the run in `resume_dir` (a run dir,
    or the checkpoint in it). `options` given with the resume must equal the saved ones (a
    resumed run continues with its saved config)."""
    run_dir = Path(resume_dir)
    if run_dir.is_file() and run_dir.name == CHECKPOINT_NAME:  # the checkpoint inside was named
        run_dir = run_dir.parent
    path = run_dir / CHECKPOINT_NAME
    if not run_dir.is_dir():
        raise MissingFileError(f"cannot resume: there is no run dir {run_dir}")
    if not path.is_file():
        raise RunDirError(
            f"cannot resume {run_dir}: it holds no {CHECKPOINT_NAME} (the run stopped before its "
            f"first checkpoint), so there is nothing to continue; start it again with the same "
            f"options and --out-dir {run_dir}"
        )
    checkpoint = load_checkpoint(path)
    saved = checkpoint.get("extra", {}).get("train_state")
    if not isinstance(saved, dict) or "config" not in saved:
        raise ConfigError(f"cannot resume from {path}: it is not a fastacl.train checkpoint")
    # resolve(): a checkpoint written before a field existed gets that field's default (the
    # saved values are resolved already, and resolve() only fills in what is None).
    cfg = TrainConfig.from_dict(saved["config"]).resolve()
    current = cfg.options()
    for key, value in options.items():
        if current[key] != value:
            raise ConfigError(
                f"cannot change {key} on resume (run has {current[key]!r}, got {value!r}); "
                "a resumed run continues with its saved config"
            )
    return cfg, checkpoint, run_dir


class StopRequest:
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
