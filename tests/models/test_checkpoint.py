"""Checkpoints: schema, weights_only loading, atomic writes, strict state dicts."""

import datetime
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastacl.errors import BadFileError, FastaclError, MissingFileError
from fastacl.models import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    StateDictMismatchError,
    build_model,
    build_model_from_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    resnet18_acl,
    save_checkpoint,
)
from fastacl.models.checkpoint import CHECKPOINT_NAME, checkpoint_file


def tiny_model(**kwargs):
    return resnet18_acl(width=4, head_dim=8, **kwargs)


def trained_tiny_model_and_optimizer():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10], gamma=0.1)
    loss = model(torch.rand(4, 3, 8, 8), branch="adv").square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def files_in(directory):
    return sorted(path.name for path in directory.iterdir())


def test_save_load_round_trip_with_extra_state(tmp_path):
    model, optimizer, scheduler = trained_tiny_model_and_optimizer()
    path = tmp_path / "run" / "last.pt"  # the directory does not exist yet
    extra = {
        "method": "dynacl-air",
        "encoder_branch": "adv",
        "attack": {"norm": "linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 5},
        "config": {"epochs": 1000, "milestones": [10, 20], "dataset": None, "lr": 0.5},
        "epoch": 3,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate()},
    }
    assert save_checkpoint(path, model, **extra) == path
    assert files_in(path.parent) == ["last.pt"]  # no temporary file left

    raw = torch.load(path, weights_only=True)  # loads without any unpickling of objects
    assert raw["format"] == CHECKPOINT_FORMAT and raw["format_version"] == FORMAT_VERSION
    assert raw["versions"]["torch"] == torch.__version__

    checkpoint = load_checkpoint(path)
    assert checkpoint["model_spec"] == model.spec
    assert checkpoint["extra"]["attack"] == extra["attack"]
    assert checkpoint["extra"]["config"] == extra["config"]
    assert torch.equal(checkpoint["extra"]["rng"]["torch"], extra["rng"]["torch"])
    rebuilt = build_model_from_checkpoint(checkpoint)
    for key, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], tensor), key
    assert torch.equal(build_model_from_checkpoint(path).backbone.conv1.weight,
                       model.backbone.conv1.weight)

    resumed = torch.optim.SGD(rebuilt.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(checkpoint["extra"]["optimizer"])
    momentum = resumed.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_a_failure_while_writing_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_model(), epoch=1)
    before = path.read_bytes()

    def save_half_then_fail(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny_model(), epoch=2)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["extra"]["epoch"] == 1


def test_extra_that_weights_only_cannot_load_is_refused_before_writing(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(TypeError, match=r"extra\['rng'\]\['numpy'\].*numpy"):
        save_checkpoint(path, tiny_model(), rng={"numpy": np.random.get_state()})
    with pytest.raises(TypeError, match=r"extra\['config'\].*SimpleNamespace"):
        save_checkpoint(path, tiny_model(), config=__import__("types").SimpleNamespace(a=1))
    assert files_in(tmp_path) == []


def test_load_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(tiny_model().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a fastacl checkpoint"):
        load_checkpoint(plain)

    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, tiny_model())
    checkpoint = torch.load(newer, weights_only=True)
    checkpoint["format_version"] = FORMAT_VERSION + 1
    torch.save(checkpoint, newer)
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(newer)

    unsafe = tmp_path / "unsafe.pt"
    # A picklable object that weights_only refuses, as a hostile pickle would hold.
    torch.save({"format": CHECKPOINT_FORMAT, "payload": datetime.date(2024, 1, 1)}, unsafe)
    with pytest.raises(CheckpointError, match="holds a datetime.date.*weights_only=True") as raised:
        load_checkpoint(unsafe)
    assert "weights_only=False" not in str(raised.value)  # torch's advice is never passed on
    assert raised.value.__suppress_context__  # nor shown in a traceback


README = Path(__file__).resolve().parents[2] / "README.md"


def _truncated(path, tmp_path):
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    return truncated


@pytest.mark.parametrize("kind, what", [
    ("text", "a text file"),
    ("readme", "a text file"),
    ("truncated", "a zip archive that ends early"),
    ("empty", "an empty file"),
    ("binary", "its 3000 bytes"),
    ("zip", "a zip archive that torch.save did not write"),
])
def test_unreadable_files_are_a_bad_file_error_naming_them(tmp_path, kind, what):
    good = save_checkpoint(tmp_path / "good.pt", tiny_model())
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("epoch 1 loss 0.5\n")
    elif kind == "readme":
        path = README
    elif kind == "truncated":
        path = _truncated(good, tmp_path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(200, 256)) * 50 + bytes(200))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(BadFileError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message == (f"{path} is not a fastacl or published checkpoint: torch.load cannot "
                       f"read {what} (truncated, or another kind of file)")
    assert isinstance(raised.value, CheckpointError) and isinstance(raised.value, RuntimeError)
    assert isinstance(raised.value, FastaclError)  # the fastacl command prints it, exit 2


def test_a_run_directory_means_its_checkpoint(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, model, epoch=3)
    assert load_checkpoint(tmp_path / "run")["extra"]["epoch"] == 3
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(MissingFileError, match=f"empty_run is a directory without a "
                                               f"{CHECKPOINT_NAME}"):
        load_checkpoint(tmp_path / "empty_run")
    with pytest.raises(MissingFileError, match="nothing.pt does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError):  # MissingFileError is one
        load_checkpoint(tmp_path / "nothing.pt")
    assert checkpoint_file(tmp_path / "run") == tmp_path / "run" / CHECKPOINT_NAME


def test_the_run_directory_file_name_is_the_trainers():
    from fastacl.pretrain import state

    assert state.CHECKPOINT_NAME == CHECKPOINT_NAME


def test_strict_loading_names_missing_and_unexpected_keys():
    model = tiny_model()
    state = model.state_dict()
    del state["backbone.layer2.0.shortcut.bn.adv.running_var"]
    state["head.fc4.weight"] = torch.zeros(8, 8)
    with pytest.raises(StateDictMismatchError) as error:
        load_state_dict_strict(model, state)
    message = str(error.value)
    assert "missing keys (1): backbone.layer2.0.shortcut.bn.adv.running_var" in message
    assert "unexpected keys (1): head.fc4.weight" in message
    assert error.value.missing == ["backbone.layer2.0.shortcut.bn.adv.running_var"]


def test_strict_loading_names_shape_mismatches_and_dual_bn_mismatches():
    model = tiny_model()
    wider = resnet18_acl(width=8, head_dim=8).state_dict()
    with pytest.raises(StateDictMismatchError, match=r"backbone\.conv1\.weight \(checkpoint"):
        load_state_dict_strict(model, wider)
    single = tiny_model(dual_bn=False).state_dict()
    expected = r"(?s)backbone\.bn1\.adv\.bias.*check dual_bn"
    with pytest.raises(StateDictMismatchError, match=expected):
        load_state_dict_strict(model, single)
    one_missing = tiny_model().state_dict()
    del one_missing["backbone.bn1.adv.bias"]
    with pytest.raises(StateDictMismatchError, match="missing keys") as raised:
        load_state_dict_strict(model, one_missing)
    assert "dual_bn" not in str(raised.value)  # a missing key, not a dual-BN mismatch


def test_checkpoint_of_a_checkpoint_mismatch_fails_loudly(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, build_model("resnet18-small", in_channels=1))
    checkpoint = load_checkpoint(path)
    checkpoint["state_dict"].pop("head.bn3.normal.weight")
    with pytest.raises(StateDictMismatchError, match="head.bn3.normal.weight"):
        build_model_from_checkpoint(checkpoint)


def test_wrapped_models_are_saved_without_prefixes(tmp_path):
    model = tiny_model()
    path = tmp_path / "wrapped.pt"
    save_checkpoint(path, nn.DataParallel(model))
    keys = set(load_checkpoint(path)["state_dict"])
    assert keys == set(model.state_dict())


def test_a_user_module_saves_but_needs_its_own_constructor(tmp_path):
    path = tmp_path / "user.pt"
    user = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    save_checkpoint(path, user, method="acl")
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_spec"] is None
    with pytest.raises(CheckpointError, match="no model spec"):
        build_model_from_checkpoint(checkpoint)
    load_state_dict_strict(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
                           checkpoint["state_dict"])
