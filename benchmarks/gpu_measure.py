"""Shared by the GPU op benchmarks: peak memory of one step and the header line of a table."""

from __future__ import annotations

import datetime
import subprocess

import torch


def peak_mib(step) -> float:
    """MiB allocated by one call of step() above what was allocated before it (after a warm-up
    call, so that kernel compilation is not measured)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def provenance() -> str:
    """Device, library versions, commit and date: what every results row must carry."""
    import triton

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, commit {commit or '?'}, {datetime.date.today()}")
