"""fastacl.finetune: SLF / ALF / AFF fine-tuning, robust accuracy, "++", corruptions, evaluate().

Tiny models (width 4, head 16) on tiny synthetic sets, one thread (the CPU is shared).
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fastacl import finetune as ft
from fastacl.models import (
    StateDictMismatchError,
    build_model,
    export_published_state_dict,
    save_checkpoint,
)
from tests.synthetic import make_cifar10

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dual_bn=True, in_channels=3, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet18", width=4, head_dim=16, dual_bn=dual_bn,
                        in_channels=in_channels)
    # Distinct, non-trivial BN statistics and affine parameters in every branch, so that a
    # copy that took the wrong branch (or a fresh init) is told apart.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("bn" in name or "shortcut.bn" in name):
                tensor.add_(0.1 * torch.rand(tensor.shape, generator=generator))
    return model.eval()


def tiny_data(n=24, classes=3, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return images, labels


def settings(mode, **overrides):
    values = dict(epochs=1, batch_size=8, lr=0.1, milestones=[], train_attack_steps=2)
    values.update(overrides)
    return ft.FinetuneSettings(mode=mode, **values)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """Synthetic CIFAR-10 (80 train, 16 test) and a tiny fastacl checkpoint trained on it."""
    root = tmp_path_factory.mktemp("data")
    make_cifar10(root, n=16)
    path = save_checkpoint(
        root / "ckpt.pt", tiny_model(), method="acl", encoder_branch="adv",
        attack={"norm": "linf", "eps": EPS, "step_size": 2 / 255, "steps": 5}, dataset="cifar10")
    return root, path


QUICK = dict(epochs=1, attacks=("pgd20",), progress=False)


# ---- pieces ------------------------------------------------------------------------------------

def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(6, 2, 5, 7)
    assert torch.equal(ft.random_crop_flip(x, 0, False), x)
    generator = torch.Generator().manual_seed(3)
    out = ft.random_crop_flip(x, 2, True, generator)
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
    network = ft.linear_network(model, "adv", num_classes=3)
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    assert not network.fc.weight.any() and not network.fc.bias.any()  # zero-initialised
    images, labels = tiny_data()
    ft.finetune(network, mode, images, labels, settings(mode), EPS, seed=0, progress=False)
    # The encoder (weights AND BN running statistics) is bit-identical: frozen, in eval mode.
    after = network.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    assert not network.encoder.training and network.fc.weight.any()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_model.items())
    # The encoder is the adv branch of the pre-trained model.
    x = images[:4].float() / 255
    with torch.no_grad():
        assert torch.equal(network.encoder(x), model(x, branch="adv", return_features=True))


def test_aff_starts_from_every_pretrained_weight_and_trains_them():
    model = tiny_model()
    network = ft.aff_network(model, num_classes=3)
    pretrained = model.backbone.state_dict()
    copied = network.backbone.state_dict()
    assert set(copied) == set(pretrained)  # both BN branches, every buffer
    assert all(torch.equal(copied[k], pretrained[k]) for k in pretrained)
    assert not torch.equal(copied["bn1.normal.running_mean"], copied["bn1.adv.running_mean"])
    assert not network.fc.weight.any()
    images, labels = tiny_data()
    ft.finetune(network, "aff", images, labels, settings("aff"), EPS, seed=0, progress=False)
    after = network.backbone.state_dict()
    assert not torch.equal(after["conv1.weight"], pretrained["conv1.weight"])
    # Both branches' statistics moved (natural pass: normal, adversarial pass: adv).
    for branch in ("normal", "adv"):
        key = f"layer1.0.bn1.{branch}.running_mean"
        assert not torch.equal(after[key], pretrained[key])
    assert torch.equal(model.backbone.state_dict()["conv1.weight"], pretrained["conv1.weight"])


def test_aff_of_a_single_bn_model_starts_both_branches_from_its_bn():
    model = tiny_model(dual_bn=False)
    network = ft.aff_network(model, num_classes=3)
    pretrained = model.backbone.state_dict()
    for key, value in network.backbone.state_dict().items():
        source = key.replace(".normal.", ".").replace(".adv.", ".")
        assert torch.equal(value, pretrained[source])


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
    out = ft.test_network(GridModel(), images, labels, ("pgd20", "autoattack"), eps=0.1,
                          batch_size=4, autoattack_version="custom",
                          autoattack_attacks=["apgd-ce"], progress=False)
    assert out["standard_accuracy"] == pytest.approx(0.4)
    # Under attack the label-0 points are classified correctly and the label-1 points are not;
    # neither is robust: robust = correct clean AND under attack.
    x_adv = images.float() / 255 + 0.05
    assert (GridModel()(x_adv).argmax(1) == labels).float().mean() == pytest.approx(0.6)
    assert out["pgd20_accuracy"] == 0.0 and out["autoattack_accuracy"] == 0.0


def test_test_network_is_deterministic_and_robust_at_most_clean():
    model = tiny_model()
    network = ft.linear_network(model, "adv", 10)
    with torch.no_grad():
        network.fc.weight.normal_()
    images, labels = tiny_data(n=12, classes=10)
    kwargs = dict(attacks=("pgd20", "autoattack"), eps=EPS, batch_size=8, seed=3,
                  autoattack_version="custom", autoattack_attacks=["apgd-ce", "apgd-t"],
                  progress=False)
    first = ft.test_network(network, images, labels, **kwargs)
    second = ft.test_network(network, images, labels, **kwargs)
    for key in ("standard_accuracy", "pgd20_accuracy", "autoattack_accuracy"):
        assert first[key] == second[key]
    assert first["pgd20_accuracy"] <= first["standard_accuracy"]
    assert first["autoattack_accuracy"] <= first["standard_accuracy"]
    assert list(first["autoattack_per_attack"]) == ["apgd-ce", "apgd-t"]


# ---- hyper-parameters --------------------------------------------------------------------------

def test_published_hyper_parameter_table():
    s = ft.finetune_settings("slf", "acl-air", "cifar10")
    assert (s.epochs, s.batch_size, s.lr, s.milestones) == (25, 512, 0.005, [10, 20])
    assert ft.finetune_settings("alf", "acl-air", "cifar10").lr == 0.01
    assert ft.finetune_settings("slf", "acl", "cifar100").lr == 0.05
    assert ft.finetune_settings("alf", "dynacl-air", "cifar100").lr == 0.1
    assert ft.finetune_settings("slf", "acl-air", "stl10").lr == 0.01
    aff = ft.finetune_settings("aff", "acl", "cifar10")
    assert (aff.epochs, aff.batch_size, aff.lr, aff.milestones) == (100, 128, 0.1, [40, 60])
    aff = ft.finetune_settings("aff", "dynacl-air++", "cifar10")
    assert (aff.epochs, aff.milestones, aff.beta, aff.train_attack_steps) == (25, [15, 20], 6, 10)
    assert (aff.crop_padding, aff.flip) == (4, True)
    cl = ft.finetune_settings("slf", "cl", "cifar10")
    assert cl.lr == 0.01 and "ACL's" in cl.source
    short = ft.finetune_settings("slf", "acl", "cifar10", epochs=5)
    assert (short.epochs, short.milestones) == (5, [2, 4])
    demo = ft.finetune_settings("alf", "acl", "mnist5k", "demo")
    assert (demo.crop_padding, demo.flip) == (2, False) and demo.epochs < 25


# ---- k-means and "++" ---------------------------------------------------------------------------

def test_kmeans_recovers_separated_clusters_reproducibly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.5 * torch.randn(60, 2, generator=generator)
    labels, centroids = ft.kmeans(x, 3, seed=1)
    # The same partition up to a renaming of the clusters.
    mapping = {int(t): int(lab) for t, lab in zip(truth, labels, strict=True)}
    assert len(set(mapping.values())) == 3
    assert torch.equal(labels, torch.tensor([mapping[int(t)] for t in truth]))
    assert torch.equal(ft.kmeans(x, 3, seed=1)[0], labels)
    with pytest.raises(ValueError, match="k <= N"):
        ft.kmeans(x[:2], 3)


def test_post_process_fine_tunes_the_backbone_on_pseudo_labels():
    model = tiny_model()
    images, _ = tiny_data(n=16)
    options = ft.PostProcessSettings(probe_epochs=2, epochs=1, milestones=[], batch_size=8,
                                     attack_steps=1)
    processed, info = ft.post_process(model, images, 3, EPS, options, seed=0)
    assert sum(info["cluster_sizes"]) == 16 and len(info["cluster_sizes"]) == 3
    before, after = model.state_dict(), processed.state_dict()
    assert set(before) == set(after)
    assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])
    assert torch.equal(after["head.fc1.weight"], before["head.fc1.weight"])


# ---- corruptions -------------------------------------------------------------------------------

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
    assert ft.find_corruptions("cifar10", tmp_path) == tmp_path / "CIFAR-10-C"
    assert ft.find_corruptions("cifar100", tmp_path) is None
    out = ft.corruption_accuracy(ConstantModel(), tmp_path / "CIFAR-10-C", batch_size=4)
    for name in ("gaussian_noise", "fog"):
        assert out["per_corruption"][name]["1"] == 1.0
        for severity in range(2, 6):
            block = labels[(severity - 1) * 6: severity * 6]
            assert out["per_corruption"][name][str(severity)] == pytest.approx(
                (block == 0).mean())
    assert out["mean_per_severity"]["1"] == 1.0
    assert out["mean"] == pytest.approx(np.mean([(labels[i * 6:(i + 1) * 6] == 0).mean()
                                                 for i in range(5)]))


# ---- evaluate() ---------------------------------------------------------------------------------

def test_modes_in_any_order_give_the_same_numbers(cifar_run):
    root, path = cifar_run
    state = torch.get_rng_state()
    first = ft.evaluate(path, data_dir=root, modes="slf,alf,aff", **QUICK)
    second = ft.evaluate(path, data_dir=root, modes=("aff", "alf", "slf"), **QUICK)
    alone = ft.evaluate(path, data_dir=root, modes="alf", **QUICK)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert list(first["modes"]) == ["slf", "alf", "aff"]
    assert list(second["modes"]) == ["aff", "alf", "slf"]
    for mode in ("slf", "alf", "aff"):
        for key in ("standard_accuracy", "pgd20_accuracy", "train_history"):
            assert first["modes"][mode][key] == second["modes"][mode][key]
    # (the mean training loss is a float that any difference in what a mode saw would move)
    assert first["modes"]["aff"]["train_history"][0]["loss"] > 0
    assert alone["modes"]["alf"]["pgd20_accuracy"] == first["modes"]["alf"]["pgd20_accuracy"]
    result = first["modes"]["aff"]
    assert result["settings"]["epochs"] == 1 and result["settings"]["beta"] == 6
    assert result["seconds"] > 0 and first["eps"] == EPS and first["eps_source"] == "checkpoint"
    assert first["test_images"] == 16 and first["method"] == "acl"
    assert first["autoattack"] == {"version": "standard", "attacks": None}  # paper preset
    assert result["pgd20_accuracy"] <= result["standard_accuracy"]
    json.dumps(first)  # JSON-serialisable


def test_missing_checkpoint_key_fails_loudly(cifar_run, tmp_path):
    root, path = cifar_run
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["backbone.layer2.0.shortcut.bn.adv.running_var"]
    broken = tmp_path / "broken.pt"
    torch.save(checkpoint, broken)
    with pytest.raises(StateDictMismatchError, match="shortcut.bn.adv.running_var"):
        ft.evaluate(broken, data_dir=root, modes="aff", **QUICK)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ft.evaluate(tmp_path / "nothing.pt", data_dir=root)


@pytest.mark.parametrize("kwargs, message", [
    (dict(modes="slf,xyz"), "unknown mode 'xyz'; choose one of slf, alf, aff"),
    (dict(attacks="fgsm"), "unknown attack 'fgsm'; choose one of pgd20, autoattack"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'.*cifar10"),
    (dict(preset="fast"), "unknown preset 'fast'"),
    (dict(eps=8.0), "did you mean 8/255"),
    (dict(max_test=0), "max_test must be >= 1"),
])
def test_bad_arguments_name_the_choices(cifar_run, kwargs, message):
    root, path = cifar_run
    with pytest.raises(ValueError, match=message):
        ft.evaluate(path, data_dir=root, **kwargs)


def test_published_checkpoint_and_eps_override_and_corruptions(cifar_run, tmp_path):
    root, _ = cifar_run
    published = tmp_path / "published.pt"
    model = tiny_model()
    torch.save({"state_dict": export_published_state_dict(model.state_dict()), "epoch": 1000},
               published)
    with pytest.raises(ValueError, match="pass dataset="):
        ft.evaluate(published, data_dir=root)
    write_corruptions(tmp_path / "CIFAR-10-C", n=16, classes=10)
    # The corrupted sets are looked up beside the data: point data_dir at a copy holding both.
    (tmp_path / "cifar-10-batches-py").symlink_to(root / "cifar-10-batches-py")
    out = ft.evaluate(published, dataset="cifar10", data_dir=tmp_path, modes="slf", eps=4 / 255,
                      max_test=8, **QUICK)
    assert (out["checkpoint_source"], out["encoder_branch"]) == ("published", "adv")
    assert (out["eps"], out["eps_source"]) == (4 / 255, "override")
    assert out["test_images"] == 8
    corruptions = out["modes"]["slf"]["corruptions"]
    assert set(corruptions["per_corruption"]) == {"gaussian_noise", "fog"}
    assert corruptions["images_per_severity"] == 8


def test_cli_prints_the_table_and_writes_json(cifar_run, tmp_path, capsys):
    from fastacl.cli import main

    root, path = cifar_run
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(path), "--data-dir", str(root), "--modes",
                 "slf", "--attacks", "pgd20", "--epochs", "1", "--max-test", "8", "--json",
                 str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| SLF |" in printed and "PGD-20" in printed
    saved = json.loads(out.read_text())
    assert set(saved["modes"]) == {"slf"} and "pgd20_accuracy" in saved["modes"]["slf"]
    assert "autoattack_accuracy" not in saved["modes"]["slf"]
    assert main(["evaluate", "--checkpoint", str(path), "--modes", "slf,nope"]) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err
