"""Accuracy on the common corruptions of CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019),
when those folders are in the data dir (docs/acl-air.md section 8)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastacl.data import default_data_dir
from fastacl.errors import BadFileError, MissingFileError
from fastacl.evaluation.robustness import correct_predictions
from fastacl.utils import progress as progress_bar

__all__ = ["CORRUPTION_FOLDERS", "STANDARD_CORRUPTIONS", "check_corruptions",
           "corruption_accuracy", "find_corruptions"]

# The 15 corruptions of Hendrycks & Dietterich (2019) whose mean is the reported number; the
# released CIFAR-10-C / 100-C also hold 4 extra ones (evaluated too, outside the mean).
STANDARD_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
CORRUPTION_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


def find_corruptions(dataset: str, data_dir: str | os.PathLike | None) -> Path | None:
    """The CIFAR-10-C / CIFAR-100-C folder for `dataset` in data_dir (or data_dir itself)."""
    folder = CORRUPTION_FOLDERS.get(dataset)
    if folder is None:
        return None
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    for candidate in (root / folder, root, root.parent / folder):
        if candidate.name == folder and (candidate / "labels.npy").is_file():
            return candidate
    return None


def _open_array(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (ValueError, OSError, EOFError) as error:
        raise BadFileError(f"{path} is not a readable .npy array ({error}): truncated, or "
                           "another kind of file; re-extract it from the CIFAR-10-C / "
                           "CIFAR-100-C archive") from None


def check_corruptions(folder: str | os.PathLike, subset: torch.Tensor | None = None
                      ) -> tuple[np.ndarray, list[str]]:
    """(labels [5 n], the corruption names) of a CIFAR-10-C style folder, every file checked.

    Cheap: the corruption arrays are opened memory-mapped, so only their headers are read.
    fastacl.evaluate calls it before fine-tuning, so a bad file fails in seconds. subset: the
    test images to be used, which must lie within the folder's n images per severity.
    """
    folder = Path(folder)
    labels = _open_array(folder / "labels.npy")
    if labels.ndim != 1 or labels.shape[0] % 5 or not np.issubdtype(labels.dtype, np.integer):
        raise BadFileError(f"{folder / 'labels.npy'}: expected [5 n] integer labels (5 "
                           f"severities), got {labels.dtype} {list(labels.shape)}")
    names = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
    if not names:
        raise MissingFileError(f"{folder} holds labels.npy but no <corruption>.npy file")
    n = labels.shape[0] // 5
    if subset is not None and subset.numel() and int(subset.max()) >= n:
        raise BadFileError(f"{folder}: {n} images per severity, fewer than the test subset "
                           f"needs ({int(subset.max()) + 1}); is it the folder of this dataset?")
    for name in names:
        array = _open_array(folder / f"{name}.npy", mmap_mode="r")
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != 5 * n:
            raise BadFileError(f"{folder / name}.npy: expected uint8 [{5 * n}, H, W, C], got "
                               f"{array.dtype} {list(array.shape)}")
    return labels, names


def _summary(per_corruption: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The means over the standard corruptions found (over all found if none of them is)."""
    standard = [name for name in per_corruption if name in STANDARD_CORRUPTIONS]
    standard = standard or list(per_corruption)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "per_corruption": per_corruption,
        "mean": mean([v for name in standard for v in per_corruption[name].values()]),
        "mean_all": mean([v for acc in per_corruption.values() for v in acc.values()]),
        "mean_per_severity": {str(s): mean([per_corruption[name][str(s)] for name in standard])
                              for s in range(1, 6)},
        "mean_over": standard,
    }


@torch.no_grad()
def corruption_accuracy(network: nn.Module, folder: str | os.PathLike,
                        subset: torch.Tensor | None = None, batch_size: int = 256,
                        branch: str = "adv", device: torch.device | str = "cpu",
                        progress: bool | None = None) -> dict[str, Any]:
    """Clean accuracy on each corruption and severity of a CIFAR-10-C style folder.

    Layout: <corruption>.npy uint8 [5 n, H, W, C] (severity 1 in the first n rows, ..., 5 in the
    last n; each block is the test set in order) and labels.npy [5 n]. subset: which of the n
    test images to use (default all). Every .npy but labels.npy is a corruption; "mean" is over
    the 15 standard corruptions found (over all found if none of them is), "mean_all" over all.
    """
    folder = Path(folder)
    labels_all, names = check_corruptions(folder, subset)
    n = labels_all.shape[0] // 5
    rows = torch.arange(n) if subset is None else subset.cpu()
    per_corruption: dict[str, dict[str, float]] = {}
    bar = progress_bar(len(names) * 5, "corruptions", progress, unit="set")
    for name in names:
        array = _open_array(folder / f"{name}.npy", mmap_mode="r")
        per_corruption[name] = {}
        for severity in range(1, 6):
            index = (rows + (severity - 1) * n).numpy()
            x = torch.from_numpy(np.ascontiguousarray(array[index])).permute(0, 3, 1, 2)
            y = torch.from_numpy(labels_all[index].astype(np.int64))
            correct = correct_predictions(network, x.to(device), y.to(device), batch_size,
                                          branch)
            per_corruption[name][str(severity)] = correct.float().mean().item()
            bar.update(1)
    bar.close()
    return {**_summary(per_corruption), "images_per_severity": int(rows.numel()),
            "folder": str(folder)}
