"""Small helpers shared by the pre-training loop, RCS and the evaluation: one copy of each."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fastacl.errors import ConfigError


def check_choice(name: str, value, choices: Sequence) -> object:
    """`value` if it is one of `choices`, else a ConfigError naming the field and the choices."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_device(device: str | torch.device) -> torch.device:
    """"auto" (CUDA if torch sees it, else the CPU), "cpu", "cuda" or "cuda:N", checked against
    what torch sees: a ConfigError names the device and the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} was asked for but torch sees no CUDA device; "
                              "use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device} was asked for but torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return resolved


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16 / fp16 / fp32 (what autocast hands back), float64 kept: losses are never
    computed below fp32, and a float64 model's stay float64 (the float64 reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DataParallel / DistributedDataParallel / torch.compile wrappers.

    Attacks run on it (a forward through DDP would arm its gradient all-reduce) and checkpoints
    save it (no 'module.' / '_orig_mod.' prefixes in the state dict).
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers never see half,
    and a failed write (a full disk) leaves the previous file and no temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
            capture_output=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """What produced a result: library versions, the git commit (source checkouts), the device."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    import fastacl  # the package's __version__; utils is imported while fastacl loads

    record = {"fastacl": fastacl.__version__, "torch": torch.__version__,
              "numpy": numpy.__version__, "python": platform.python_version(),
              "cuda": torch.version.cuda, "git_commit": _git_commit(),
              "device_name": (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else "cpu")}
    try:
        record["pyautoattack"] = version("pyautoattack")
    except PackageNotFoundError:
        pass
    return record


class _LogLines:
    """tqdm's interface, written as a plain line every `interval` seconds (and at the end).

    Used when stderr is not a terminal (nohup, a log file, a cluster job), where a bar would
    print nothing useful: `desc: step / total, rate, ETA, postfix`.
    """

    def __init__(self, total: int, desc: str, unit: str, interval: float, initial: int) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.initial = initial  # a resumed run starts part-way: not work done now
        self.postfix, self.written = "", None
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def _write(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        self.written = self.n
        print(f"fastacl: {self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.3g} "
              f"{self.unit}/s, ETA {eta_text} {self.postfix}".rstrip(),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        # Work long enough to have printed a line: say where it ended (once).
        if self.last > self.start and self.written != self.n:
            self._write(time.monotonic())


def progress(total: int, desc: str, enabled: bool | None = True, unit: str = "step",
             initial: int = 0, interval: float = 30.0):
    """A progress display for `total` units of work.

    A tqdm bar when stderr is a terminal; otherwise (nohup, a log file, a cluster job) a plain
    line every `interval` seconds. enabled=False shows nothing (ranks other than 0 under DDP,
    callers that report themselves); None is the same as True.
    initial: units already done (a resumed epoch); they do not count towards the rate.
    """
    from tqdm.auto import tqdm

    terminal = sys.stderr.isatty()
    if enabled is False:
        return tqdm(total=total, disable=True)
    if terminal:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                    leave=False)
    return _LogLines(total, desc, unit, interval, initial)
