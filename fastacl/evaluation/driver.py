"""`evaluate`: fine-tune and test a pre-trained encoder by the SLF / ALF / AFF protocols.

The driver reads in four steps: check the arguments and fill in what the checkpoint records
(`_check_arguments`, `_plan`), load and check every file it will read (`_load_data`,
`check_corruptions`), run each mode on a fresh copy of the weights under its own seeds
(`_run_mode`), and record what was run beside the numbers (`_record`, `_describe`). Everything a
user can get wrong (an option, a file) fails in the first two steps, before any fine-tuning, with
a fastacl.errors error naming it. With `save`, each fine-tuned classifier is written as it is
tested (fastacl.export.save_classifier), loadable with fastacl.load_classifier.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastacl.config import METHODS
from fastacl.data import DATASETS, load_dataset
from fastacl.errors import ConfigError, MissingFileError
from fastacl.evaluation import postprocess
from fastacl.evaluation.corruptions import (
    CORRUPTION_FOLDERS,
    check_corruptions,
    corruption_accuracy,
    find_corruptions,
)
from fastacl.evaluation.fine_tuning import finetune
from fastacl.evaluation.networks import aff_network, linear_network
from fastacl.evaluation.pretrained import Pretrained, load_pretrained
from fastacl.evaluation.protocols import (
    ATTACKS,
    AUTOATTACK_ATTACKS,
    AUTOATTACK_PRESETS,
    AUTOATTACK_VERSIONS,
    MODES,
    PGD20_STEPS,
    PRESETS,
    STEP_FRACTION,
    FinetuneSettings,
    draw_seed,
    finetune_settings,
    mode_seed,
    post_process_settings,
    seeded,
    subset_indices,
)
from fastacl.evaluation.robustness import test_network
from fastacl.export import save_classifier, sha256_file
from fastacl.utils import check_choice, check_device, unwrap, versions

__all__ = ["evaluate"]


@dataclass
class _Plan:
    """evaluate()'s arguments, checked, with what the checkpoint records filled in."""

    dataset: str
    preset: str
    method: str | None
    eps: float
    eps_source: str
    attacks: tuple[str, ...]
    autoattack_version: str
    autoattack_attacks: list[str] | None
    corruption_folder: Path | None
    seed: int
    epochs: int | None
    max_train: int | None
    batch_size: int
    device: torch.device
    progress: bool | None
    save: Path | None = None


@dataclass
class _Data:
    """The labelled splits on the device; the test split is the fixed `test_subset` of it."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_subset: torch.Tensor
    num_classes: int


# The classes of the datasets with a fixed label set: the head has one output per class even
# when a (test or training) split holds no image of some class. imagefolder: its sub-folders.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet32": 1000, "mnist5k": 10}


# ---- arguments ---------------------------------------------------------------------------------

def _as_tuple(name: str, values: str | Sequence[str], choices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    values = tuple(dict.fromkeys(v.lower() for v in values))
    if not values:
        raise ConfigError(f"no {name} given; choose from {', '.join(choices)}")
    for value in values:
        check_choice(name.rstrip("s"), value, choices)
    return values


def _check_count(name: str, value: int | None, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def _check_arguments(modes, attacks, corruptions, *, dataset, preset, method, eps, max_test,
                     max_train, epochs, batch_size) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The checks that need no checkpoint; returns (modes, attacks) as tuples."""
    modes = _as_tuple("modes", modes, MODES)
    attacks = _as_tuple("attacks", attacks, ATTACKS) if attacks else ()
    if corruptions not in ("auto", True, False):
        raise ConfigError(f"corruptions must be 'auto', True or False, got {corruptions!r}")
    _check_count("max_test", max_test)
    _check_count("max_train", max_train)
    _check_count("epochs", epochs)
    _check_count("batch_size", batch_size, optional=False)
    if dataset is not None:
        check_choice("dataset", dataset, DATASETS)
    if preset is not None:
        check_choice("preset", preset, PRESETS)
    if method is not None:
        check_choice("method", method.removesuffix("++"), METHODS)
    if eps is not None:
        _check_eps(eps)
    return modes, attacks


def _autoattack_choice(preset: str, version: str | None, attacks: str | Sequence[str] | None
                       ) -> tuple[str, list[str] | None]:
    """(version, attacks) of AutoAttack: the preset's unless given (AUTOATTACK_PRESETS)."""
    if version is None:
        version, default_attacks = AUTOATTACK_PRESETS[preset]
        attacks = attacks or default_attacks
    check_choice("autoattack_version", version, AUTOATTACK_VERSIONS)
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    attacks = list(attacks) if attacks else None
    for attack in attacks or ():
        check_choice("autoattack attack", attack, AUTOATTACK_ATTACKS)
    if (attacks is not None) != (version == "custom"):
        raise ConfigError(f"autoattack_attacks goes with autoattack_version='custom' (got "
                          f"version {version!r}, attacks {attacks!r})")
    return version, attacks


def _check_eps(eps: float) -> float:
    if isinstance(eps, str):
        raise ConfigError(f"eps must be a number in (0, 1], got the string {eps!r}: pass 8 / 255, "
                          "not '8/255' (the command line accepts 8/255)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ConfigError(f"eps must be a number in (0, 1], got {eps!r}")
    eps = float(eps)
    if not 0 < eps <= 1:
        hint = f", did you mean {eps:g}/255?" if 1 < eps <= 255 else ""
        raise ConfigError(f"eps must be in (0, 1] (pixel values are in [0, 1]), got {eps}{hint}")
    return eps


def _attack_budget(eps: float | None, pretrained: Pretrained) -> tuple[float, str]:
    """(eps, where it comes from): the override, else the checkpoint's, else 8/255."""
    if eps is not None:
        eps_source = "override"
    elif pretrained.eps is not None:
        eps, eps_source = pretrained.eps, "checkpoint"
    else:
        eps, eps_source = 8 / 255, "default 8/255 (not recorded in the checkpoint)"
    return _check_eps(eps), eps_source


def _check_save(save: str | os.PathLike | None) -> Path | None:
    """The folder the fine-tuned classifiers go to (created before any fine-tuning)."""
    if save is None:
        return None
    if isinstance(save, bool) or not isinstance(save, (str, os.PathLike)):
        raise ConfigError(f"save must be a folder path, got {save!r}")
    folder = Path(save).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"save={str(folder)!r} is a file: pass a folder for the fine-tuned "
                          "classifiers (<mode>.safetensors + <mode>.json)")
    return folder


def _corruption_folder(corruptions: bool | str, dataset: str,
                       data_dir: str | os.PathLike | None) -> Path | None:
    folder = find_corruptions(dataset, data_dir) if corruptions else None
    if corruptions is True and folder is None:
        raise MissingFileError(
            f"corruptions=True but no {CORRUPTION_FOLDERS.get(dataset, '<dataset>-C')} folder "
            f"with labels.npy was found in {data_dir} (corrupted test sets exist for "
            f"{', '.join(CORRUPTION_FOLDERS)})")
    return folder


def _plan(pretrained: Pretrained, attacks: tuple[str, ...], dataset: str | None,
          data_dir: str | os.PathLike | None, preset: str | None, eps: float | None,
          method: str | None, corruptions: bool | str, autoattack_version: str | None,
          autoattack_attacks: Sequence[str] | None, **fixed: Any) -> _Plan:
    """The checks that need the checkpoint, and its defaults; `fixed`: the other _Plan fields."""
    dataset = dataset or pretrained.dataset
    if dataset is None:
        raise ConfigError("the checkpoint does not record its dataset (a published checkpoint): "
                          f"pass dataset=, one of {', '.join(DATASETS)}")
    check_choice("dataset", dataset, DATASETS)
    preset = preset or ("demo" if dataset == "mnist5k" else "paper")
    check_choice("preset", preset, PRESETS)
    version, autoattack_attacks = _autoattack_choice(preset, autoattack_version,
                                                     autoattack_attacks)
    eps, eps_source = _attack_budget(eps, pretrained)
    return _Plan(dataset=dataset, preset=preset, method=method or pretrained.method, eps=eps,
                 eps_source=eps_source, attacks=attacks, autoattack_version=version,
                 autoattack_attacks=autoattack_attacks,
                 corruption_folder=_corruption_folder(corruptions, dataset, data_dir), **fixed)


# ---- data --------------------------------------------------------------------------------------

def _load_data(dataset: str, data_dir: str | os.PathLike | None, max_test: int | None,
               device: torch.device) -> _Data:
    """The labelled training split and the fixed test subset, on `device`.

    Both splits are read (and so checked: load_dataset raises MissingFileError / BadFileError)
    before any fine-tuning; the test split first, the smaller of the two.
    """
    test_images, test_labels = load_dataset(dataset, data_dir, split="test")
    train_images, train_labels = load_dataset(dataset, data_dir, split="train")
    if train_labels is None or test_labels is None:
        raise ConfigError(f"{dataset}: fine-tuning needs labelled train and test splits")
    labelled = train_labels >= 0  # STL-10 "train+unlabeled" marks unlabelled images with -1
    train_images, train_labels = train_images[labelled], train_labels[labelled]
    num_classes = max(NUM_CLASSES.get(dataset, 0),
                      int(max(train_labels.max(), test_labels.max())) + 1)
    test_subset = subset_indices(test_images.shape[0], max_test)
    return _Data(train_images=train_images.to(device), train_labels=train_labels.to(device),
                 test_images=test_images[test_subset].to(device),
                 test_labels=test_labels[test_subset].to(device), test_subset=test_subset,
                 num_classes=num_classes)


def _check_fits(pretrained: Pretrained, dataset: str, data: _Data) -> None:
    """The model takes the dataset's images: as many channels as its first convolution."""
    convolution = next((m for m in pretrained.model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = int(data.test_images.shape[1])
    if convolution is not None and convolution.in_channels != channels:
        source = pretrained.path or "the checkpoint"
        raise ConfigError(
            f"{source} holds a model for {convolution.in_channels}-channel images, but {dataset}'s "
            f"have {channels}: pass the dataset it was pre-trained on"
            + (f" ({pretrained.dataset})" if pretrained.dataset else ""))


# ---- one mode ----------------------------------------------------------------------------------

def _training_split(data: _Data, settings: FinetuneSettings, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.train_images, data.train_labels
    if settings.max_train is not None and settings.max_train < images.shape[0]:
        # The same subset for every mode and seed: the modes differ only in their protocol.
        index = subset_indices(images.shape[0], settings.max_train).to(device)
        images, labels = images[index], labels[index]
    return images, labels


def _describe(mode: str, settings: FinetuneSettings, branch: str, plan: _Plan,
              train_images: int, seed: int) -> dict[str, Any]:
    """The settings record of one mode: its hyper-parameters and, in words, its protocol."""
    attack_settings = {
        "pgd20": {"steps": PGD20_STEPS, "step_size": plan.eps * STEP_FRACTION,
                  "random_start": True},
        "autoattack": {"version": plan.autoattack_version, "attacks": plan.autoattack_attacks,
                       "norm": "Linf", "seed": draw_seed(seed, "test attack")},
    }
    described = asdict(settings)
    described.update(
        train_images=train_images, seed=seed, eps=plan.eps,
        encoder=(f"frozen {branch}-branch encoder (eval mode), zero-initialised linear head"
                 if mode != "aff" else "whole dual-BN backbone + zero-initialised linear head; "
                 "tested through the adv branch"),
        crop=f"RandomCrop(pad {settings.crop_padding}){' + flip' if settings.flip else ''}",
        loss={"slf": "cross-entropy on clean images",
              "alf": f"cross-entropy on PGD-{settings.train_attack_steps} examples (step eps/4, "
                     "random start)",
              "aff": f"TRADES beta {settings.beta:g}, {settings.train_attack_steps} steps of "
                     "eps/4 from x + 0.001 N(0, 1); natural pass normal BN, adversarial adv"}[mode],
        test_attacks={name: attack_settings[name] for name in plan.attacks},
    )
    return described


def _run_mode(mode: str, model: nn.Module, branch: str, plan: _Plan, data: _Data
              ) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune a fresh copy of `model` by `mode`'s protocol, then test it through "adv";
    (the mode's record, the fine-tuned network)."""
    start = time.perf_counter()
    seed = mode_seed(plan.seed, mode)
    settings = finetune_settings(mode, plan.method, plan.dataset, plan.preset, plan.epochs,
                                 plan.max_train)
    images, labels = _training_split(data, settings, plan.device)
    network = (aff_network(model, data.num_classes) if mode == "aff"
               else linear_network(model, branch, data.num_classes)).to(plan.device)
    history: list[dict] = []
    finetune(network, mode, images, labels, settings, plan.eps, seed, plan.progress, history)
    fine_tune_seconds = time.perf_counter() - start
    print(f"fastacl: {mode}: fine-tuned {settings.epochs} epochs on {labels.shape[0]} images in "
          f"{fine_tune_seconds:.0f} s (last epoch's loss {history[-1]['loss']:.4f})", flush=True)
    out = test_network(network, data.test_images, data.test_labels, plan.attacks, plan.eps,
                       plan.batch_size, seed=draw_seed(seed, "test attack"), branch="adv",
                       autoattack_version=plan.autoattack_version,
                       autoattack_attacks=plan.autoattack_attacks, progress=plan.progress)
    if plan.corruption_folder is not None:
        corruption_start = time.perf_counter()
        out["corruptions"] = corruption_accuracy(
            network, plan.corruption_folder, data.test_subset.cpu(), plan.batch_size, "adv",
            plan.device, plan.progress)
        out["seconds_corruptions"] = time.perf_counter() - corruption_start
    out["settings"] = _describe(mode, settings, branch, plan, int(labels.shape[0]), seed)
    out["train_history"] = history
    out["seconds_fine_tune"] = fine_tune_seconds
    out["seconds"] = time.perf_counter() - start
    print(f"fastacl: {mode}: " + ", ".join(
        f"{name} {100 * out[key]:.2f}%" for name, key in (
            ("standard", "standard_accuracy"), ("PGD-20", "pgd20_accuracy"),
            ("AutoAttack", "autoattack_accuracy")) if key in out)
        + f" ({out['seconds']:.0f} s)", flush=True)
    return out, network


def _keep(mode: str, network: nn.Module, branch: str, out: dict[str, Any], plan: _Plan,
          pretrained: Pretrained, result: dict[str, Any], source_sha256: str | None) -> Path:
    """Save the fine-tuned network of `mode` in plan.save with what its evaluation measured;
    AFF keeps the adv branch, the one it was tested through."""
    metrics = ("standard_accuracy", "pgd20_accuracy", "autoattack_accuracy")
    accuracies = {key: out[key] for key in metrics if key in out}
    if "corruptions" in out:
        accuracies["corruptions_mean"] = out["corruptions"].get("mean")
    return save_classifier(
        network, plan.save / f"{mode}.safetensors", mode=mode,
        branch="adv" if mode == "aff" else branch, backbone=unwrap(pretrained.model).spec,
        dataset=plan.dataset, num_classes=result["num_classes"], eps=plan.eps,
        accuracies=accuracies, test_images=result["test_images"],
        **({"autoattack": result["autoattack"]} if "autoattack" in result else {}),
        settings=out["settings"],
        pretrained={"checkpoint": (str(pretrained.path.resolve()) if pretrained.path is not None
                                   else None), "sha256": source_sha256,
                    "kind": pretrained.source, "method": result["method"],
                    "dataset": pretrained.dataset, "eps": pretrained.eps,
                    "post_process": "post_process" in result})


# ---- the record --------------------------------------------------------------------------------

def _record(pretrained: Pretrained, plan: _Plan, data: _Data) -> dict[str, Any]:
    """What was evaluated and how, the head of evaluate()'s result."""
    return {
        "checkpoint": str(pretrained.path) if pretrained.path is not None else "<dict>",
        "checkpoint_source": pretrained.source,
        "method": plan.method, "dataset": plan.dataset, "preset": plan.preset,
        "pretrained_dataset": pretrained.dataset,  # differs from dataset in a transfer
        "encoder_branch": pretrained.encoder_branch, "eps": plan.eps,
        "eps_source": plan.eps_source, "num_classes": data.num_classes,
        "test_images": int(data.test_labels.shape[0]),
        "train_images": int(data.train_labels.shape[0]), "seed": plan.seed,
        "device": str(plan.device), "attacks": list(plan.attacks),
        # Only what was run: the AutoAttack settings when it was.
        **({"autoattack": {"version": plan.autoattack_version,
                           "attacks": plan.autoattack_attacks}}
           if "autoattack" in plan.attacks else {}),
        "versions": versions(),
    }


def _post_process(model: nn.Module, plan: _Plan, data: _Data) -> tuple[nn.Module, dict]:
    """The "++" stage before the modes, under its own seeds; returns (model, info)."""
    settings = post_process_settings(plan.preset)
    if plan.max_train is not None:
        settings.max_train = plan.max_train
    with seeded(plan.seed, "post-process", plan.device) as seed:
        model, info = postprocess.post_process(model, data.train_images, data.num_classes,
                                               plan.eps, settings, seed=seed,
                                               progress=plan.progress)
    return model.eval(), info


# ---- the entry point ---------------------------------------------------------------------------

def evaluate(
    checkpoint: str | os.PathLike | dict,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    modes: str | Sequence[str] = MODES,
    attacks: str | Sequence[str] = ATTACKS,
    max_test: int | None = None,
    seed: int = 0,
    *,
    preset: str | None = None,
    eps: float | None = None,
    method: str | None = None,
    epochs: int | None = None,
    max_train: int | None = None,
    post_process: bool = False,
    corruptions: bool | str = "auto",
    autoattack_version: str | None = None,
    autoattack_attacks: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool | None = None,
    save: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune and test a pre-trained encoder by the SLF / ALF / AFF protocols.

    The protocols are those of docs/acl-air.md section 8 (see fastacl.evaluation).

    Args:
        checkpoint: a fastacl checkpoint (fastacl.train's checkpoint.pt, its run directory
            or the loaded dict) or a published ACL / DynACL / AIR checkpoint (path; needs
            `dataset`).
        dataset: the downstream dataset, on which every mode fine-tunes and tests (default:
            the one the checkpoint was trained on; another one is a transfer evaluation).
        modes, attacks: subsets of MODES and ATTACKS, as a sequence or "slf,alf".
        max_test: test on a fixed random subset of this many test images (the same subset for
            every seed and mode); None: the whole test split.
        seed: every random draw of mode m comes from generators seeded by (seed, m).
        preset: "demo" (a few epochs; the default for mnist5k) or "paper" (the published
            per-method table; the default for every other dataset).
        eps: the l_inf budget of every attack, training and test (default: the checkpoint's,
            8/255 for a published checkpoint).
        method: the pre-training method, for the hyper-parameter table (default: recorded).
        epochs: override the fine-tuning epochs of every mode; max_train: fine-tune on a fixed
            random subset of the training split.
        post_process: run the "++" post-processing first (docs/acl-air.md section 7) and
            evaluate its result.
        corruptions: "auto" (evaluate CIFAR-10-C / 100-C when its folder is in data_dir), True
            (required) or False.
        autoattack_version, autoattack_attacks: passed to fastacl.attacks.autoattack; default
            the preset's (AUTOATTACK_PRESETS: "standard" for paper, APGD-CE alone for demo).
        batch_size: test / attack batch size. device: "auto" | "cpu" | "cuda[:N]".
        progress: progress display (default: a bar when stderr is a terminal, else a line
            every 30 s, as in a log; False: none).
        save: a folder; each mode's fine-tuned classifier is written there as
            <mode>.safetensors + <mode>.json (docs/export.md), its path recorded as the mode's
            "saved"; fastacl.load_classifier(path) loads it (AFF: the adv branch).

    Returns:
        {"modes": {mode: {"standard_accuracy", "pgd20_accuracy", "autoattack_accuracy" (those
        requested), "settings", "seconds", ...}}, plus the checkpoint's method, dataset, eps, the
        test subset size, "autoattack" (its version and attacks, only when it ran), the versions
        and the total seconds}.

    Raises (before any fine-tuning, each naming the option or file and the fix; the fastacl
    command prints them as one sentence): ConfigError for a bad argument or a device torch does
    not see, MissingFileError for a missing checkpoint or data file, BadFileError (also
    fastacl.models.CheckpointError) for an unreadable one.
    """
    start = time.perf_counter()
    # Every check (options, then the checkpoint, the data and corruption files) comes before
    # any fine-tuning: a bad option or file fails in seconds, not after a mode has trained.
    modes, attacks = _check_arguments(
        modes, attacks, corruptions, dataset=dataset, preset=preset, method=method, eps=eps,
        max_test=max_test, max_train=max_train, epochs=epochs, batch_size=batch_size)
    device = check_device(device)
    save = _check_save(save)
    # Building models draws from the global RNG: the caller's state is restored afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pretrained = load_pretrained(checkpoint)
    plan = _plan(pretrained, attacks, dataset, data_dir, preset, eps, method, corruptions,
                 autoattack_version, autoattack_attacks, seed=seed, epochs=epochs,
                 max_train=max_train, batch_size=batch_size, device=device, progress=progress,
                 save=save)
    data = _load_data(plan.dataset, data_dir, max_test, device)
    _check_fits(pretrained, plan.dataset, data)
    if plan.corruption_folder is not None:
        check_corruptions(plan.corruption_folder, data.test_subset)
    model = pretrained.model.to(device).eval()
    result = _record(pretrained, plan, data)
    source_sha256 = None
    if save is not None:  # an unwritable folder fails here, before any fine-tuning
        save.mkdir(parents=True, exist_ok=True)
        source_sha256 = (sha256_file(pretrained.path) if pretrained.path is not None
                         else None)
    if post_process:
        model, result["post_process"] = _post_process(model, plan, data)
        result["method"] = f"{plan.method or 'unknown'}++"
    # Fine-tuning the "++" model: the adv-branch encoder, whatever the checkpoint recorded.
    branch = "adv" if post_process else pretrained.encoder_branch
    result["modes"] = {}
    for mode in modes:
        with seeded(seed, mode, device):
            out, network = _run_mode(mode, model, branch, plan, data)
        if save is not None:
            out["saved"] = str(_keep(mode, network, branch, out, plan, pretrained, result,
                                     source_sha256))
        result["modes"][mode] = out
    result["seconds"] = time.perf_counter() - start
    return result
