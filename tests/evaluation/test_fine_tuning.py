"""fastacl.evaluation.fine_tuning: the batched crop + flip and what each mode trains."""

import pytest
import torch
from torch import nn

from fastacl.evaluation import fine_tuning, networks
from tests.evaluation.tiny import EPS, settings, tiny_data, tiny_model


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(6, 2, 5, 7)
    assert torch.equal(fine_tuning.random_crop_flip(x, 0, False), x)
    generator = torch.Generator().manual_seed(3)
    out = fine_tuning.random_crop_flip(x, 2, True, generator)
    # Replay the draws: offsets (2, N), then the flips.
    replay = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 5, (2, 6), generator=replay)
    flips = torch.rand(6, generator=replay) < 0.5
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        dy, dx = offsets[:, i].tolist()
        expected = padded[i, :, dy:dy + 5, dx:dx + 7]
        assert torch.equal(out[i], expected.flip(-1) if flips[i] else expected)


@pytest.mark.parametrize("mode", ["slf", "alf"])
def test_linear_modes_change_only_the_classifier(mode):
    model = tiny_model()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    network = networks.linear_network(model, "adv", num_classes=3)
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    images, labels = tiny_data()
    fine_tuning.finetune(network, mode, images, labels, settings(mode), EPS, seed=0,
                         progress=False)
    # The encoder (weights AND BN running statistics) is bit-identical: frozen, in eval mode.
    after = network.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    assert not network.encoder.training and network.fc.weight.any()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_model.items())
    # The encoder is the adv branch of the pre-trained model.
    x = images[:4].float() / 255
    with torch.no_grad():
        assert torch.equal(network.encoder(x), model(x, branch="adv", return_features=True))


def test_aff_trains_the_backbone_and_both_bn_branches():
    model = tiny_model()
    network = networks.aff_network(model, num_classes=3)
    pretrained = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, labels = tiny_data()
    history = []
    fine_tuning.finetune(network, "aff", images, labels, settings("aff"), EPS, seed=0,
                         progress=False, history=history)
    after = network.backbone.state_dict()
    assert not torch.equal(after["conv1.weight"], pretrained["conv1.weight"])
    # Both branches' statistics moved (natural pass: normal, adversarial pass: adv).
    for branch in ("normal", "adv"):
        key = f"layer1.0.bn1.{branch}.running_mean"
        assert not torch.equal(after[key], pretrained[key])
    assert torch.equal(model.backbone.state_dict()["conv1.weight"], pretrained["conv1.weight"])
    assert [h["epoch"] for h in history] == [1] and history[0]["loss"] > 0
    assert not network.training


def test_an_unknown_mode_names_the_choices():
    network = networks.linear_network(tiny_model(), "adv", num_classes=3)
    with pytest.raises(ValueError, match="mode must be one of slf, alf, aff, got 'xyz'"):
        fine_tuning.finetune(network, "xyz", *tiny_data(), settings("slf"), EPS)
