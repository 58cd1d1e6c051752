"""Loading the pre-trained model to evaluate: a fastacl checkpoint, or a published ACL / DynACL /
AIR / RCS one, with what it records (method, encoder branch, attack budget, dataset)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fastacl.errors import FastaclError
from fastacl.models import build_model_from_checkpoint, build_model_from_published
from fastacl.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    StateDictMismatchError,
    check_checkpoint,
    read_checkpoint_file,
)

__all__ = ["Pretrained", "load_pretrained"]


@dataclass
class Pretrained:
    """A pre-trained model and what its checkpoint says about it (None: not recorded)."""

    model: nn.Module
    method: str | None
    encoder_branch: str
    eps: float | None
    dataset: str | None
    source: str  # "fastacl" | "published"
    path: Path | None = None  # the file read (a run dir's checkpoint.pt); None: a dict was given


def _is_published(raw: Any) -> bool:
    """The authors' layout: their dual BN saved as `bn_list` (a bare or wrapped state dict)."""
    keys = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    return isinstance(keys, dict) and any(".bn_list." in str(key) for key in keys)


def _naming(path: Path, error: StateDictMismatchError) -> StateDictMismatchError:
    """The same mismatch, its message naming the file."""
    return StateDictMismatchError(error.missing, error.unexpected, error.mismatched, str(path))


def _load_published(path: Path, raw: dict) -> Pretrained:
    try:
        model = build_model_from_published(raw)
    except StateDictMismatchError as error:
        raise _naming(path, error) from None
    except FastaclError:
        raise
    except ValueError as error:  # keys outside the documented layout, an unknown stem
        raise CheckpointError(f"{path} has the published checkpoints' bn_list keys but does not "
                              f"fit their ResNet or WideResNet layouts: {error}") from None
    return Pretrained(model, None, "adv", None, None, "published", path)


def _describe(raw: Any) -> str:
    """What a file that is neither kind of checkpoint holds, in a few words."""
    if not isinstance(raw, dict):
        return f"it holds a {type(raw).__name__}"
    keys = [repr(key) for key in list(raw)[:3]] + (["..."] if len(raw) > 3 else [])
    return (f"it holds a dict ({', '.join(keys) or 'empty'}) with neither format "
            f"{CHECKPOINT_FORMAT!r} nor the published checkpoints' bn_list keys")


def load_pretrained(checkpoint: str | os.PathLike | dict, map_location: Any = "cpu"
                    ) -> Pretrained:
    """A fastacl checkpoint (path, run dir or dict) or a published ACL / DynACL / AIR one (path).

    The file is read once, with torch.load(weights_only=True). A missing file raises
    MissingFileError; one that is unreadable, or neither kind of checkpoint, CheckpointError
    (a BadFileError); both name the file. Loading is strict (docs/acl-air.md section 10): a
    missing, unexpected or mis-shaped key raises fastacl.models.StateDictMismatchError naming it.
    """
    path = None
    if not isinstance(checkpoint, dict):
        path, raw = read_checkpoint_file(checkpoint, map_location=map_location)
        if _is_published(raw):
            return _load_published(path, raw)
        if not (isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT):
            raise CheckpointError(f"{path} is not a fastacl or published checkpoint: "
                                  f"{_describe(raw)}")
        checkpoint = check_checkpoint(raw, path)
    try:
        model = build_model_from_checkpoint(checkpoint, map_location=map_location)
    except StateDictMismatchError as error:
        if path is None:
            raise
        raise _naming(path, error) from None
    extra = checkpoint.get("extra", {})
    branch = extra.get("encoder_branch") or ("adv" if getattr(model, "dual_bn", True)
                                             else "normal")
    eps = (extra.get("attack") or {}).get("eps")
    return Pretrained(model, extra.get("method"), branch, eps, extra.get("dataset"), "fastacl",
                      path)
