"""Checkpoints: an explicit schema, atomic writes, weights_only loading, strict state dicts.

A fastacl checkpoint is a torch.save'd dict:

    {
      "format": "fastacl.checkpoint",
      "format_version": 1,
      "model_spec": {"name": "resnet18", "kwargs": {...}} or None (a user module),
      "state_dict": {...},                      # the model's, keys without DDP/compile prefixes
      "extra": {...},                           # whatever the caller passed (see save_checkpoint)
      "versions": {"fastacl": "...", "torch": "..."},
    }

Everything in it loads with ``torch.load(weights_only=True)``: tensors, dicts (also OrderedDict,
Counter), lists, tuples, sets, numbers, strings, bytes, None, torch.dtype / device / Size.
``save_checkpoint`` checks this before it writes, so a checkpoint that cannot be loaded safely
is never written.

``load_checkpoint`` (and fastacl.evaluate) take the file or the run directory holding it
(fastacl.train's ``checkpoint.pt``). A file that is missing, unreadable, truncated or of another
kind raises a fastacl error naming it (fastacl.errors: the ``fastacl`` command prints it as one
sentence), never torch's own message, whose advice to retry with weights_only=False is not one
fastacl gives.

Loading a state dict is strict (docs/acl-air.md section 10: the published fine-tuning code loads
with strict=False and silently leaves BN and shortcut weights at their init). A missing or
unexpected key, or a shape mismatch, raises StateDictMismatchError naming the keys.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastacl
from fastacl.errors import BadFileError, MissingFileError
from fastacl.models.registry import build_model
from fastacl.utils import unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "StateDictMismatchError",
    "build_model_from_checkpoint",
    "check_checkpoint",
    "check_weights_only_safe",
    "checkpoint_file",
    "load_checkpoint",
    "load_state_dict_strict",
    "read_checkpoint_file",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "fastacl.checkpoint"
FORMAT_VERSION = 1
# The file fastacl.train writes in its run directory (fastacl.pretrain.state.CHECKPOINT_NAME).
CHECKPOINT_NAME = "checkpoint.pt"
_REQUIRED_KEYS = ("format", "format_version", "model_spec", "state_dict", "extra")
# What torch.load(weights_only=True) rebuilds (checked on torch 2.13). Exact types, not
# isinstance: a str-Enum, a namedtuple or a defaultdict does not load.
_SAFE_LEAF_TYPES = (
    type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
)
# Counter: LR schedulers keep their milestones in one (MultiStepLR.state_dict()).
_SAFE_MAPPING_TYPES = (dict, collections.OrderedDict, collections.Counter)
_SAFE_SEQUENCE_TYPES = (list, tuple, set)
_MAX_KEYS_LISTED = 40


class CheckpointError(BadFileError, RuntimeError):
    """A checkpoint is not in fastacl's format, or cannot be read or used.

    A BadFileError (the ``fastacl`` command prints it as one sentence) that is also the
    RuntimeError it used to be, so existing ``except RuntimeError`` keeps working.
    """


class StateDictMismatchError(CheckpointError):
    """A state dict does not fit the model: the message lists every offending key."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str],
                 where: str | None = None):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.where = where  # the file the state dict came from, when known
        parts = [(f"{where}: " if where else "")
                 + "state dict does not match the model (loading is strict):"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                listed = ", ".join(keys[:_MAX_KEYS_LISTED])
                more = len(keys) - _MAX_KEYS_LISTED
                parts.append(f"  {title} ({len(keys)}): {listed}"
                             + (f", ... and {more} more" if more > 0 else ""))
        everything = missing + unexpected
        if any(".bn_list." in key for key in everything):
            parts.append("  hint: 'bn_list' keys are the ACL/DynACL/AIR authors' layout; convert "
                         "with fastacl.models.import_published_state_dict")
        elif any(key.startswith("module.") for key in unexpected):
            parts.append("  hint: 'module.' prefixes come from a DataParallel/DDP wrapper; save "
                         "the unwrapped model (save_checkpoint does this)")
        elif ({_without_branch(k) for k in missing} & {_without_branch(k) for k in unexpected}
              and any(".normal." in k or ".adv." in k for k in everything)):
            # The same BN named with a branch on one side and without on the other.
            parts.append("  hint: one side has dual BN ('normal'/'adv') and the other not: check "
                         "dual_bn")
        super().__init__("\n".join(parts))


def _without_branch(key: str) -> str:
    return key.replace(".normal.", ".").replace(".adv.", ".")


def check_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value (by its path) weights_only loading would refuse."""
    if type(obj) in (torch.Tensor, nn.Parameter) or type(obj) in _SAFE_LEAF_TYPES:
        return
    if type(obj) in _SAFE_MAPPING_TYPES:
        for key, value in obj.items():
            check_weights_only_safe(key, f"{where} (key {key!r})")
            check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in _SAFE_SEQUENCE_TYPES:
        for index, value in enumerate(obj):
            check_weights_only_safe(value, f"{where}[{index}]")
        return
    hint = ""
    if type(obj).__module__.startswith("numpy"):
        hint = " (convert numpy values with torch.from_numpy / .item() / .tolist())"
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot rebuild; use tensors, dicts, lists, tuples, "
        f"numbers, strings or None{hint}"
    )


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``model`` and ``extra`` to ``path`` atomically; return the path.

    The checkpoint is first written to a temporary file in the same directory, flushed to disk,
    then renamed over ``path`` with os.replace: a crash or an error part-way leaves any existing
    checkpoint at ``path`` intact and no temporary file behind.

    ``extra`` is stored as ``ckpt["extra"]``; by convention the training loop passes ``method``,
    ``encoder_branch`` ("adv" for the ACL family, "normal" for "cl"), ``attack`` (the budget, e.g.
    {"norm": "linf", "eps": 8/255, ...}), ``config``, ``epoch``, ``optimizer`` / ``scheduler``
    (their state_dict()s) and ``rng`` (e.g. torch.get_rng_state()). Every value must load with
    weights_only=True (see check_weights_only_safe); otherwise TypeError, before anything is
    written.
    """
    model = unwrap(model)
    spec = getattr(model, "spec", None)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_spec": spec,
        "state_dict": model.state_dict(),
        "extra": dict(extra),
        # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
        "versions": {"fastacl": str(fastacl.__version__), "torch": str(torch.__version__)},
    }
    check_weights_only_safe(spec, "model.spec")
    check_weights_only_safe(checkpoint["extra"], "extra")
    check_weights_only_safe(checkpoint["state_dict"], "state_dict")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable
    return path


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every OS / file system
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: the file itself, or the checkpoint.pt of a run dir.

    MissingFileError if there is no such file, or the directory holds no checkpoint.pt.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        if inside.is_file():
            return inside
        raise MissingFileError(
            f"{path} is a directory without a {CHECKPOINT_NAME}: pass the run directory of a "
            "fastacl train run that has written its first checkpoint, or a checkpoint file")
    if not path.exists():
        raise MissingFileError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file: pass a checkpoint file or a run "
                              "directory")
    return path


def read_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu"
                         ) -> tuple[Path, Any]:
    """(the file, what it holds): `path` (a file or a run dir) loaded with weights_only=True.

    Whatever the file holds comes back unchecked (a fastacl checkpoint, a published one, a bare
    state dict); check_checkpoint says whether it is fastacl's. A file torch.load cannot read
    raises CheckpointError naming it, as does one holding objects weights_only refuses.
    """
    path = checkpoint_file(path)
    try:
        with warnings.catch_warnings():
            # A plain pickle (not torch.save's protocol 2): the load fails or succeeds without
            # torch's warning about it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return path, torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            # Not chained: torch's message advises weights_only=False, which fastacl never does.
            raise CheckpointError(
                f"{path} is not a fastacl or published checkpoint: it holds a {refused[1]}, "
                "and fastacl loads checkpoints with torch.load(weights_only=True), which "
                "rebuilds only tensors, dicts, lists, tuples, numbers and strings (fastacl never "
                "unpickles other objects)") from None
        cause = None
    except RuntimeError as error:
        if _is_torch_archive(path):
            raise  # the file is whole: the error is not the file's (map_location, say)
        cause = error
    except PermissionError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    except (EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError,
            OverflowError, MemoryError, ImportError) as error:
        # What the pickle machinery raises on bytes that are not a pickle.
        cause = error
    raise CheckpointError(
        f"{path} is not a fastacl or published checkpoint: torch.load cannot read "
        f"{_what_it_is(path)} (truncated, or another kind of file)") from cause


def _is_torch_archive(path: Path) -> bool:
    """A complete zip archive laid out as torch.save writes it (<name>/data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _what_it_is(path: Path) -> str:
    """A few words on a file torch.load could not read, for the error message."""
    with open(path, "rb") as file:
        head = file.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "a zip archive that ends early"
        return "a zip archive that torch.save did not write"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # a multi-byte character cut at the 4096th byte
        text = head[: error.start].decode("utf-8") if error.start > len(head) - 4 else ""
    if text and all(character.isprintable() or character in "\t\n\r" for character in text):
        return "a text file"
    return f"its {path.stat().st_size} bytes"


def check_checkpoint(checkpoint: Any, path: str | os.PathLike = "the checkpoint"
                     ) -> dict[str, Any]:
    """`checkpoint` (what a file held) if it is in fastacl's format, else CheckpointError."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(checkpoint, dict) and any(
            ".bn_list." in str(key) for key in checkpoint.get("state_dict", checkpoint)
        ):
            hint = (" It looks like an ACL/DynACL/AIR authors' checkpoint: load it with "
                    "fastacl.models.build_model_from_published (fastacl.evaluate takes it).")
        raise CheckpointError(f"{path} is not a fastacl checkpoint (no format "
                              f"{CHECKPOINT_FORMAT!r}).{hint}")
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this fastacl reads versions 1 to "
            f"{FORMAT_VERSION} (a newer fastacl wrote it?)"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint fields {missing}")
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a fastacl checkpoint with ``weights_only=True`` and check its format.

    path: the file, or a run directory holding checkpoint.pt. A missing file raises
    MissingFileError; an unreadable one, or one not in fastacl's format, CheckpointError
    (a BadFileError), both naming the file.
    """
    path, checkpoint = read_checkpoint_file(path, map_location=map_location)
    return check_checkpoint(checkpoint, path)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict`` that fails, naming the keys, on any key or shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched)
    model.load_state_dict(state_dict, strict=True)


def build_model_from_checkpoint(
    checkpoint: dict[str, Any] | str | os.PathLike, map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the model a checkpoint (dict or path) describes and load its weights strictly.

    The model comes back in train mode, as any freshly built module; call .eval() for features.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint, map_location=map_location)
    spec = checkpoint.get("model_spec")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(
            "the checkpoint holds no model spec (it was saved from a user module): build that "
            "module yourself and load checkpoint['state_dict'] with "
            "fastacl.models.load_state_dict_strict"
        )
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    load_state_dict_strict(model, checkpoint["state_dict"])
    return model
