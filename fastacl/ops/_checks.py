"""Input checks shared by the ops: each error names the bad value and what was expected."""

from __future__ import annotations

import torch


def check_embeddings(op: str, **tensors: torch.Tensor) -> None:
    """All tensors [N, d], floating point, N >= 2, the same shape, device and dtype."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [N, d], got shape {tuple(t.shape)}")
        if t.shape[0] < 2:
            raise ValueError(
                f"{op}: {name} needs at least 2 rows (a batch of N >= 2 samples), got {t.shape[0]}"
            )
        if t.shape[1] == 0:  # cosine similarity of empty vectors is undefined
            raise ValueError(f"{op}: {name} has no features (shape {tuple(t.shape)}): d must be "
                             ">= 1")
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has "
                f"{tuple(first.shape)}: the views must match row for row"
            )
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{op}: {name} is {t.dtype} on {t.device} but {first_name} is "
                f"{first.dtype} on {first.device}"
            )


def check_temperature(op: str, temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    return temperature


FORMS = ("exact", "reference-code")


def check_form(op: str, form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"{op}: unknown form {form!r}: expected one of {', '.join(FORMS)}")
    return form


def autocast_off(tensor: torch.Tensor):
    """Autocast disabled on `tensor`'s device: the loss ops compute in their inputs' precision.

    Inside a bf16 autocast region the ops' PyTorch path would otherwise run its matmuls in bf16
    (autocast reaches into a custom op's body); the losses are softmaxes over the batch and are
    meant to be fp32 whatever the backbone ran in. The backward is never under autocast."""
    return torch.autocast(tensor.device.type, enabled=False)
