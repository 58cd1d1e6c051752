"""Which implementation of an op runs: Triton, the C++ extension, or the PyTorch reference.

FASTACL_BACKEND=auto|triton|cpp|torch is read at every call (so it can be changed between calls),
and `use_backend(...)` overrides it inside a block. "auto" takes the fastest path an op has for
the tensor's device: Triton for CUDA tensors, the C++ extension where the op has one and it is
loaded, the reference otherwise. Forcing a path that an op does not have (say "cpp" for nt_xent,
which has no C++ kernel) runs that op's reference, so one global setting can be used for a whole
training run. Forcing a path that the op has but that cannot run raises a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

from fastacl.errors import BackendError

BACKENDS = ("auto", "triton", "cpp", "torch")

_local = threading.local()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastacl backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost `use_backend` block, else FASTACL_BACKEND."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_backend(os.environ.get("FASTACL_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with the given backend (overrides FASTACL_BACKEND in this thread)."""
    _check_backend(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpreter() -> bool:
    """True when Triton kernels run through the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select(op: str, tensor: torch.Tensor, paths: tuple[str, ...]) -> str:
    """Pick the path for one call of `op` on `tensor`; `paths` are the fast paths the op has."""
    requested = requested_backend()
    if requested == "auto":
        if "triton" in paths and tensor.is_cuda and triton_available():
            return "triton"
        if "cpp" in paths:
            from fastacl.ops._extension import extension_available

            if extension_available():
                return "cpp"
        return "torch"
    if requested == "torch" or requested not in paths:
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise BackendError(f"{op}: FASTACL_BACKEND=triton but triton is not installed")
        if not (tensor.is_cuda or triton_interpreter()):
            raise BackendError(
                f"{op}: FASTACL_BACKEND=triton needs CUDA tensors, got a {tensor.device} tensor; "
                "to run the Triton kernels on the CPU set TRITON_INTERPRET=1 before importing "
                "fastacl"
            )
        return "triton"
    # requested == "cpp"
    from fastacl.ops._extension import extension_available, extension_status

    if not extension_available():
        raise BackendError(
            f"{op}: FASTACL_BACKEND=cpp but the C++ extension is not available: "
            f"{extension_status()['detail']}"
        )
    return "cpp"
