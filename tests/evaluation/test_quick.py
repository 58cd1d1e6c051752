"""fastacl.evaluation.quick: the trainer's closing check."""

import pytest
import torch

from fastacl import attacks
from fastacl.evaluation import quick_check
from tests.evaluation.tiny import EPS, tiny_model
from tests.synthetic import make_cifar10


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    make_cifar10(root, n=32)
    return root


def check(root, **overrides):
    arguments = dict(dataset="cifar10", data_dir=root, branch="adv", epochs=3, max_test=24,
                     eps=EPS / 4, seed=0) | overrides
    return quick_check(tiny_model(), **arguments)


def test_quick_check_is_seeded_not_drawn_from_the_global_rng(cifar_root):
    torch.manual_seed(1)
    first = check(cifar_root)
    torch.manual_seed(2)
    assert check(cifar_root) == first
    assert set(first) == {"standard_accuracy", "robust_accuracy", "attack", "eval_protocol"}
    assert 0 <= first["robust_accuracy"] <= first["standard_accuracy"] <= 1
    assert first["attack"] == "pgd20 linf eps=0.007843 step=0.001961"
    assert "frozen adv-branch features (3 epochs" in first["eval_protocol"]
    assert first["eval_protocol"].endswith("24 test images")


def test_quick_check_pgd20_starts_from_its_own_seeded_generator(cifar_root, monkeypatch):
    # The PGD-20 of the check is fastacl.attacks.robust_accuracy's (test_network's), with a
    # generator seeded by seed + 2; it used to draw its random start from the global RNG.
    seen = []
    real_pgd = attacks.pgd

    def recording_pgd(*args, generator=None, **kwargs):
        seen.append(generator.initial_seed())
        return real_pgd(*args, generator=generator, **kwargs)

    monkeypatch.setattr(attacks, "pgd", recording_pgd)
    check(cifar_root, seed=5, max_test=8)
    assert seen == [7]  # one chunk of 8 images, seed 5 + 2


def test_quick_check_arguments_are_keyword_only(cifar_root):
    with pytest.raises(TypeError):
        quick_check(tiny_model(), "cifar10", cifar_root, "adv", 1, 8, EPS, 0)
    assert check(cifar_root, max_test=None)["eval_protocol"].endswith("32 test images")
