"""Fixtures of the evaluation tests: one intra-op thread (the CPU is shared) and a tiny run."""

import pytest

from fastacl.models import save_checkpoint
from tests.evaluation.tiny import EPS, tiny_model
from tests.synthetic import make_cifar10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="package")
def cifar_run(tmp_path_factory):
    """Synthetic CIFAR-10 (80 train, 16 test) and a tiny fastacl checkpoint trained on it."""
    root = tmp_path_factory.mktemp("data")
    make_cifar10(root, n=16)
    path = save_checkpoint(
        root / "ckpt.pt", tiny_model(), method="acl", encoder_branch="adv",
        attack={"norm": "linf", "eps": EPS, "step_size": 2 / 255, "steps": 5}, dataset="cifar10")
    return root, path
