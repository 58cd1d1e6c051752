"""Robust models users can ship: safetensors weights beside a JSON card that says what they are
and how to rebuild them (docs/export.md).

    fastacl.export_encoder("runs/acl/checkpoint.pt", "shipped/acl")  # `fastacl export`
    encoder = fastacl.load_encoder("shipped/acl")             # [0, 1] images -> features
    classifier = fastacl.load_classifier("evaluated/aff.safetensors")  # [0, 1] images -> logits

Two kinds of export, each one module with a single BN branch (no routing: plain BatchNorm):
- the pre-trained encoder (`export_encoder`, `fastacl export`): OUT/encoder.safetensors holds
  what `encoder_from_branch(model, branch)` gives (the backbone, without the projection head),
  OUT/model_card.json the method, data set, attack budget, branch, backbone spec, training
  config, versions and the source checkpoint's path and sha256;
- a fine-tuned classifier (`save_classifier`, `fastacl evaluate --save DIR`): DIR/<mode>.safetensors
  holds a LinearClassifier (that encoder + the linear head; for AFF the adv branch, the one the
  evaluation attacks), DIR/<mode>.json its architecture and the evaluation's accuracies.

The card is the authority: a loader rebuilds the module it describes with build_model, checks
the weights file against the card's sha256 and loads it strictly. The modules take images in
[0, 1] (the input normalisation is inside them, as in every fastacl model) and come back on the
CPU in eval mode.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastacl.errors import BadFileError, ConfigError, MissingFileError
from fastacl.evaluation.networks import DualBNClassifier, LinearClassifier
from fastacl.evaluation.pretrained import Pretrained, load_pretrained
from fastacl.models import (
    BRANCHES,
    StateDictMismatchError,
    build_model,
    check_branch,
    encoder_from_branch,
    has_dual_bn,
    load_state_dict_strict,
)
from fastacl.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_checkpoint,
    read_checkpoint_file,
)
from fastacl.utils import atomic_write_text, unwrap, versions

__all__ = [
    "CARD_VERSION",
    "CLASSIFIER_FORMAT",
    "ENCODER_CARD",
    "ENCODER_FORMAT",
    "ENCODER_WEIGHTS",
    "export_encoder",
    "load_classifier",
    "load_encoder",
    "save_classifier",
    "sha256_file",
]

ENCODER_FORMAT = "fastacl.encoder"
CLASSIFIER_FORMAT = "fastacl.classifier"
CARD_VERSION = 1
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CARD = "model_card.json"


# ---- files -------------------------------------------------------------------------------------

def _safetensors():
    """safetensors (with .torch), imported on first use: `import fastacl` does not need it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("fastacl's exports are safetensors files: pip install safetensors "
                          "(a fastacl dependency)") from None
    return safetensors


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_weights(path: Path, module: nn.Module, kind: str) -> dict[str, str]:
    """module's state dict as safetensors at `path`, atomically; the card's "weights" entry."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in
               module.state_dict().items()}
    data = _safetensors().torch.save(tensors, metadata={"format": "pt", "fastacl": kind})
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; a shipped model is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}


def _write_card(path: Path, card: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(card, indent=2) + "\n")


def _read_card(path: Path, expected: str) -> dict[str, Any]:
    """The card at `path`, checked to be of format `expected`."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist" + (
            f": pass a folder written by `fastacl export` (it holds {ENCODER_CARD} and "
            f"{ENCODER_WEIGHTS})" if expected == ENCODER_FORMAT else
            ": pass a classifier written by `fastacl evaluate --save DIR` (DIR/<mode>.safetensors "
            "beside DIR/<mode>.json)"))
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadFileError(f"{path} is not a fastacl model card: it is not JSON ({error})"
                           ) from None
    found = card.get("format") if isinstance(card, dict) else None
    if found != expected:
        other = {ENCODER_FORMAT: "fastacl.load_encoder(<its folder>)",
                 CLASSIFIER_FORMAT: "fastacl.load_classifier(<its .safetensors>)"}
        hint = f"; load it with {other[found]}" if found in other else ""
        raise BadFileError(f"{path} is not a {expected} card (its format is {found!r}){hint}")
    version = card.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= CARD_VERSION:
        raise BadFileError(f"{path} has format_version {version!r}; this fastacl reads versions 1 "
                           f"to {CARD_VERSION} (a newer fastacl wrote it?)")
    return card


def _read_weights(card_path: Path, card: dict[str, Any]) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file the card names, beside it; its tensors), checked against its sha256."""
    entry = card.get("weights") or {}
    path = card_path.parent / str(entry.get("file", ""))
    if not entry.get("file") or not path.is_file():
        raise MissingFileError(f"{path} does not exist: {card_path.name} describes the weights "
                               f"file {entry.get('file')!r} beside it; copy both files together")
    data = path.read_bytes()
    expected = entry.get("sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise BadFileError(f"{path} is not the file {card_path.name} describes (its sha256 "
                           "differs from the card's): the weights were changed or come from "
                           "another export")
    safetensors = _safetensors()
    try:
        return path, safetensors.torch.load(data)
    except safetensors.SafetensorError as error:
        raise BadFileError(f"{path} is not a readable safetensors file ({error})") from None


# ---- rebuilding --------------------------------------------------------------------------------

def _unknown_backbone(where: str, name: Any, error: Exception, fix: str) -> ConfigError:
    return ConfigError(f"{where}: this fastacl's build_model cannot build the backbone {name!r} "
                       f"({error}); {fix}")


def _card_branch(card: dict[str, Any], card_path: Path) -> str:
    branch = card.get("branch")
    if branch not in BRANCHES:
        raise BadFileError(f"{card_path} names the BN branch {branch!r}; expected one of "
                           f"{', '.join(BRANCHES)}")
    return branch


def _rebuild_encoder(card: dict[str, Any], card_path: Path) -> nn.Module:
    """The single-BN encoder module a card describes, with fresh weights.

    It is built as it was exported: build_model(backbone spec), then encoder_from_branch, so any
    backbone build_model knows rebuilds. A single-BN backbone (a "cl" model whose AFF
    fine-tuning made it dual for a while) has the same layout whichever branch it came from.
    """
    spec, branch = card.get("backbone"), _card_branch(card, card_path)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadFileError(f"{card_path} has no backbone spec {{'name': ..., 'kwargs': {{...}}}}, "
                           f"got {spec!r}")
    try:
        model = build_model(spec["name"], **(spec.get("kwargs") or {}))
    except (ConfigError, TypeError) as error:
        raise _unknown_backbone(str(card_path), spec["name"], error, "load it with the fastacl "
                                f"version that wrote it ({card.get('versions', {}).get('fastacl')})"
                                ) from None
    return encoder_from_branch(model, branch if has_dual_bn(model) else "normal")


def _load_strict(module: nn.Module, where: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        load_state_dict_strict(module, tensors)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(error.missing, error.unexpected, error.mismatched,
                                     str(where)) from None


def _input_description(module: nn.Module) -> dict[str, Any]:
    convolution = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    described = {"layout": "[N, C, H, W] float", "range": [0.0, 1.0],
                 "normalization": "inside the module (the backbone's mean / std)"}
    if convolution is not None:
        described["channels"] = convolution.in_channels
    return described


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the encoder -------------------------------------------------------------------------------

def _read_pretrained(checkpoint: str | os.PathLike) -> tuple[Pretrained, dict[str, Any]]:
    """(the pre-trained model, the raw fastacl checkpoint or {} for a published one)."""
    path, raw = read_checkpoint_file(checkpoint)
    if not (isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT):
        return load_pretrained(path), {}  # a published checkpoint, or its error naming the file
    raw = check_checkpoint(raw, path)
    spec = raw["model_spec"]
    if spec is None:
        raise CheckpointError(
            f"{path} was saved from your own module (its model_spec is None), so no card can say "
            "how to rebuild it: save that module's weights yourself, e.g. "
            "safetensors.torch.save_file(encoder.state_dict(), 'encoder.safetensors')")
    try:
        pretrained = load_pretrained(raw)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(error.missing, error.unexpected, error.mismatched,
                                     str(path)) from None
    except (ConfigError, TypeError) as error:  # build_model refused the spec
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise _unknown_backbone(str(path), name, error, "export it with the fastacl version "
                                "that trained it") from None
    pretrained.path = path
    return pretrained, raw


def export_encoder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                   branch: str = "adv") -> Path:
    """Write a checkpoint's encoder, one BN branch, as OUT/encoder.safetensors + model_card.json.

    Args:
        checkpoint: a fastacl checkpoint (fastacl.train's checkpoint.pt or its run directory)
            or a published ACL / DynACL / AIR one.
        out_dir: the folder to write (created; files of an earlier export are replaced).
        branch: the BN branch whose statistics and affine parameters the encoder keeps: "adv"
            (the robust encoder of the ACL family) or "normal" (the only one of a "cl" model).

    Returns the folder. Load it back with `load_encoder(out_dir)`.

    Raises MissingFileError / CheckpointError for a missing or unreadable checkpoint, or one
    saved from a user's own module (no model_spec); ConfigError for a backbone this fastacl's
    build_model does not know, or branch="adv" of a single-BN model.
    """
    check_branch(branch)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file: pass a folder for {ENCODER_WEIGHTS} and "
                          f"{ENCODER_CARD}")
    pretrained, raw = _read_pretrained(checkpoint)
    model = unwrap(pretrained.model)
    if branch == "adv" and not has_dual_bn(model):
        raise ConfigError(f"{pretrained.path} holds a single-BN model (method "
                          f"{pretrained.method or 'unknown'}), which has no 'adv' branch: "
                          "export its only branch with branch='normal' (--branch normal)")
    encoder = encoder_from_branch(model, branch).eval()
    extra = raw.get("extra", {})
    train_state = extra.get("train_state") or {}
    card = {
        "format": ENCODER_FORMAT, "format_version": CARD_VERSION,
        "weights": _write_weights(out / ENCODER_WEIGHTS, encoder, "encoder"),
        "method": pretrained.method, "dataset": pretrained.dataset,
        "attack": extra.get("attack"),  # None for a published checkpoint: not recorded
        "branch": branch,
        "backbone": model.spec,
        "feature_dim": getattr(encoder, "feature_dim", None),
        "input": _input_description(encoder),
        "config": train_state.get("config"),
        "source": {"checkpoint": str(pretrained.path.resolve()),
                   "sha256": sha256_file(pretrained.path), "kind": pretrained.source,
                   "encoder_branch": pretrained.encoder_branch,
                   "epoch": train_state.get("epoch"), "versions": raw.get("versions")},
        "versions": versions(),
        "created": _now(),
    }
    _write_card(out / ENCODER_CARD, card)
    return out


def _card_path(path: str | os.PathLike, card_name: str | None) -> Path:
    """The card of what `path` names: a folder's card_name (an encoder, also named by either of
    its files), or the .json beside a classifier's .safetensors (card_name None)."""
    path = Path(path).expanduser()
    if not path.exists() and not path.with_suffix(".json").is_file():
        raise MissingFileError(f"{path} does not exist")
    if card_name is not None:
        return path / card_name if path.is_dir() else path.parent / card_name
    if path.is_dir():
        hint = (f" (it holds {ENCODER_CARD}: load an encoder with fastacl.load_encoder)"
                if (path / ENCODER_CARD).is_file() else "")
        raise ConfigError(f"{path} is a folder: pass one of the classifiers `fastacl evaluate "
                          f"--save` wrote in it, e.g. {path / 'slf.safetensors'}{hint}")
    return path.with_suffix(".json")


def load_encoder(directory: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> nn.Module:
    """The encoder `export_encoder` wrote in `directory` (or either of its files), in eval mode.

    Rebuilt from model_card.json (build_model(backbone) then the card's branch) and loaded
    strictly from encoder.safetensors after checking its sha256. It maps images in [0, 1],
    [N, C, H, W], to card["feature_dim"] features.
    """
    card_path = _card_path(directory, ENCODER_CARD)
    card = _read_card(card_path, ENCODER_FORMAT)
    encoder = _rebuild_encoder(card, card_path)
    _load_strict(encoder, *_read_weights(card_path, card))
    return encoder.to(device).eval()


# ---- fine-tuned classifiers --------------------------------------------------------------------

def save_classifier(network: nn.Module, path: str | os.PathLike, *, mode: str, branch: str,
                    backbone: dict[str, Any], **card: Any) -> Path:
    """Write a fine-tuned classifier as `path` (.safetensors) + its card (the same name, .json).

    network: a LinearClassifier (SLF / ALF: `branch` is its encoder's) or a DualBNClassifier
    (AFF: its `branch` BN branch is kept, with the head). backbone: the pre-trained model's spec.
    card: further JSON fields (the evaluation's accuracies, settings, source). Returns the
    weights file; load_classifier(path) gives back a LinearClassifier with equal logits.
    """
    check_branch(branch)
    network = unwrap(network)
    if isinstance(network, DualBNClassifier):
        network = LinearClassifier(encoder_from_branch(network, branch),
                                   copy.deepcopy(network.fc))
    if not isinstance(network, LinearClassifier) or has_dual_bn(network):
        raise TypeError(f"save_classifier takes the LinearClassifier of SLF / ALF or the "
                        f"DualBNClassifier of AFF, got a {type(network).__name__}")
    path = Path(path).with_suffix(".safetensors")
    weights = _write_weights(path, network, "classifier")
    _write_card(path.with_suffix(".json"), {
        "format": CLASSIFIER_FORMAT, "format_version": CARD_VERSION, "weights": weights,
        "mode": mode, "backbone": backbone, "branch": branch,
        "head": {"in_features": network.fc.in_features, "num_classes": network.fc.out_features},
        "input": _input_description(network.encoder), "output": "logits [N, num_classes]",
        **card, "versions": versions(), "created": _now(),
    })
    return path


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> LinearClassifier:
    """A classifier `fastacl evaluate --save` wrote: DIR/<mode>.safetensors (or its .json).

    The module maps images in [0, 1], [N, C, H, W], to logits; eval mode, one BN branch, no
    routing argument, so any attack tool can call it (docs/export.md shows AutoAttack).
    """
    card_path = _card_path(path, None)
    card = _read_card(card_path, CLASSIFIER_FORMAT)
    head = card.get("head") or {}
    encoder = _rebuild_encoder(card, card_path)
    try:
        fc = nn.Linear(int(head["in_features"]), int(head["num_classes"]))
    except (KeyError, TypeError, ValueError):
        raise BadFileError(f"{card_path} has no head {{'in_features': ..., 'num_classes': ...}}, "
                           f"got {head!r}") from None
    network = LinearClassifier(encoder, fc)
    _load_strict(network, *_read_weights(card_path, card))
    return network.to(device).eval()
