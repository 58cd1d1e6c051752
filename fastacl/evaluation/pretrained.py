"""Loading the pre-trained model to evaluate: a fastacl checkpoint, or a published ACL / DynACL /
AIR one, with what it records (method, encoder branch, attack budget, dataset)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastacl.errors import MissingFileError
from fastacl.models import (
    CheckpointError,
    build_model_from_checkpoint,
    build_model_from_published,
    load_checkpoint,
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


def _load_published(path: Path, map_location: Any) -> Pretrained | None:
    """A published checkpoint (its dual BN saved as `bn_list`), or None if `path` is not one."""
    raw = torch.load(path, map_location=map_location, weights_only=True)
    keys = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    if not any(".bn_list." in str(key) for key in keys):
        return None
    return Pretrained(build_model_from_published(raw), None, "adv", None, None, "published")


def load_pretrained(checkpoint: str | os.PathLike | dict, map_location: Any = "cpu"
                    ) -> Pretrained:
    """A fastacl checkpoint (path or dict) or a published ACL / DynACL / AIR one (path).

    Loading is strict (docs/acl-air.md section 10): a missing, unexpected or mis-shaped key
    raises fastacl.models.StateDictMismatchError naming it.
    """
    if not isinstance(checkpoint, dict):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise MissingFileError(f"checkpoint {path} does not exist")
        try:
            checkpoint = load_checkpoint(path, map_location=map_location)
        except CheckpointError:
            published = _load_published(path, map_location)
            if published is None:
                raise
            return published
    model = build_model_from_checkpoint(checkpoint, map_location=map_location)
    extra = checkpoint.get("extra", {})
    branch = extra.get("encoder_branch") or ("adv" if getattr(model, "dual_bn", True)
                                             else "normal")
    eps = (extra.get("attack") or {}).get("eps")
    return Pretrained(model, extra.get("method"), branch, eps, extra.get("dataset"), "fastacl")
