"""`fastacl evaluate` on inputs a user can get wrong: each is one sentence and exit code 2.

The cases are one table: (case, command, what it did before the fix, expected exit code, a
fragment of the expected message). pytest runs each through fastacl.cli.main, with fine-tuning
made to fail loudly, so every failing case is shown to fail before any fine-tuning starts.
Run as a script, the module runs the same table for real and prints it as markdown with the
message each case gave (the docs' table is this output, not typed):

    python -m tests.evaluation.test_bad_inputs
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from fastacl.cli import main
from fastacl.models import export_published_state_dict, save_checkpoint
from tests.evaluation.test_corruptions import write_corruptions
from tests.evaluation.tiny import EPS, tiny_model
from tests.synthetic import make_cifar10

README = Path(__file__).resolve().parents[2] / "README.md"
# A short successful run: one mode, one epoch, PGD-20 on 8 test images.
QUICK = ("--modes", "slf", "--attacks", "pgd20", "--epochs", "1", "--max-test", "8")


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # after `fastacl evaluate`; paths relative to the inputs' folder
    before: str  # what `fastacl evaluate` did before this fix
    exit: int
    message: str  # a fragment of stderr (exit 2) or of stdout (exit 0)
    no_cuda: bool = False  # run as on a machine where torch sees no CUDA device


def _checkpoint(path: str, *rest: str) -> tuple[str, ...]:
    return ("--checkpoint", path, "--data-dir", "data", *rest)


CASES = [
    # -- the checkpoint
    Case("text file", _checkpoint("notes.txt"),
         "IndexError traceback (pop from empty list)", 2,
         "notes.txt is not a fastacl or published checkpoint: torch.load cannot read a text "
         "file (truncated, or another kind of file)"),
    Case("truncated checkpoint", _checkpoint("truncated.pt"),
         "RuntimeError traceback (miniz: failed finding central directory)", 2,
         "truncated.pt is not a fastacl or published checkpoint: torch.load cannot read a zip "
         "archive that ends early"),
    Case("README.md", _checkpoint("README.md"),
         "UnpicklingError traceback advising weights_only=False", 2,
         "README.md is not a fastacl or published checkpoint: torch.load cannot read a text file"),
    Case("a pickle of other objects", _checkpoint("objects.pt"),
         "UnpicklingError traceback advising weights_only=False", 2,
         "objects.pt is not a fastacl or published checkpoint: it holds a datetime.date"),
    Case("a bare state dict", _checkpoint("state_dict.pt"),
         "CheckpointError traceback (not a fastacl checkpoint)", 2,
         "state_dict.pt is not a fastacl or published checkpoint: it holds a dict"),
    Case("run dir holding checkpoint.pt", _checkpoint("run", *QUICK),
         "exit 2: checkpoint run does not exist", 0, "fastacl: slf: standard"),
    Case("dir without checkpoint.pt", _checkpoint("empty_run"),
         "exit 2: checkpoint empty_run does not exist", 2,
         "empty_run is a directory without a checkpoint.pt"),
    Case("missing file", _checkpoint("nothing.pt"),
         "exit 2: checkpoint nothing.pt does not exist", 2, "checkpoint nothing.pt does not exist"),
    Case("a key missing from the state dict", _checkpoint("missing_key.pt"),
         "StateDictMismatchError traceback", 2,
         "missing_key.pt: state dict does not match the model (loading is strict)"),
    Case("1-channel model on CIFAR-10", _checkpoint("one_channel.pt", "--dataset", "cifar10"),
         "ValueError traceback in the first mode (expected images of shape [N, 1, H, W])", 2,
         "one_channel.pt holds a model for 1-channel images, but cifar10's have 3"),
    Case("published checkpoint, no --dataset", _checkpoint("published.pt"),
         "exit 2, the same message", 2, "pass dataset="),
    # -- the device
    Case("--device cuda without CUDA", _checkpoint("ckpt.pt", "--device", "cuda"),
         "AssertionError traceback (Torch not compiled with CUDA enabled)", 2,
         "device cuda was asked for but torch sees no CUDA device; use --device cpu or auto",
         no_cuda=True),
    Case("--device gpu", _checkpoint("ckpt.pt", "--device", "gpu"),
         "RuntimeError traceback (Expected one of cpu, cuda, ... device type)", 2,
         "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    # -- the options
    Case("--eps 8", _checkpoint("ckpt.pt", "--eps", "8"),
         "exit 2, the same message (after loading the checkpoint)", 2, "did you mean 8/255?"),
    Case("--epochs 0", _checkpoint("ckpt.pt", "--epochs", "0"),
         "exit 2, the same message (after loading the data)", 2, "epochs must be >= 1, got 0"),
    Case("--max-train 0", _checkpoint("ckpt.pt", "--max-train", "0"),
         "exit 2: a subset needs at least 1 image, got 0 (after loading the data)", 2,
         "max_train must be >= 1, got 0"),
    Case("--max-test 0", _checkpoint("ckpt.pt", "--max-test", "0"),
         "exit 2, the same message", 2, "max_test must be >= 1, got 0"),
    Case("--batch-size 0", _checkpoint("ckpt.pt", "--batch-size", "0"),
         "exit 2, the same message", 2, "batch_size must be >= 1, got 0"),
    Case("--modes slf,xyz", _checkpoint("ckpt.pt", "--modes", "slf,xyz"),
         "exit 2, the same message", 2, "mode must be one of slf, alf, aff, got 'xyz'"),
    Case("--attacks fgsm", _checkpoint("ckpt.pt", "--attacks", "fgsm"),
         "exit 2, the same message", 2, "attack must be one of pgd20, autoattack, got 'fgsm'"),
    Case("--dataset imagenet", _checkpoint("ckpt.pt", "--dataset", "imagenet"),
         "exit 2, the same message (after loading the checkpoint)", 2,
         "got 'imagenet'"),
    Case("--preset fast", _checkpoint("ckpt.pt", "--preset", "fast"),
         "exit 2, the same message (after loading the checkpoint)", 2,
         "preset must be one of demo, paper, got 'fast'"),
    Case("--method acl-ari", _checkpoint("ckpt.pt", "--method", "acl-ari"),
         "ran the whole evaluation with ACL's hyper-parameters (said only in the JSON)", 2,
         "method must be one of cl, acl, acl-air, dynacl, dynacl-air, got 'acl-ari'"),
    Case("--autoattack-version fast", _checkpoint("ckpt.pt", "--autoattack-version", "fast"),
         "TypeError traceback ('NoneType' object is not iterable) after fine-tuning the first "
         "mode", 2,
         "autoattack_version must be one of standard, plus, rand, custom, got 'fast'"),
    Case("--autoattack-attacks apgd", _checkpoint(
        "ckpt.pt", "--autoattack-version", "custom", "--autoattack-attacks", "apgd"),
         "ValueError traceback (Attack not supported) after fine-tuning the first mode", 2,
         "autoattack attack must be one of apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square, "
         "got 'apgd'"),
    # -- the data
    Case("corrupt test split", ("--checkpoint", "ckpt.pt", "--data-dir", "bad_test"),
         "exit 2, the same message (after reading the training split)", 2,
         "test_batch is not a readable CIFAR python batch"),
    Case("missing test split", ("--checkpoint", "ckpt.pt", "--data-dir", "no_test"),
         "exit 2, the same message (after reading the training split)", 2,
         "CIFAR-10: missing test_batch"),
    Case("--corruptions on, no CIFAR-10-C", _checkpoint("ckpt.pt", "--corruptions", "on"),
         "exit 2, the same message", 2, "no CIFAR-10-C folder with labels.npy was found"),
    Case("a bad CIFAR-10-C file", ("--checkpoint", "ckpt.pt", "--data-dir", "bad_corruptions"),
         "exit 2, the same message, after fine-tuning the first mode", 2,
         "fog.npy: expected uint8 [80, H, W, C], got float32"),
]


def make_inputs(root: Path) -> None:
    """Every file the cases name, under `root`: synthetic CIFAR-10 and tiny checkpoints."""
    make_cifar10(root / "data", n=16)
    attack = {"norm": "linf", "eps": EPS, "step_size": 2 / 255, "steps": 5}
    good = save_checkpoint(root / "ckpt.pt", tiny_model(), method="acl", encoder_branch="adv",
                           attack=attack, dataset="cifar10")
    (root / "run").mkdir()
    shutil.copy(good, root / "run" / "checkpoint.pt")
    (root / "empty_run").mkdir()
    (root / "notes.txt").write_text("epoch 1: loss 4.2\n")
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    shutil.copy(README, root / "README.md")
    import datetime

    torch.save({"made": datetime.date(2024, 1, 1)}, root / "objects.pt")
    torch.save(tiny_model().state_dict(), root / "state_dict.pt")
    checkpoint = torch.load(good, weights_only=True)
    del checkpoint["state_dict"]["backbone.layer2.0.shortcut.bn.adv.running_var"]
    torch.save(checkpoint, root / "missing_key.pt")
    save_checkpoint(root / "one_channel.pt", tiny_model(in_channels=1), method="acl",
                    attack=attack, dataset="mnist5k")
    torch.save({"state_dict": export_published_state_dict(tiny_model().state_dict())},
               root / "published.pt")
    for name in ("bad_test", "no_test", "bad_corruptions"):
        shutil.copytree(root / "data", root / name)
    (root / "bad_test" / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    (root / "no_test" / "cifar-10-batches-py" / "test_batch").unlink()
    folder = root / "bad_corruptions" / "CIFAR-10-C"
    write_corruptions(folder, n=16, classes=10)
    np.save(folder / "fog.npy", np.zeros((80, 32, 32, 3), dtype=np.float32))


def run_case(case: Case) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fastacl evaluate` + the case's arguments, in the cwd."""
    out, err = io.StringIO(), io.StringIO()
    no_cuda = (mock.patch("torch.cuda.is_available", return_value=False) if case.no_cuda
               else contextlib.nullcontext())
    with no_cuda, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", *case.argv])
    return code, out.getvalue(), err.getvalue()


def shown_message(code: int, case: Case, stdout: str, stderr: str) -> str:
    """What the table shows: the error, all its lines (exit 2), else the line with the fragment."""
    if code:
        error = stderr[stderr.find("fastacl: error:"):] if "fastacl: error:" in stderr else stderr
        return " ".join(line.strip() for line in error.splitlines())
    return next((line for line in stdout.splitlines() if case.message in line), "")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    make_inputs(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, inputs, monkeypatch, capsys):
    monkeypatch.chdir(inputs)
    if case.exit:  # every failing case fails before any fine-tuning starts
        def no_fine_tuning(*args, **kwargs):
            raise AssertionError(f"{case.name}: fine-tuning started before the error")

        monkeypatch.setattr("fastacl.evaluation.driver.finetune", no_fine_tuning)
    if case.no_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["evaluate", *case.argv])
    captured = capsys.readouterr()
    assert code == case.exit, captured.err
    if case.exit:
        assert captured.err.startswith("fastacl: error: ")
        assert case.message in captured.err
        assert "weights_only=False" not in captured.err  # torch's advice is never passed on
    else:
        assert case.message in captured.out


def markdown_table() -> str:
    """The table, from a real run of every case in a temporary folder."""
    rows = ["| case | command | before | exit | message |", "|---|---|---|---|---|"]
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        make_inputs(Path(folder))
        os.chdir(folder)
        try:
            for case in CASES:
                code, stdout, stderr = run_case(case)
                command = " ".join(["fastacl", "evaluate", *case.argv])
                cells = [case.name, f"`{command}`", case.before, str(code),
                         shown_message(code, case, stdout, stderr)]
                rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        finally:
            os.chdir(here)
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(markdown_table())
    sys.exit(0)
