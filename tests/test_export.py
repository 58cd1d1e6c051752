"""fastacl.export: encoders and fine-tuned classifiers as safetensors + a JSON card, loaded back
to modules that compute exactly what the originals did."""

import copy
import hashlib
import json
from datetime import datetime

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastacl
from fastacl.cli import main
from fastacl.errors import BadFileError, ConfigError, MissingFileError
from fastacl.evaluation import aff_network, linear_network
from fastacl.export import save_classifier
from fastacl.models import (
    CheckpointError,
    StateDictMismatchError,
    build_model,
    has_dual_bn,
    save_checkpoint,
)
from tests.evaluation.tiny import EPS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACK = {"norm": "linf", "eps": EPS, "step_size": 2 / 255, "steps": 5}
CONFIG = {"method": "acl", "data": {"dataset": "cifar10"}, "epochs": 2}


def _checkpoint(path, model=None, **extra):
    extra = {"method": "acl", "encoder_branch": "adv", "attack": ATTACK, "dataset": "cifar10",
             "train_state": {"config": CONFIG, "epoch": 2}, **extra}
    return save_checkpoint(path, tiny_model() if model is None else model, **extra)


def _images(n=5, channels=3, size=32, seed=1):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_vit():
    torch.manual_seed(0)
    model = build_model("vit-tiny", dim=16, depth=1, heads=2, mlp_dim=32, head_dim=8)
    with torch.no_grad():  # distinct branches: a loader that took the wrong one is told apart
        for name, tensor in model.backbone.state_dict().items():
            if ".adv." in name:
                tensor.add_(0.1 * torch.rand_like(tensor))
    return model.eval()


@pytest.mark.parametrize("build", [tiny_model, _tiny_vit], ids=["resnet18", "vit-tiny"])
@pytest.mark.parametrize("branch", ["adv", "normal"])
def test_exported_encoder_loads_back_with_identical_features(tmp_path, build, branch):
    model = build()
    path = _checkpoint(tmp_path / "ckpt.pt", model)
    out = fastacl.export_encoder(path, tmp_path / "shipped", branch=branch)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.safetensors", "model_card.json"]
    encoder = fastacl.load_encoder(out)
    assert not encoder.training and not has_dual_bn(encoder)  # one branch, plain norms
    x = _images()
    with torch.no_grad():
        expected = model(x, branch=branch, return_features=True)
        assert torch.equal(encoder(x), expected)
        other = "normal" if branch == "adv" else "adv"
        assert not torch.equal(expected, model(x, branch=other, return_features=True))
    # The weights file is plain safetensors: the backbone alone, no branch in its keys.
    tensors = load_file(out / "encoder.safetensors")
    assert not any(".adv." in key or ".normal." in key or key.startswith("head.")
                   for key in tensors)
    # Either file of the export names it too.
    reloaded = fastacl.load_encoder(out / "encoder.safetensors")
    assert torch.equal(reloaded(x), expected)


def test_the_card_records_what_the_encoder_is_and_where_it_comes_from(tmp_path):
    model = tiny_model()
    path = _checkpoint(tmp_path / "ckpt.pt", model)
    out = fastacl.export_encoder(path, tmp_path / "shipped")
    card = json.loads((out / "model_card.json").read_text())
    assert (card["format"], card["format_version"]) == ("fastacl.encoder", 1)
    assert (card["method"], card["dataset"], card["branch"]) == ("acl", "cifar10", "adv")
    assert card["attack"] == ATTACK and card["config"] == CONFIG
    assert card["backbone"] == json.loads(json.dumps(model.spec))
    assert card["feature_dim"] == model.feature_dim and card["input"]["channels"] == 3
    assert card["source"]["checkpoint"] == str(path.resolve())
    assert card["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["source"]["epoch"] == 2
    assert card["weights"]["sha256"] == hashlib.sha256(
        (out / "encoder.safetensors").read_bytes()).hexdigest()
    assert card["versions"]["fastacl"] == fastacl.__version__
    assert card["versions"]["torch"] == torch.__version__
    assert datetime.fromisoformat(card["created"]).tzinfo is not None


def test_cli_export_writes_the_folder_load_encoder_reads(tmp_path, capsys):
    model = tiny_model()
    path = _checkpoint(tmp_path / "ckpt.pt", model)
    assert main(["export", "--checkpoint", str(tmp_path), "--out-dir", str(tmp_path / "e"),
                 "--branch", "normal"]) == 2  # a folder without checkpoint.pt
    assert "without a checkpoint.pt" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--out-dir", str(tmp_path / "e"),
                 "--branch", "normal"]) == 0
    printed = capsys.readouterr().out
    assert "encoder (resnet18, normal branch, 32-d features) written to" in printed
    assert "fastacl.load_encoder(" in printed
    x = _images()
    assert torch.equal(fastacl.load_encoder(tmp_path / "e")(x),
                       model(x, branch="normal", return_features=True))


def test_a_published_checkpoint_exports_too(tmp_path):
    from fastacl.models import export_published_state_dict

    model = tiny_model()
    published = tmp_path / "published.pt"
    torch.save({"state_dict": export_published_state_dict(model.state_dict())}, published)
    out = fastacl.export_encoder(published, tmp_path / "shipped")
    card = json.loads((out / "model_card.json").read_text())
    assert card["source"]["kind"] == "published" and card["method"] is None
    x = _images()
    assert torch.equal(fastacl.load_encoder(out)(x), model(x, branch="adv",
                                                          return_features=True))


def test_rcs_imagenet32_wrn_checkpoint_exports_with_its_pgd_branch(tmp_path):
    """Their WRN's bn_list.0 is the pgd branch; the shipped encoder takes [0, 1] pixels, as
    theirs does."""
    from tests.models.test_published_wrn import their_forward, their_wrn_state_dict, unprefixed

    theirs = their_wrn_state_dict(16, 2)
    published = tmp_path / "model.pt"
    torch.save({"epoch": 200, "state_dict": theirs, "optim": {}}, published)
    out = fastacl.export_encoder(published, tmp_path / "shipped")
    card = json.loads((out / "model_card.json").read_text())
    assert card["branch"] == "adv" and card["backbone"]["kwargs"]["head_layers"] == 2
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(fastacl.load_encoder(out)(x),
                                   their_forward(unprefixed(theirs), x, "pgd", features=True),
                                   rtol=1e-5, atol=1e-5)


def test_export_errors_name_the_file_and_the_fix(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="nothing.pt does not exist"):
        fastacl.export_encoder(tmp_path / "nothing.pt", tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt is not a fastacl or published "
                                              "checkpoint: torch.load cannot read a text file"):
        fastacl.export_encoder(text, tmp_path / "out")
    user = save_checkpoint(tmp_path / "user.pt",
                           nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), method="acl")
    with pytest.raises(CheckpointError, match="user.pt was saved from your own module .*: save "
                                              "that module's weights yourself"):
        fastacl.export_encoder(user, tmp_path / "out")
    assert main(["export", "--checkpoint", str(user), "--out-dir", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "safetensors.torch.save_file" in message
    checkpoint = torch.load(_checkpoint(tmp_path / "ckpt.pt"), weights_only=True)
    checkpoint["model_spec"]["name"] = "resnet7"
    torch.save(checkpoint, tmp_path / "unknown.pt")
    with pytest.raises(ConfigError, match="unknown.pt: this fastacl's build_model cannot build "
                                          "the backbone 'resnet7' .*fastacl version"):
        fastacl.export_encoder(tmp_path / "unknown.pt", tmp_path / "out")
    single = _checkpoint(tmp_path / "cl.pt", tiny_model(dual_bn=False), method="cl",
                         encoder_branch="normal")
    with pytest.raises(ConfigError, match="single-BN model .*branch='normal'"):
        fastacl.export_encoder(single, tmp_path / "out")
    with pytest.raises(ConfigError, match="branch must be one of"):
        fastacl.export_encoder(single, tmp_path / "out", branch="clean")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="out_dir .*file is a file"):
        fastacl.export_encoder(single, tmp_path / "file", branch="normal")
    assert not (tmp_path / "out").exists()  # nothing written by a failed export


def test_load_encoder_refuses_what_is_not_a_whole_export(tmp_path):
    out = fastacl.export_encoder(_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "shipped")
    card_path = out / "model_card.json"
    card = json.loads(card_path.read_text())
    with pytest.raises(MissingFileError, match="nowhere does not exist"):
        fastacl.load_encoder(tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="model_card.json does not exist: pass a folder "
                                               "written by `fastacl export`"):
        fastacl.load_encoder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_card.json").write_text("{not json")
    with pytest.raises(BadFileError, match="is not a fastacl model card: it is not JSON"):
        fastacl.load_encoder(broken)
    (broken / "model_card.json").write_text(json.dumps({**card, "format": "fastacl.classifier"}))
    with pytest.raises(BadFileError, match="not a fastacl.encoder card .*load_classifier"):
        fastacl.load_encoder(broken)
    (broken / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(MissingFileError, match="encoder.safetensors does not exist: "
                                               "model_card.json describes"):
        fastacl.load_encoder(broken)
    (broken / "encoder.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(BadFileError, match="is not the file model_card.json describes"):
        fastacl.load_encoder(broken)
    (broken / "model_card.json").write_text(json.dumps({**card, "weights": {
        "file": "encoder.safetensors"}}))  # no sha256 to check: the file itself is refused
    with pytest.raises(BadFileError, match="is not a readable safetensors file"):
        fastacl.load_encoder(broken)
    card_path.write_text(json.dumps({**card, "backbone": {"name": "vit-huge", "kwargs": {}}}))
    with pytest.raises(ConfigError, match="this fastacl's build_model cannot build the backbone "
                                          "'vit-huge'"):
        fastacl.load_encoder(out)
    card_path.write_text(json.dumps({**card, "backbone": {
        **card["backbone"], "kwargs": {**card["backbone"]["kwargs"], "width": 8}}}))
    with pytest.raises(StateDictMismatchError, match="encoder.safetensors: state dict does not "
                                                     "match(.|\n)*shape mismatches"):
        fastacl.load_encoder(out)


@pytest.mark.parametrize("mode", ["slf", "aff"])
def test_a_saved_classifier_gives_the_logits_of_the_network(tmp_path, mode):
    model = tiny_model()
    network = (aff_network(model, 10) if mode == "aff" else linear_network(model, "adv", 10))
    with torch.no_grad():  # a trained-looking head and, for AFF, moved adv-branch weights
        network.fc.weight.normal_(generator=torch.Generator().manual_seed(2))
        network.fc.bias.uniform_(-1, 1)
    network.eval()
    path = save_classifier(network, tmp_path / f"{mode}.safetensors", mode=mode, branch="adv",
                           backbone=model.spec, accuracies={"standard_accuracy": 0.5})
    classifier = fastacl.load_classifier(path)
    x = _images()
    with torch.no_grad():
        expected = network(x, branch="adv") if mode == "aff" else network(x)
        assert torch.equal(classifier(x), expected)
        assert torch.equal(fastacl.load_classifier(path.with_suffix(".json"))(x), expected)
    assert not classifier.training and not has_dual_bn(classifier)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["head"] == {"in_features": 32, "num_classes": 10}
    assert (card["mode"], card["branch"], card["accuracies"]) == (mode, "adv",
                                                                  {"standard_accuracy": 0.5})
    # The in-memory network is left as it was (AFF: still dual, still routed per call).
    assert has_dual_bn(network) == (mode == "aff")


def test_load_classifier_refuses_what_is_not_a_classifier(tmp_path):
    model = tiny_model()
    out = fastacl.export_encoder(_checkpoint(tmp_path / "ckpt.pt", model), tmp_path / "enc")
    with pytest.raises(ConfigError, match="enc is a folder: pass one of the classifiers .*load "
                                          "an encoder with fastacl.load_encoder"):
        fastacl.load_classifier(out)
    with pytest.raises(MissingFileError, match="slf.safetensors does not exist"):
        fastacl.load_classifier(tmp_path / "slf.safetensors")
    with pytest.raises(BadFileError, match="not a fastacl.classifier card"):
        fastacl.load_classifier(out / "model_card.json")
    network = linear_network(model, "adv", 3)
    path = save_classifier(network, tmp_path / "slf.safetensors", mode="slf", branch="adv",
                           backbone=model.spec)
    retrained = copy.deepcopy(network)
    nn.init.ones_(retrained.fc.weight)
    other = save_classifier(retrained, tmp_path / "alf.safetensors", mode="alf", branch="adv",
                            backbone=model.spec)
    other.replace(path)  # another export's weights beside slf.json
    with pytest.raises(BadFileError, match="slf.safetensors is not the file slf.json describes"):
        fastacl.load_classifier(path)
    with pytest.raises(TypeError, match="save_classifier takes the LinearClassifier"):
        save_classifier(model, tmp_path / "model.safetensors", mode="slf", branch="adv",
                        backbone=model.spec)
