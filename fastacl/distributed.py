"""torch.distributed for fastacl: launch detection, the differentiable all-gather behind
cross-rank negatives, synchronised BN on CPU, and the rank-0 / agreement helpers of the trainer.

Gradient convention. Under DDP every rank r computes a loss L_r from its local embeddings and
DDP averages the parameter gradients over the W ranks, so the update follows the gradient of
mean_r L_r. Each collective here is differentiable with exactly that convention: its backward
hands rank r the gradient of sum_s L_s with respect to rank r's input (for an all-gather: the
all-reduced (summed) incoming gradient, then rank r's rows; for an all-reduce: the all-reduced
incoming gradient). When every rank computes the loss of the whole gathered batch (each L_r is
the full-batch loss L), rank r's embedding gradient is W times its slice of dL/dz, and DDP's
average gives exactly the single-process gradient of the full batch (at the price of every rank
computing the whole (2WN)^2 NT-Xent, small next to the encoder). Every rank must call a
collective with tensors of the same shape, in the same order.

    torchrun --standalone --nproc_per_node 2 -m fastacl train ...

`fastacl train` calls `init_from_env` itself; library users who run their own loop call
`torch.distributed.init_process_group` as usual and use `all_gather` / `nt_xent(...,
gather_distributed=True)`.
"""

from __future__ import annotations

import gc
import inspect
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fastacl.errors import ConfigError

__all__ = [
    "CPUSyncBatchNorm",
    "all_gather",
    "all_gather_rows",
    "all_reduce_sum",
    "any_rank",
    "check_same_on_all_ranks",
    "convert_sync_batchnorm",
    "destroy",
    "env_world_size",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "local_rank",
    "mean_over_ranks",
    "on_main_process",
    "rank",
    "rank_device",
    "world_size",
    "wrap_ddp",
]

T = TypeVar("T")


# ---- environment and process group -------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process: RANK and
    WORLD_SIZE are in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def is_distributed() -> bool:
    """A default process group exists (world size 1 included)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK, set by torchrun); 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def init_from_env(device: str | torch.device) -> bool:
    """Initialise the default process group when launched by torchrun and none exists yet.

    nccl when `device` is a CUDA device (each process then uses cuda:LOCAL_RANK), gloo otherwise.
    Returns True when this call created the group (the caller then owns `destroy`).
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank()} has no GPU: this node has {torch.cuda.device_count()}"
                "; launch at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def destroy() -> None:
    """Destroy the default process group (if any), after freeing what still holds it."""
    if is_distributed():
        # A DDP module kept alive by a reference cycle would otherwise outlive the group, and
        # its reducer's teardown can then wait on the other ranks until the timeout.
        gc.collect()
        dist.destroy_process_group()


def rank_device(device: str | torch.device) -> torch.device:
    """This rank's device: a bare "cuda" becomes cuda:LOCAL_RANK when distributed."""
    device = torch.device(device)
    if device.type != "cuda" or world_size() == 1:
        return device
    if device.index is not None and device.index != local_rank():
        raise ConfigError(
            f"device {device} names one GPU, but under torchrun every process has its own: "
            f"pass device 'cuda' (or 'auto'), and rank {rank()} uses cuda:LOCAL_RANK"
        )
    return torch.device("cuda", local_rank())


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(model: nn.Module, device: str | torch.device) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over `model` on this rank's `device`, without the buffer broadcast
    before every forward: each rank keeps its own BN running statistics (with synchronised BN
    they are the global batch's anyway). Buffers are still made equal once, at construction."""
    device = torch.device(device)
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    # torch >= 2.13 renames broadcast_buffers (deprecated) to forward_sync_buffers.
    buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in parameters
               else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **buffers
    )


# ---- differentiable collectives ----------------------------------------------------------------

class _AllGather(torch.autograd.Function):
    """Z = cat over ranks of z_r along dim 0, on every rank.

    Backward: Z is an input of every rank's loss, so d(sum_s L_s)/dz_r = sum_s (dL_s/dZ)[rows of
    r]: all-reduce (sum) the incoming gradient, keep this rank's rows.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming grad is shared
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """S = sum over ranks of x_r, on every rank. Backward: d(sum_s L_s)/dx_r = sum_s dL_s/dS."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, rank order, [W * n, ...]; differentiable (see the module docstring
    for the gradient convention). Every rank passes the same shape. No-op without a group."""
    if world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)


def all_gather_rows(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """all_gather of several [n, d_i] tensors in one collective (None passes through)."""
    present = [t for t in tensors if t is not None]
    if world_size() == 1 or not present:
        return tensors
    widths = [t.shape[1] for t in present]
    gathered = iter(all_gather(torch.cat(present, dim=1)).split(widths, dim=1))
    return tuple(None if t is None else next(gathered) for t in tensors)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of `group` (default all), on every rank; differentiable."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


# ---- synchronised batch norm on CPU ------------------------------------------------------------

class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the batch of all ranks, for gloo / CPU (torch.nn.SyncBatchNorm refuses CPU
    tensors, and DDP refuses it on a CPU module). In training with a process group, the mean and
    the biased variance are those of the concatenated global batch, from two differentiable
    all-reduces of per-channel sums (two passes: sum x, then sum (x - mean)^2, as precise as
    single-process BN); the running statistics get the same update as single-process BN on the
    global batch. Otherwise it is plain batch norm. Same parameters and buffers as nn.BatchNorm*d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // channels], dtype=input.dtype, device=input.device)
        sums = all_reduce_sum(torch.cat([input.sum(dims), count]), self.process_group)
        total = sums[channels:].detach()
        mean = sums[:channels] / total
        centered = input - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims), self.process_group) / total
        output = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                # running_var takes the unbiased variance, as F.batch_norm does
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        return output


def convert_sync_batchnorm(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Every BatchNorm layer in `module` (the .normal / .adv layers of dual BN included) made
    synchronised: torch.nn.SyncBatchNorm on CUDA, CPUSyncBatchNorm elsewhere. Parameters and
    buffers are shared with the old layers (an optimiser built before stays valid); in place for
    any module that is not itself a BN layer."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, CPUSyncBatchNorm
    ):
        synced = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                  module.affine, module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean = module.running_mean
        synced.running_var = module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


# ---- rank-0 work and agreement -----------------------------------------------------------------

def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (e.g. a stop request)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank passes the same keys, in the same order)."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64,
                           device=_collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist(), strict=True))


def on_main_process(fn: Callable[[], T]) -> T:
    """fn() on rank 0, its result (or its exception) broadcast to every rank.

    For decisions that must be taken once (a new run directory, whether it exists): if the ranks
    each decided, one could raise while the others wait in a collective forever. fn runs on rank
    0 alone, so it must not call a collective itself (nor run a model with synchronised BN in
    train mode, nor a DDP module's forward).
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # re-raised on every rank below
            try:
                pickle.dumps(err)
            except Exception:  # an exception that cannot travel: its type and text can
                err = RuntimeError(f"{type(err).__name__}: {err}")
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    status, value = box[0]
    if status == "error":
        raise value
    return value


def check_same_on_all_ranks(values: dict[str, Any], what: str = "config") -> None:
    """ConfigError (a ValueError) on every rank unless every rank passed equal `values` (e.g.
    the resolved TrainConfig): ranks that train with different settings would deadlock or
    silently diverge."""
    if world_size() == 1:
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, values)
    reference = gathered[0]
    differences = []
    for other_rank, other in enumerate(gathered[1:], start=1):
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                differences.append(f"{key} is {reference.get(key)!r} on rank 0 but "
                                   f"{other.get(key)!r} on rank {other_rank}")
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise ConfigError(f"the ranks disagree on the {what}: {shown}. Launch every rank with "
                         "the same arguments (and the same fastacl version)")


def gather_objects(value: T) -> Sequence[T]:
    """[value of rank 0, value of rank 1, ...] on every rank (pickled; for small objects)."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
