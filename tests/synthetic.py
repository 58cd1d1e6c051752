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
