"""fastacl.evaluate (fastacl.evaluation.driver): the protocols end to end on a tiny run."""

import json

import pytest
import torch

from fastacl.errors import ConfigError
from fastacl.evaluation import evaluate
from fastacl.models import StateDictMismatchError, export_published_state_dict
from tests.evaluation.test_corruptions import write_corruptions
from tests.evaluation.tiny import EPS, tiny_model

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
    assert first["autoattack"] == {"version": "standard", "attacks": None}  # paper preset
    assert result["pgd20_accuracy"] <= result["standard_accuracy"]
    assert {"fastacl", "torch", "device_name"} <= set(first["versions"])
    json.dumps(first)  # JSON-serialisable


def test_missing_checkpoint_key_fails_loudly(cifar_run, tmp_path):
    root, path = cifar_run
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["backbone.layer2.0.shortcut.bn.adv.running_var"]
    broken = tmp_path / "broken.pt"
    torch.save(checkpoint, broken)
    with pytest.raises(StateDictMismatchError, match="shortcut.bn.adv.running_var"):
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
])
def test_bad_arguments_name_the_choices(cifar_run, kwargs, message):
    root, path = cifar_run
    with pytest.raises(ValueError, match=message) as raised:
        evaluate(path, data_dir=root, **kwargs)
    assert isinstance(raised.value, ConfigError)  # the CLI prints it as one sentence


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
    assert main(["evaluate", "--checkpoint", str(path), "--modes", "slf,nope"]) == 2
    assert "mode must be one of slf, alf, aff, got 'nope'" in capsys.readouterr().err
