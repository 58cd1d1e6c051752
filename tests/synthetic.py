"""Writers of small synthetic datasets in the real on-disk formats, shared by the tests."""

import pickle

import numpy as np


def write_cifar_batch(path, n, label_key, classes, seed, protocol=2):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    # The published batches are Python 2 pickles read with encoding="bytes": bytes keys.
    batch = {b"batch_label": b"synthetic", b"data": data, label_key: labels, b"filenames": []}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return data, labels


def make_cifar10(root, n=6):
    """cifar-10-batches-py/ under root with n random images in each of the 6 batch files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        written[name] = write_cifar_batch(folder / name, n, b"labels", 10, seed=i)
    return folder, written


IMAGENET32_TRAIN_FILES = [f"train_data_batch_{k}" for k in range(1, 11)]


def write_imagenet32_batch(path, n, seed):
    """One Downsampled-ImageNet-32x32 pickle: str keys, 'data' uint8 [n, 3072] (R, G, B planes),
    'labels' a list of ints in 1..1000 (1-based, as published) and 'mean'."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(1, 1001, n).tolist()
    batch = {"data": data, "labels": labels, "mean": data.mean(axis=0)}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return data, labels


def make_imagenet32(root, n=3, one_folder=False):
    """Imagenet32_train/{train_data_batch_1..10} and Imagenet32_val/val_data under root (or all
    in root itself if one_folder), n random images in each file; returns {name: (data, labels)}
    and the {name: path} written."""
    train = root if one_folder else root / "Imagenet32_train"
    val = root if one_folder else root / "Imagenet32_val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    written, paths = {}, {}
    for i, name in enumerate(IMAGENET32_TRAIN_FILES):
        paths[name] = train / name
        written[name] = write_imagenet32_batch(paths[name], n, seed=100 + i)
    paths["val_data"] = val / "val_data"
    written["val_data"] = write_imagenet32_batch(paths["val_data"], n, seed=99)
    return written, paths
