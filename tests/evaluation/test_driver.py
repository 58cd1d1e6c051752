"""fastacl.evaluate (fastacl.evaluation.driver): the protocols end to end on a tiny run."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fastacl
from fastacl import attacks, utils
from fastacl.data import load_dataset
from fastacl.errors import BadFileError, ConfigError
from fastacl.evaluation import corruptions as corruption_sets
from fastacl.evaluation import driver, evaluate, fine_tuning, robustness
from fastacl.models import StateDictMismatchError, export_published_state_dict, save_checkpoint
from tests.evaluation.test_corruptions import write_corruptions
from tests.evaluation.tiny import EPS, tiny_model
from tests.synthetic import make_cifar10, write_cifar_batch

QUICK = dict(epochs=1, attacks=("pgd20",), progress=False)


def test_modes_in_any_order_give_the_same_numbers(cifar_run):
    root, path = cifar_run
    state = torch.get_rng_state()
    first = evaluate(path, data_dir=root, modes="slf,alf,aff", **QUICK)
    second = evaluate(path, data_dir=root, modes=("aff", "alf", "slf"), **QUICK)
    alone = evaluate(path, data_dir=root, modes="alf", **QUICK)
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
    assert result["settings"]["seed"] == 30  # protocols.mode_seed(0, "aff")
    assert result["seconds"] > 0 and first["eps"] == EPS and first["eps_source"] == "checkpoint"
    assert first["test_images"] == 16 and first["method"] == "acl"
    assert "autoattack" not in first  # not run: no settings recorded for it
    assert result["pgd20_accuracy"] <= result["standard_accuracy"]
    assert {"fastacl", "torch", "device_name"} <= set(first["versions"])
    json.dumps(first)  # JSON-serialisable


def test_missing_checkpoint_key_fails_loudly(cifar_run, tmp_path):
    root, path = cifar_run
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["backbone.layer2.0.shortcut.bn.adv.running_var"]
    broken = tmp_path / "broken.pt"
    torch.save(checkpoint, broken)
    with pytest.raises(StateDictMismatchError, match="broken.pt: state dict does not match"
                                                     "(.|\n)*shortcut.bn.adv.running_var"):
        evaluate(broken, data_dir=root, modes="aff", **QUICK)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "nothing.pt", data_dir=root)


@pytest.mark.parametrize("kwargs, message", [
    (dict(modes="slf,xyz"), "mode must be one of slf, alf, aff, got 'xyz'"),
    (dict(attacks="fgsm"), "attack must be one of pgd20, autoattack, got 'fgsm'"),
    (dict(dataset="imagenet"), "dataset must be one of .*cifar10.*, got 'imagenet'"),
    (dict(preset="fast"), "preset must be one of demo, paper, got 'fast'"),
    (dict(eps=8.0), "did you mean 8/255"),
    (dict(max_test=0), "max_test must be >= 1"),
    (dict(corruptions="yes"), "corruptions must be 'auto', True or False"),
    (dict(autoattack_attacks=["apgd-ce"]), "autoattack_attacks goes with"),
    (dict(autoattack_version="fast"), "autoattack_version must be one of standard, plus"),
    (dict(autoattack_version="custom", autoattack_attacks="apgd-ce,apgd"),
     "autoattack attack must be one of apgd-ce, .*, got 'apgd'"),
    (dict(method="acl-ari"), "method must be one of cl, acl, .*, got 'acl-ari'"),
    (dict(eps="8/255"), "got the string '8/255': pass 8 / 255"),
    (dict(epochs=0), "epochs must be >= 1, got 0"),
    (dict(max_train=0), "max_train must be >= 1, got 0"),
    (dict(max_test=2.5), "max_test must be an integer >= 1, got 2.5"),
    (dict(device="gpu"), "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (dict(device="meta"), "device must be auto, cpu, cuda or cuda:N, got 'meta'"),
])
def test_bad_arguments_name_the_choices(cifar_run, kwargs, message):
    root, path = cifar_run
    with pytest.raises(ValueError, match=message) as raised:
        evaluate(path, data_dir=root, **kwargs)
    assert isinstance(raised.value, ConfigError)  # the CLI prints it as one sentence


def test_a_cuda_device_torch_does_not_see_is_refused_first(cifar_run, monkeypatch):
    root, path = cifar_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device cuda was asked for but torch sees no CUDA "
                                          "device; use --device cpu or auto"):
        evaluate(path, data_dir=root, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="device cuda:3 was asked for but torch sees 1 CUDA"):
        evaluate(path, data_dir=root, device="cuda:3")


def test_every_check_comes_before_fine_tuning(cifar_run, tmp_path, monkeypatch):
    """A bad file that is read last (the corrupted sets) still fails before any training."""
    root, path = cifar_run
    monkeypatch.setattr(driver, "finetune", lambda *a, **k: pytest.fail("fine-tuning started"))
    (tmp_path / "cifar-10-batches-py").symlink_to(root / "cifar-10-batches-py")
    folder = tmp_path / "CIFAR-10-C"
    write_corruptions(folder, n=16, classes=10)
    np.save(folder / "fog.npy", np.zeros((80, 32, 32), dtype=np.uint8))
    with pytest.raises(BadFileError, match=r"fog.npy: expected uint8 \[80, H, W, C\]"):
        evaluate(path, data_dir=tmp_path, **QUICK)
    bad_test = tmp_path / "bad_test"
    shutil.copytree(root / "cifar-10-batches-py", bad_test / "cifar-10-batches-py")
    (bad_test / "cifar-10-batches-py" / "test_batch").write_bytes(b"truncated")
    with pytest.raises(BadFileError, match="test_batch is not a readable CIFAR python batch"):
        evaluate(path, data_dir=bad_test, **QUICK)
    one_channel = save_checkpoint(tmp_path / "mnist.pt", tiny_model(in_channels=1),
                                  dataset="mnist5k")
    with pytest.raises(ConfigError, match="mnist.pt holds a model for 1-channel images, but "
                                          "cifar10's have 3: .* \\(mnist5k\\)"):
        evaluate(one_channel, dataset="cifar10", data_dir=root, **QUICK)


def test_a_run_dir_is_its_checkpoint_and_every_stage_shows_progress(cifar_run, tmp_path,
                                                                    monkeypatch):
    """By default (progress not given) fine-tuning, PGD-20, AutoAttack and the corruptions
    each go through fastacl.utils.progress, enabled, so a log file shows them."""
    root, path = cifar_run
    shown = []

    def recording(total, desc, enabled=True, **kwargs):
        shown.append((desc, enabled))
        return utils.progress(total, desc, False, **kwargs)

    for module in (fine_tuning, robustness, corruption_sets, attacks):
        monkeypatch.setattr(module, "progress_bar", recording)
    (tmp_path / "run").mkdir()
    shutil.copy(path, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "cifar-10-batches-py").symlink_to(root / "cifar-10-batches-py")
    write_corruptions(tmp_path / "CIFAR-10-C", n=16, classes=10)
    out = evaluate(tmp_path / "run", data_dir=tmp_path, modes="slf", epochs=1, max_test=4,
                   attacks="pgd20,autoattack", autoattack_version="custom",
                   autoattack_attacks=["apgd-ce"])
    assert out["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")
    assert out["autoattack"] == {"version": "custom", "attacks": ["apgd-ce"]}  # it ran
    assert "autoattack_accuracy" in out["modes"]["slf"]
    assert [desc for desc, _ in shown] == ["slf fine-tuning", "PGD-20", "AutoAttack (custom)",
                                           "corruptions"]
    assert all(enabled is not False for _, enabled in shown)


def test_published_checkpoint_and_eps_override_and_corruptions(cifar_run, tmp_path):
    root, _ = cifar_run
    published = tmp_path / "published.pt"
    model = tiny_model()
    torch.save({"state_dict": export_published_state_dict(model.state_dict()), "epoch": 1000},
               published)
    with pytest.raises(ValueError, match="pass dataset="):
        evaluate(published, data_dir=root)
    with pytest.raises(FileNotFoundError, match="CIFAR-10-C folder"):
        evaluate(published, dataset="cifar10", data_dir=root, corruptions=True)
    write_corruptions(tmp_path / "CIFAR-10-C", n=16, classes=10)
    # The corrupted sets are looked up beside the data: point data_dir at a copy holding both.
    (tmp_path / "cifar-10-batches-py").symlink_to(root / "cifar-10-batches-py")
    out = evaluate(published, dataset="cifar10", data_dir=tmp_path, modes="slf", eps=4 / 255,
                   max_test=8, **QUICK)
    assert (out["checkpoint_source"], out["encoder_branch"]) == ("published", "adv")
    assert (out["eps"], out["eps_source"]) == (4 / 255, "override")
    assert out["test_images"] == 8
    corruptions = out["modes"]["slf"]["corruptions"]
    assert set(corruptions["per_corruption"]) == {"gaussian_noise", "fog"}
    assert corruptions["images_per_severity"] == 8


def test_post_process_then_a_mode_is_recorded_as_plus_plus(cifar_run):
    root, path = cifar_run
    out = evaluate(path, data_dir=root, modes="slf", max_train=40, post_process=True, **QUICK)
    assert out["method"] == "acl++" and out["post_process"]["train_images"] == 40
    assert out["post_process"]["settings"]["max_train"] == 40
    assert out["modes"]["slf"]["settings"]["encoder"].startswith("frozen adv-branch")


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
    assert "autoattack" not in saved and "AutoAttack" not in printed  # not run, not recorded
    code = main(["evaluate", "--checkpoint", str(path), "--data-dir", str(root), "--modes",
                 "slf", "--attacks", "autoattack", "--autoattack-version", "custom",
                 "--autoattack-attacks", "apgd-ce", "--epochs", "1", "--max-test", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| mode | standard acc. | AutoAttack |" in printed
    assert "AutoAttack: custom (apgd-ce), l_inf eps" in printed
    assert main(["evaluate", "--checkpoint", str(path), "--modes", "slf,nope"]) == 2
    assert "mode must be one of slf, alf, aff, got 'nope'" in capsys.readouterr().err


def test_save_keeps_each_classifier_as_it_was_tested(cifar_run, tmp_path, monkeypatch):
    """The saved SLF / ALF / AFF classifiers load to the fine-tuned networks' logits, and score
    the standard accuracy the evaluation recorded on the test split."""
    root, path = cifar_run
    tested, save_classifier = {}, driver.save_classifier

    def recording(network, where, **kwargs):
        tested[kwargs["mode"]] = copy.deepcopy(network)
        return save_classifier(network, where, **kwargs)

    monkeypatch.setattr(driver, "save_classifier", recording)
    out = evaluate(path, data_dir=root, modes="slf,alf,aff", max_train=40,
                   save=tmp_path / "saved", **QUICK)
    images, labels = load_dataset("cifar10", root, split="test")
    x = images.float() / 255
    for mode, result in out["modes"].items():
        saved = Path(result["saved"])
        assert saved == tmp_path / "saved" / f"{mode}.safetensors"
        with torch.no_grad():
            logits = fastacl.load_classifier(saved)(x)
            network = tested[mode]
            expected = network(x, branch="adv") if mode == "aff" else network(x)
        assert torch.equal(logits, expected)
        assert (logits.argmax(1) == labels).float().mean().item() == result["standard_accuracy"]
        card = json.loads(saved.with_suffix(".json").read_text())
        assert card["accuracies"] == {key: result[key] for key in ("standard_accuracy",
                                                                   "pgd20_accuracy")}
        assert (card["mode"], card["branch"], card["dataset"]) == (mode, "adv", "cifar10")
        assert card["head"] == {"in_features": 32, "num_classes": 10}
        assert card["settings"] == json.loads(json.dumps(result["settings"]))
        assert card["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert card["pretrained"]["method"] == "acl" and card["eps"] == EPS
    json.dumps(out)


def test_cli_evaluate_save(cifar_run, tmp_path, capsys, monkeypatch):
    from fastacl.cli import main

    root, path = cifar_run
    saved = tmp_path / "classifiers"
    assert main(["evaluate", "--checkpoint", str(path), "--data-dir", str(root), "--modes",
                 "slf", "--attacks", "pgd20", "--epochs", "1", "--max-test", "4", "--save",
                 str(saved)]) == 0
    assert "classifiers saved in" in capsys.readouterr().out
    assert sorted(p.name for p in saved.iterdir()) == ["slf.json", "slf.safetensors"]
    monkeypatch.setattr(driver, "finetune", lambda *a, **k: pytest.fail("fine-tuning started"))
    assert main(["evaluate", "--checkpoint", str(path), "--data-dir", str(root), "--modes",
                 "slf", "--save", str(path)]) == 2
    assert "is a file: pass a folder for the fine-tuned classifiers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def imagenet32_run(tmp_path_factory):
    """A tiny checkpoint pre-trained "on imagenet32", and synthetic CIFAR-10 / CIFAR-100 in
    which most of CIFAR-100's classes have no image."""
    root = tmp_path_factory.mktemp("transfer")
    make_cifar10(root, n=8)
    folder = root / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 24, b"fine_labels", 100, seed=3)
    write_cifar_batch(folder / "test", 8, b"fine_labels", 100, seed=4)
    path = save_checkpoint(root / "imagenet32.pt", tiny_model(), method="acl",
                           encoder_branch="adv", attack={"norm": "linf", "eps": EPS},
                           dataset="imagenet32")
    return root, path


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_transfer_fine_tunes_and_tests_on_the_dataset_asked_for(imagenet32_run, tmp_path,
                                                                 dataset, classes):
    root, path = imagenet32_run
    out = evaluate(path, dataset=dataset, data_dir=root, modes="slf,alf,aff",
                   save=tmp_path, **QUICK)
    assert (out["dataset"], out["pretrained_dataset"]) == (dataset, "imagenet32")
    assert out["num_classes"] == classes  # the dataset's, not the labels its files hold
    assert out["test_images"] == 8 and out["eps_source"] == "checkpoint"
    x = torch.rand(2, 3, 32, 32)
    for mode, result in out["modes"].items():
        classifier = fastacl.load_classifier(result["saved"])
        assert classifier(x).shape == (2, classes), mode
        card = json.loads(Path(result["saved"]).with_suffix(".json").read_text())
        assert (card["dataset"], card["pretrained"]["dataset"]) == (dataset, "imagenet32")
