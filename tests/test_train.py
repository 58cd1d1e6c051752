"""fastacl.train (fastacl.pretrain): presets and validation, resume equality, interruption,
learning, paper preset."""

import json
import subprocess
import sys

import pytest
import torch

import fastacl
from fastacl import TrainConfig
from fastacl.evaluation import quick_check
from fastacl.models import load_checkpoint
from fastacl.pretrain import CHECKPOINT_NAME, augmentation_strength, state
from tests.synthetic import make_cifar10

# A run small enough for a unit test: 40 demo images (32 after the RCS validation hold-out),
# batches of 16 (two steps an epoch), 1 PGD step.
TINY = dict(max_train=40, batch_size=16, attack_steps=1, evaluate=False)


def test_presets_and_epoch_relative_schedules():
    demo = TrainConfig().resolve()
    assert (demo.preset, demo.data.dataset, demo.model.name) == ("demo", "mnist5k",
                                                                 "resnet18-small")
    paper = TrainConfig.from_options(method="dynacl-air", dataset="cifar10").resolve()
    assert paper.preset == "paper"
    o = paper.optim
    assert (paper.model.name, o.batch_size, o.lr, o.epochs) == ("resnet18", 512, 5.0, 1000)
    assert (paper.attack.eps, paper.attack.step_size, paper.attack.steps) == (8 / 255, 2 / 255, 5)
    # docs/acl-air.md section 5: warm-up E/100 and DynAug period E/20 (10 and 50 at E = 1000)
    assert (o.warmup_epochs, paper.data.dynaug_period) == (10, 50)
    assert (paper.loss.lambda1, paper.loss.lambda2) == (0.5, 0.5)
    short = TrainConfig.from_options(dataset="cifar10", epochs=100, batch_size=64).resolve()
    assert (short.optim.warmup_epochs, short.data.dynaug_period, short.optim.batch_size) == (
        1, 5, 64)
    assert (short.loss.lambda1, short.loss.lambda2) == (0.0, 0.0)


def test_dynaug_period_is_the_one_the_augmentation_defines():
    """E = 50: E/20 = 2.5 rounds half up to 3 (fastacl.data.dynaug_period); Python's round()
    would give 2, and the trainer once used it."""
    from fastacl.data import dynaug_period

    for epochs in (1, 2, 30, 50, 70, 1000):
        cfg = TrainConfig.from_options(method="dynacl", epochs=epochs).resolve()
        assert cfg.data.dynaug_period == dynaug_period(epochs)
    assert TrainConfig.from_options(method="dynacl", epochs=50).resolve().data.dynaug_period == 3


def test_explicit_zero_is_not_replaced_by_the_default():
    cfg = TrainConfig.from_options(warmup_epochs=0, dataset="cifar10", epochs=100).resolve()
    assert cfg.optim.warmup_epochs == 0
    assert TrainConfig.from_options(coreset="rcs", coreset_warmup=0).resolve().coreset.warmup == 0


def test_options_round_trip_through_the_nested_config():
    cfg = TrainConfig.from_options(eps=0.1, coreset_fraction=0.3, evaluate=False, model="resnet18",
                                   attack_steps=2, eval_epochs=4)
    assert (cfg.attack.eps, cfg.coreset.fraction, cfg.eval.enabled) == (0.1, 0.3, False)
    assert (cfg.model.name, cfg.attack.steps, cfg.eval.epochs) == ("resnet18", 2, 4)
    assert TrainConfig.from_options(**cfg.options()) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # The flat config.json of older versions still loads.
    assert TrainConfig.from_dict(cfg.options()) == cfg


def test_dynaug_strength_and_w_follow_the_papers():
    cfg = TrainConfig.from_options(method="dynacl", dataset="cifar10").resolve()
    assert augmentation_strength(cfg, 1) == 1.0 and augmentation_strength(cfg, 50) == 1.0
    assert augmentation_strength(cfg, 51) == pytest.approx(0.95)
    assert augmentation_strength(cfg, 1000) == pytest.approx(0.05)
    assert augmentation_strength(TrainConfig.from_options(dataset="cifar10").resolve(), 999) == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(method="simclr"), "method must be one of cl, acl, acl-air, dynacl, dynacl-air"),
        (dict(dataset="imagenet"), "dataset must be one of cifar10"),
        (dict(preset="fast"), "preset must be one of demo, paper"),
        (dict(batch_size=1), "batch_size must be an integer >= 2"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(precision="fp16"), "precision must be"),
        # Checked before anything is written (these once failed only at the first step).
        (dict(eps=8), "eps must be in \\(0, 1\\].*8/255"),
        (dict(interpolation="nearest"), "interpolation must be one of bicubic, bilinear"),
        (dict(attack_steps=0), "attack_steps must be an integer >= 1"),
        (dict(eval_eps=8), "eval_eps must be in"),
        (dict(device="gpu"), "device must be"),
    ],
)
def test_bad_config_is_a_clear_error_and_writes_nothing(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(fastacl.FastaclError, match=message):
        fastacl.train(out_dir=str(out), **overrides)
    assert not out.exists()


def test_a_failed_start_leaves_the_out_dir_reusable(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="eps"):
        fastacl.train(out_dir=str(out), eps=8, epochs=1, **TINY)
    assert not out.exists()
    result = fastacl.train(out_dir=str(out), eps=0.1, epochs=1, **TINY)
    assert result.checkpoint.is_file()


def test_missing_data_dir_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        fastacl.train(dataset="cifar10", data_dir=str(tmp_path / "empty"), out_dir=str(out))
    assert not out.exists()


def test_unknown_override_names_the_valid_fields():
    with pytest.raises(TypeError, match="unknown TrainConfig option.*'epoch'"):
        fastacl.train(epoch=3)


def _parameters(path):
    return load_checkpoint(path)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, optimizer):
    common = dict(method="acl-air", epochs=2, seed=3, optimizer=optimizer, **TINY)
    full = fastacl.train(out_dir=str(tmp_path / "full"), **common)

    # Stop after the first step of epoch 2 (as Ctrl-C does), then resume.
    stopped = fastacl.train(out_dir=str(tmp_path / "cut"),
                                  on_step=lambda epoch, step, terms: (epoch, step) == (2, 0),
                                  **common)
    assert stopped.summary == {"interrupted": True}
    state = load_checkpoint(stopped.checkpoint)["extra"]["train_state"]
    assert (state["epoch"], state["step"]) == (2, 1)
    with pytest.raises(FileExistsError, match="already holds a run"):
        fastacl.train(out_dir=str(tmp_path / "cut"), **common)
    resumed = fastacl.train(resume=tmp_path / "cut")

    expected, actual = _parameters(full.checkpoint), _parameters(resumed.checkpoint)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_checkpoint_records_method_branch_and_budget(tmp_path):
    result = fastacl.train(out_dir=str(tmp_path / "run"), epochs=1, **TINY)
    checkpoint = load_checkpoint(result.checkpoint)
    extra = checkpoint["extra"]
    assert extra["method"] == "acl" and extra["encoder_branch"] == "adv"
    assert extra["attack"]["eps"] == pytest.approx(0.15)
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["checkpoint.pt", "config.json", "curves.png", "metrics.jsonl",
                       "summary.json"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    for key in ("total", "natural", "adversarial", "lr", "strength", "w", "images_per_second",
                "epoch_seconds"):
        assert key in record
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["versions"]["torch"] == torch.__version__


def test_cl_baseline_is_single_bn_and_records_the_normal_branch(tmp_path):
    result = fastacl.train(out_dir=str(tmp_path / "run"), method="cl", epochs=1, **TINY)
    extra = load_checkpoint(result.checkpoint)["extra"]
    assert extra["encoder_branch"] == "normal"
    assert not any("adv" in key for key in load_checkpoint(result.checkpoint)["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("fidelity, falling", [("corrected", "total"), ("released", "natural")])
def test_acl_air_loss_falls_over_a_few_epochs(tmp_path, fidelity, falling):
    """The exact form's total falls. The released form's SIR is close to minus the entropy of a
    batch softmax (about -log N), which rises as the embeddings sharpen, so its total need not
    fall in 3 short epochs (measured: 7.504, 7.475, 7.478); its contrastive term does."""
    result = fastacl.train(out_dir=str(tmp_path / "run"), method="acl-air", epochs=3,
                           max_train=512, batch_size=64, attack_steps=2, evaluate=False,
                           fidelity=fidelity)
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    values = [json.loads(line)[falling] for line in lines]
    assert values[-1] < values[0] - 0.1, values
    terms = json.loads(lines[-1])
    assert terms["sir"] != 0 and terms["air"] != 0


@pytest.mark.slow
def test_paper_preset_one_epoch_on_synthetic_cifar10(tmp_path):
    make_cifar10(tmp_path / "data", n=64)
    result = fastacl.train(
        dataset="cifar10", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
        epochs=1, batch_size=32, max_train=64, eval_epochs=1, eval_max_test=8,
    )
    assert result.config.model.name == "resnet18" and result.config.preset == "paper"
    summary = json.loads((result.out_dir / "summary.json").read_text())
    # The closing check ran at the paper's budget, and its figures are the quick check's on
    # the saved encoder (it is deterministic).
    assert summary["attack"] == f"pgd20 linf eps={8 / 255:.4g} step={2 / 255:.4g}"
    model = fastacl.evaluation.load_pretrained(result.checkpoint).model
    again = quick_check(model, dataset="cifar10", data_dir=str(tmp_path / "data"), branch="adv",
                        epochs=1, max_test=8, eps=8 / 255, seed=0)
    assert (again["standard_accuracy"], again["robust_accuracy"]) == (
        summary["standard_accuracy"], summary["robust_accuracy"])


def test_cli_train_rejects_an_unknown_method(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastacl", "train", "--method", "bogus", "--out-dir",
         str(tmp_path / "run")], capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "method must be one of" in result.stderr and "bogus" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_writes_a_resumable_checkpoint(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "fastacl", "train", "--epochs", "50", "--max-train", "32",
         "--batch-size", "16", "--attack-steps", "1", "--no-evaluate", "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopping after this step" in stderr
    state = load_checkpoint(out / "checkpoint.pt")["extra"]["train_state"]
    assert 1 <= state["epoch"] < 50
    resumed = fastacl.train(resume=out, on_step=lambda epoch, step, terms: True)
    assert resumed.summary == {"interrupted": True}


def test_cli_speed_and_selection_flags_reach_the_config(monkeypatch):
    from fastacl.cli import main as cli_main

    seen = {}

    def fake_train(resume=None, **overrides):
        seen.update(overrides)
        raise SystemExit(0)

    monkeypatch.setattr(fastacl, "train", fake_train)
    with pytest.raises(SystemExit):
        cli_main(["train", "--no-fold-bn", "--coreset", "rcs", "--coreset-attack-steps", "1",
                  "--coreset-precision", "bf16", "--attack-precision", "bf16", "--eps", "8/255",
                  "--warmup-epochs", "0"])
    assert seen == {"fold_bn": False, "coreset": "rcs", "coreset_attack_steps": 1,
                    "coreset_precision": "bf16", "attack_precision": "bf16", "eps": 8 / 255,
                    "warmup_epochs": 0}


def test_cli_flags_are_the_config_options():
    from fastacl.cli import build_parser
    from fastacl.config import option_fields

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest for action in train_parser._actions} - {"help", "resume", "dry_run"}
    assert flags == set(option_fields())


def test_resume_fills_fields_an_older_checkpoint_lacks(tmp_path):
    run = fastacl.train(out_dir=str(tmp_path / "run"), method="acl", epochs=1,
                              precision="bf16", **TINY)
    path = run.out_dir / CHECKPOINT_NAME
    checkpoint = torch.load(path, weights_only=True)
    train_state = checkpoint["extra"]["train_state"]
    # The flat config of older versions, written before these options existed.
    config = TrainConfig.from_dict(train_state["config"]).options()
    for name in ("fold_bn", "attack_precision", "coreset_attack_steps", "coreset_precision"):
        del config[name]
    train_state["config"] = config
    torch.save(checkpoint, path)
    cfg, _, _ = state.load_resume(run.out_dir, {})
    # A bf16 run keeps its bf16 attack; the rest takes today's defaults.
    assert (cfg.speed.attack_precision, cfg.speed.fold_bn, cfg.speed.precision) == (
        "bf16", True, "bf16")


def test_model_names_match_the_registry():
    from fastacl.config import MODELS
    from fastacl.models import MODEL_PRESETS

    assert set(MODELS) == set(MODEL_PRESETS)


def test_rcs_imagenet32_preset_resolves_and_runs(tmp_path, capsys):
    """RCS's ImageNet recipe: printed by the dry run on the real file format, then a few steps of
    it (a small model, 2 epochs, its selection path: chunks, softmax-KL, a 1-step attack on U)."""
    from fastacl import cli
    from tests.synthetic import make_imagenet32

    make_imagenet32(tmp_path, n=12)
    args = ["train", "--preset", "rcs-imagenet32", "--dataset", "imagenet32", "--data-dir",
            str(tmp_path), "--dry-run"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["epochs"] == 200
    # The released fidelity (the default) is RCS's ImageNet-32 script (docs/fidelity.md).
    assert printed["model"]["name"] == "wrn-28-10-rcs"
    assert (printed["loss"]["temperature"], printed["optim"]["lr"], printed["loss"]["scale"],
            printed["loss"]["originals_pass"]) == (0.1, 0.6, 0.5, False)
    c = printed["coreset"]
    assert (c["method"], c["fraction"], c["warmup"], c["interval"], c["divergence"],
            c["rd_steps"], c["validation"], c["chunk_batches"]) == (
        "rcs", 0.05, 20, 10, "softmax-kl", 1, 0.005, 100)
    assert cli.main(args + ["--fidelity", "corrected"]) == 0
    corrected = json.loads(capsys.readouterr().out)
    assert corrected["model"]["name"] == "wrn-28-10"
    preset_fields = ("method", "fraction", "warmup", "interval", "divergence", "rd_steps",
                     "validation", "chunk_batches")
    assert [corrected["coreset"][k] for k in preset_fields] == [c[k] for k in preset_fields]
    assert (corrected["loss"]["temperature"], corrected["optim"]["lr"],
            corrected["loss"]["scale"], corrected["loss"]["originals_pass"]) == (0.5, 5.0, 1.0,
                                                                                 False)
    # An explicit option wins over the released script's value.
    assert cli.main(args + ["--temperature", "0.2", "--model", "wrn-28-10"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert (explicit["loss"]["temperature"], explicit["model"]["name"]) == (0.2, "wrn-28-10")
    result = fastacl.train(preset="rcs-imagenet32", dataset="imagenet32", data_dir=str(tmp_path),
                           model="resnet18-small", epochs=2, coreset_warmup=1, batch_size=16,
                           attack_steps=1, coreset_fraction=0.5, coreset_validation=0.1,
                           coreset_chunk_batches=3, evaluate=False,
                           out_dir=str(tmp_path / "run"))
    metrics = (result.out_dir / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in metrics.splitlines()]
    # 6 minibatches of 16 in 2 chunks of 3, each with half of the budget (27 images) floored
    assert lines[1]["coreset_size"] == 32


class _UserEncoder(torch.nn.Module):
    """A user's own encoder: images in [0, 1] -> 12 features, BatchNorm and LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 12, 3, stride=2)
        self.bn = torch.nn.BatchNorm2d(12)
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_train_accepts_a_users_module_and_resumes_with_it(tmp_path):
    encoder = _UserEncoder()
    common = dict(method="acl", epochs=2, **TINY)
    stopped = fastacl.train(model=encoder, out_dir=str(tmp_path / "run"),
                            on_step=lambda epoch, step, terms: (epoch, step) == (2, 0), **common)
    assert stopped.summary == {"interrupted": True}
    checkpoint = load_checkpoint(stopped.checkpoint)
    assert checkpoint["model_spec"] is None  # evaluate says how to rebuild a user module
    assert any(".adv." in key for key in checkpoint["state_dict"])  # its norms made dual
    with pytest.raises(ValueError, match="pass it"):
        fastacl.train(resume=tmp_path / "run")
    resumed = fastacl.train(resume=tmp_path / "run", model=encoder)
    assert resumed.checkpoint.is_file() and "interrupted" not in resumed.summary


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_training_a_layer_norm_model_with_lars_warns(tmp_path, capsys, optimizer):
    fastacl.train(model=_UserEncoder(), out_dir=str(tmp_path / "run"), optimizer=optimizer,
                  method="cl", epochs=1, **TINY)
    warned = "LARS collapses transformers" in capsys.readouterr().err
    assert warned == (optimizer == "lars")
