"""fastacl.evaluation.robustness: clean, PGD-20 and AutoAttack accuracy of a network."""

import pytest
import torch
from torch import nn

from fastacl.attacks import robust_accuracy
from fastacl.evaluation import networks, robustness
from tests.evaluation.tiny import EPS, tiny_data, tiny_model


class GridModel(nn.Module):
    """Predicts 1 on images whose pixels lie on the uint8 grid (clean ones), 0 off it; zero
    input gradient, so PGD moves only by its random start. A point labelled 0 is wrong clean and
    right under attack: counted robust only by a wrong convention."""

    def forward(self, x):
        on_grid = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) < 1e-3).float()
        logits = torch.stack([1 - on_grid, on_grid], dim=1)
        return logits + 0 * x.sum()


def test_robust_accuracy_counts_correct_clean_and_under_attack():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0] * 6 + [1] * 4)
    out = robustness.test_network(GridModel(), images, labels, ("pgd20", "autoattack"), eps=0.1,
                                  batch_size=4, autoattack_version="custom",
                                  autoattack_attacks=["apgd-ce"], progress=False)
    assert out["standard_accuracy"] == pytest.approx(0.4)
    # Under attack the label-0 points are classified correctly and the label-1 points are not;
    # neither is robust: robust = correct clean AND under attack.
    x_adv = images.float() / 255 + 0.05
    assert (GridModel()(x_adv).argmax(1) == labels).float().mean() == pytest.approx(0.6)
    assert out["pgd20_accuracy"] == 0.0 and out["autoattack_accuracy"] == 0.0


def _random_head_network(classes=10):
    network = networks.linear_network(tiny_model(), "adv", classes)
    with torch.no_grad():
        network.fc.weight.normal_()
    return network


def test_test_network_is_deterministic_and_robust_at_most_clean():
    network = _random_head_network()
    images, labels = tiny_data(n=12, classes=10)
    kwargs = dict(attacks=("pgd20", "autoattack"), eps=EPS, batch_size=8, seed=3,
                  autoattack_version="custom", autoattack_attacks=["apgd-ce", "apgd-t"],
                  progress=False)
    first = robustness.test_network(network, images, labels, **kwargs)
    second = robustness.test_network(network, images, labels, **kwargs)
    for key in ("standard_accuracy", "pgd20_accuracy", "autoattack_accuracy"):
        assert first[key] == second[key]
    assert first["pgd20_accuracy"] <= first["standard_accuracy"]
    assert first["autoattack_accuracy"] <= first["standard_accuracy"]
    assert list(first["autoattack_per_attack"]) == ["apgd-ce", "apgd-t"]


def test_pgd20_is_the_attacks_robust_accuracy_with_the_seeded_generator():
    # One PGD-20 routine: test_network's number is robust_accuracy's, from the same seed and
    # chunks, on uint8 or float images alike.
    network = _random_head_network()
    generator = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        labels = network(images.float() / 255).argmax(1)
    labels[:5] = (labels[:5] + 1) % 10
    eps = 2 / 255
    out = robustness.test_network(network, images, labels, ("pgd20",), eps, batch_size=16,
                                  seed=7, progress=False)
    same = robust_accuracy(network, images.float() / 255, labels, "pgd20", eps, batch_size=16,
                           generator=torch.Generator().manual_seed(7))
    assert out["pgd20_accuracy"] == same
    assert 0 < out["pgd20_accuracy"] < out["standard_accuracy"] == pytest.approx(35 / 40)


def test_an_unknown_attack_names_the_choices():
    with pytest.raises(ValueError, match="attack must be one of pgd20, autoattack, got 'fgsm'"):
        robustness.test_network(GridModel(), *tiny_data(n=4, classes=2), ("fgsm",), EPS)
