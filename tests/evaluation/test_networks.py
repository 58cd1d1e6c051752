"""fastacl.evaluation.networks: the classifiers start from the pre-trained weights."""

import torch

from fastacl.evaluation import networks
from tests.evaluation.tiny import tiny_data, tiny_model


def test_linear_network_is_the_adv_encoder_and_a_zero_head():
    model = tiny_model()
    network = networks.linear_network(model, "adv", num_classes=3)
    assert not network.fc.weight.any() and not network.fc.bias.any()  # zero-initialised
    assert all(not p.requires_grad for p in network.encoder.parameters())
    network.train()
    assert not network.encoder.training and network.fc.training
    x = tiny_data()[0][:4].float() / 255
    with torch.no_grad():
        assert torch.equal(network.encoder(x), model(x, branch="adv", return_features=True))


def test_aff_network_copies_every_pretrained_backbone_tensor():
    model = tiny_model()
    network = networks.aff_network(model, num_classes=3)
    pretrained = model.backbone.state_dict()
    copied = network.backbone.state_dict()
    assert set(copied) == set(pretrained)  # both BN branches, every buffer
    assert all(torch.equal(copied[k], pretrained[k]) for k in pretrained)
    assert not torch.equal(copied["bn1.normal.running_mean"], copied["bn1.adv.running_mean"])
    assert not network.fc.weight.any()


def test_aff_of_a_single_bn_model_starts_both_branches_from_its_bn():
    model = tiny_model(dual_bn=False)
    network = networks.aff_network(model, num_classes=3)
    pretrained = model.backbone.state_dict()
    for key, value in network.backbone.state_dict().items():
        source = key.replace(".normal.", ".").replace(".adv.", ".")
        assert torch.equal(value, pretrained[source])


def test_fit_linear_head_is_seeded_and_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(20)
    features = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(
        60, 3, generator=generator)

    def fit():
        return networks.fit_linear_head(features, labels, 3, 20,
                                        lambda p: torch.optim.SGD(p, lr=0.5), 16, seed=4)

    first, second = fit(), fit()
    assert torch.equal(first.weight, second.weight)
    assert (first(features).argmax(1) == labels).all()
