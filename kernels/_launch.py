"""What every launcher shares: the device a launch runs on and the target its configs are for.

Launch configurations (block sizes, num_warps) are chosen per target because register allocation
is: the same tile can spill on sm_80 and not on sm_90, or the other way round (ptxas differs by
target). tests/ops/test_triton_compile.py compiles every config the launchers pick, for sm_80 and
sm_90, and fails on a spill; docs/gpu-compile.md has its table.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# A CPU tensor only reaches a launcher under TRITON_INTERPRET=1; it runs the sm_80 configs (tests
# pass capability= to run the others).
INTERPRETER_CAPABILITY = (8, 0)


def on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU: Triton launches on the current device, which for a tensor on
    cuda:1 may be cuda:0. A no-op on the CPU (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability_of(tensor: torch.Tensor, capability: tuple[int, int] | None = None):
    """The compute capability to pick configs for: `capability` when given (the compile check
    asks for 8.0 and 9.0 explicitly), else that of the tensor's GPU."""
    if capability is not None:
        return tuple(capability)
    if tensor.is_cuda:
        return _device_capability(tensor.device.index if tensor.device.index is not None
                                  else torch.cuda.current_device())  # fmt: skip
    return INTERPRETER_CAPABILITY


def target(capability: tuple[int, int]) -> str:
    """The config table a capability uses: "sm_90" for Hopper and data-centre Blackwell (9.x to
    11.x: 227 KiB of shared memory a block), "sm_80" for every other GPU. The sm_80 configs also
    fit the 99 KiB of 8.6 / 8.9 / 12.x (the compile check holds them to it)."""
    return "sm_90" if 9 <= capability[0] <= 11 else "sm_80"
