"""fastacl.evaluation.corruptions: CIFAR-10-C style folders, per corruption and severity."""

import numpy as np
import pytest
import torch
from torch import nn

from fastacl.errors import BadFileError, MissingFileError
from fastacl.evaluation import corruptions


class ConstantModel(nn.Module):
    def forward(self, x):
        return torch.tensor([5.0, 0.0, 0.0]).expand(x.shape[0], 3) + 0 * x.sum()


def write_corruptions(folder, n, names=("gaussian_noise", "fog"), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    labels = np.tile(rng.integers(0, classes, n), 5)
    labels[: n] = 0  # severity 1: all class 0
    np.save(folder / "labels.npy", labels)
    for name in names:
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    return labels


def test_corruption_accuracy_per_corruption_and_severity(tmp_path):
    labels = write_corruptions(tmp_path / "CIFAR-10-C", n=6)
    assert corruptions.find_corruptions("cifar10", tmp_path) == tmp_path / "CIFAR-10-C"
    assert corruptions.find_corruptions("cifar100", tmp_path) is None
    out = corruptions.corruption_accuracy(ConstantModel(), tmp_path / "CIFAR-10-C", batch_size=4)
    for name in ("gaussian_noise", "fog"):
        assert out["per_corruption"][name]["1"] == 1.0
        for severity in range(2, 6):
            block = labels[(severity - 1) * 6: severity * 6]
            assert out["per_corruption"][name][str(severity)] == pytest.approx(
                (block == 0).mean())
    assert out["mean_per_severity"]["1"] == 1.0
    assert out["mean"] == pytest.approx(np.mean([(labels[i * 6:(i + 1) * 6] == 0).mean()
                                                 for i in range(5)]))
    assert out["mean_over"] == ["fog", "gaussian_noise"] and out["images_per_severity"] == 6


def test_the_mean_is_over_the_standard_corruptions(tmp_path):
    write_corruptions(tmp_path / "CIFAR-10-C", n=2, names=("fog", "speckle_noise"))
    out = corruptions.corruption_accuracy(ConstantModel(), tmp_path / "CIFAR-10-C",
                                          subset=torch.tensor([1]))
    assert out["mean_over"] == ["fog"] and set(out["per_corruption"]) == {"fog", "speckle_noise"}
    assert out["images_per_severity"] == 1


def test_malformed_folders_say_what_is_wrong(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "labels.npy", np.zeros(7, dtype=np.int64))
    with pytest.raises(BadFileError, match=r"expected \[5 n\] integer labels"):
        corruptions.corruption_accuracy(ConstantModel(), folder)
    np.save(folder / "labels.npy", np.zeros(10, dtype=np.int64))
    with pytest.raises(MissingFileError, match="no <corruption>.npy file"):
        corruptions.corruption_accuracy(ConstantModel(), folder)
    np.save(folder / "fog.npy", np.zeros((10, 4, 4, 3), dtype=np.float32))
    with pytest.raises(BadFileError, match=r"fog.npy: expected uint8 \[10, H, W, C\]"):
        corruptions.check_corruptions(folder)
    np.save(folder / "fog.npy", np.zeros((10, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(BadFileError, match="2 images per severity, fewer than the test subset"):
        corruptions.check_corruptions(folder, subset=torch.tensor([0, 5]))
    data = (folder / "fog.npy").read_bytes()
    (folder / "fog.npy").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(BadFileError, match="fog.npy is not a readable .npy array"):
        corruptions.check_corruptions(folder)
    (folder / "labels.npy").write_text("not an array")
    with pytest.raises(BadFileError, match="labels.npy is not a readable .npy array"):
        corruptions.check_corruptions(folder)
