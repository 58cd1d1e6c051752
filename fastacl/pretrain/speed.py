"""Run-wide speed and reproducibility settings: the compiled attack model, deterministic mode."""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

from fastacl.models.folded import FoldedResNet18

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
