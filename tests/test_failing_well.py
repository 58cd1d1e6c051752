"""Failing well: crashes, full or read-only disks and bad starts of `fastacl train`.

- SIGKILL at several points of a short run (before the first checkpoint, in the middle of an
  epoch, while a checkpoint is being written, between an epoch's metrics line and its
  checkpoint, and at a step drawn at random with a fixed seed), then resume: the parameters are
  bit-identical to an uninterrupted run's, metrics.jsonl has each epoch once, and no temporary
  file is left.
- ENOSPC and EROFS injected at every file the run writes (config.json, metrics.jsonl,
  checkpoint.pt, summary.json, curves.png, and `fastacl evaluate --json`): one sentence, exit
  code 2, and the previous checkpoint intact.
- Bad starts: each case in BAD_STARTS through the command, asserting the exit code and that the
  message names the problem, and that the out dir is left usable.

`python -m tests.test_failing_well` runs the bad-start and disk cases and prints the table of
docs/failing-well.md (command, what happened before, what happens now).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastacl
from fastacl.cli import main as cli_main
from fastacl.models import load_checkpoint

# 40 demo images (32 after the validation hold-out), 2 steps an epoch, 3 epochs, 1 PGD step.
RUN = dict(method="acl-air", epochs=3, seed=3, max_train=40, batch_size=16, attack_steps=1,
           evaluate=False)
RUN_ARGS = ["--method", "acl-air", "--epochs", "3", "--seed", "3", "--max-train", "40",
            "--batch-size", "16", "--attack-steps", "1", "--no-evaluate"]
STEPS_PER_EPOCH = 2
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    result = fastacl.train(out_dir=str(tmp_path_factory.mktemp("full") / "run"), **RUN)
    return load_checkpoint(result.checkpoint)["state_dict"]


# ---- SIGKILL, then resume ----------------------------------------------------------------------

def _child(mode: str, out: str, kill_at: str) -> None:
    """Runs in a subprocess: a RUN that kills itself (SIGKILL: no handler, no cleanup) at a
    point given by `mode`."""
    from fastacl.pretrain import state

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    on_step = None
    if mode == "step":  # after the given (epoch, step) has been applied
        epoch, step = map(int, kill_at.split(","))
        on_step = lambda e, s, terms: (e, s) == (epoch, step) and die()  # noqa: E731
    elif mode == "checkpoint-write":  # half-way through writing the checkpoint after epoch 2
        real_save = torch.save

        def save(obj, file, *args, **kwargs):
            if obj.get("extra", {}).get("train_state", {}).get("epoch") == 3:
                file.write(b"PK\x03\x04 half a checkpoint")
                file.flush()
                die()
            return real_save(obj, file, *args, **kwargs)

        torch.save = save
    elif mode == "after-metrics":  # epoch 2's metrics line is written, its checkpoint is not
        real_write = state.write_checkpoint

        def write_checkpoint(out_dir, model, cfg, train_state):
            if train_state["epoch"] == 3 and train_state["step"] == 0:
                die()
            return real_write(out_dir, model, cfg, train_state)

        state.write_checkpoint = write_checkpoint
    fastacl.train(out_dir=out, on_step=on_step, **RUN)


def _random_step() -> str:
    """A step drawn at random (fixed seed, so the test is reproducible), as "epoch,step"."""
    index = random.Random(19).randrange(RUN["epochs"] * STEPS_PER_EPOCH)
    return f"{index // STEPS_PER_EPOCH + 1},{index % STEPS_PER_EPOCH}"


KILLS = {
    "before the first checkpoint": ("step", "1,0"),
    "mid-epoch": ("step", "2,0"),
    "during a checkpoint write": ("checkpoint-write", ""),
    "between an epoch's metrics line and its checkpoint": ("after-metrics", ""),
    f"at a random step ({_random_step()})": ("step", _random_step()),
}


def _kill_and_resume(where: str, out: Path) -> dict:
    """Kill a run at `where`, then continue it (resume, or a new start where no checkpoint was
    written). Returns what the test checks and the docs table shows."""
    mode, kill_at = KILLS[where]
    child = subprocess.run(
        [sys.executable, "-m", "tests.test_failing_well", "--child", mode, str(out), kill_at],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    had_checkpoint = (out / "checkpoint.pt").exists()
    resume_refused = None
    if not had_checkpoint:  # nothing to resume: the dir holds no run, and a new start may use it
        try:
            fastacl.train(resume=out)
        except fastacl.FastaclError as err:
            resume_refused = str(err)
    result = fastacl.train(out_dir=str(out), **RUN) if not had_checkpoint else (
        fastacl.train(resume=out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"child": child, "had_checkpoint": had_checkpoint, "resume_refused": resume_refused,
            "parameters": load_checkpoint(result.checkpoint)["state_dict"], "records": records,
            "temporary": [p.name for p in out.iterdir() if p.name.endswith(".tmp")]}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILLS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(where, tmp_path, uninterrupted):
    run = _kill_and_resume(where, tmp_path / "run")
    assert run["child"].returncode == -signal.SIGKILL, run["child"].stderr[-2000:]
    if not run["had_checkpoint"]:
        assert "holds no checkpoint.pt" in run["resume_refused"]
    assert run["parameters"].keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(run["parameters"][key], uninterrupted[key]), key
    assert [r["epoch"] for r in run["records"]] == [1, 2, 3]
    assert all(r["epoch_seconds"] > 0 and r["images_per_second"] > 0 for r in run["records"])
    assert run["temporary"] == []


def test_an_interrupted_epoch_logs_the_seconds_before_the_interruption(tmp_path):
    out = tmp_path / "run"
    fastacl.train(out_dir=str(out), on_step=lambda e, s, t: (e, s) == (1, 0), **RUN)
    before = load_checkpoint(out / "checkpoint.pt")["extra"]["train_state"]["epoch_seconds"]
    assert before > 0
    fastacl.train(resume=out, on_step=lambda e, s, t: e == 2)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 1 and first["epoch_seconds"] > before


# ---- full and read-only disks ------------------------------------------------------------------

def _inject(monkeypatch, name: str, code: int) -> None:
    """Opening any file whose name is `name` or one of its temporaries (.name.*, name.tmp*)
    for writing fails with `code`, as on a full or read-only file system."""
    def hit(path) -> bool:
        base = os.path.basename(os.fsdecode(path)) if isinstance(path, (str, bytes, Path)) else ""
        return base == name or base.startswith(f".{name}.") or base.startswith(f"{name}.tmp")

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if hit(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if hit(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)


# file -> (the command's extra arguments, the run's state before the failing write)
DISK_CASES = {
    "config.json": (["--epochs", "1"], "no run yet"),
    "metrics.jsonl": ([], "the checkpoint after epoch 1"),
    "checkpoint.pt": ([], "the checkpoint after epoch 1"),
    "summary.json": ([], "the checkpoint after epoch 3"),
    "curves.png": ([], "the checkpoint after epoch 3"),
}


def _disk_case(name: str, code: int, out: Path) -> tuple[int, str]:
    """Run the command with writes of `name` failing (after the first epoch for the per-epoch
    files); returns (exit code, stderr)."""
    extra, _ = DISK_CASES[name]
    argv = ["train", *RUN_ARGS, "--out-dir", str(out), *extra]
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        if name in ("metrics.jsonl", "checkpoint.pt"):
            # Let epoch 1 finish and write its checkpoint, then fail the next write of `name`.
            real_train = fastacl.train

            def train_then_fail(**options):
                def on_step(epoch, step, terms):
                    if (epoch, step) == (2, 0):
                        _inject(monkeypatch, name, code)
                    return False
                return real_train(on_step=on_step, **options)

            monkeypatch.setattr(fastacl, "train", train_then_fail)
        else:
            _inject(monkeypatch, name, code)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(argv)
    return status, stderr.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("name", list(DISK_CASES))
def test_a_failed_write_is_one_sentence_and_keeps_the_last_checkpoint(name, code, tmp_path):
    out = tmp_path / "run"
    status, err = _disk_case(name, code, out)
    assert status == 2, err
    assert "Traceback" not in err and f"run/{name}:" in err  # the file, not its temporary
    assert ("read-only" if code == errno.EROFS else "no space left") in err
    assert not [p.name for p in out.glob("*.tmp")] if out.exists() else True
    if name == "config.json":
        assert not (out / "checkpoint.pt").exists()
        return
    state = load_checkpoint(out / "checkpoint.pt")["extra"]["train_state"]  # loads: intact
    assert state["epoch"] == (2 if name in ("metrics.jsonl", "checkpoint.pt") else 4)


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_a_failed_evaluation_json_is_one_sentence(code, tmp_path):
    run = fastacl.train(out_dir=str(tmp_path / "run"), **{**RUN, "epochs": 1})
    status, err = _evaluation_json_case(run.checkpoint, tmp_path / "eval.json", code)
    assert status == 2 and "eval.json:" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*eval.json*"))


def _evaluation_json_case(checkpoint: Path, path: Path, code: int) -> tuple[int, str]:
    """`fastacl evaluate --json path` with the write of `path` failing; (exit code, stderr)."""
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _inject(monkeypatch, path.name, code)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(["evaluate", "--checkpoint", str(checkpoint), "--modes", "slf",
                               "--attacks", "pgd20", "--epochs", "1", "--max-test", "8",
                               "--max-train", "64", "--json", str(path)])
    return status, stderr.getvalue()


# ---- bad starts --------------------------------------------------------------------------------

# (case, argv after `fastacl`, expected exit code, fragment of the message, what it did before)
BAD_STARTS = [
    ("eps in pixel units", ["train", "--eps", "8"], 2, "did you mean 8/255",
     "exit 2 at the first step, after config.json was written (a rerun refused the dir)"),
    ("unknown interpolation", ["train", "--interpolation", "nearest"], 2,
     "interpolation must be one of bicubic, bilinear",
     "exit 2 at the first step, after config.json was written (a rerun refused the dir)"),
    ("no attack for an adversarial method", ["train", "--attack-steps", "0"], 2,
     "attack_steps must be an integer >= 1", "trained 'acl' without an attack, silently"),
    ("closing-check budget in pixel units", ["train", "--eval-eps", "8"], 2,
     "eval_eps must be in (0, 1]", "failed after the whole pre-training"),
    ("CUDA without a GPU", ["train", "--device", "cuda"], 2, "sees no CUDA device",
     "AssertionError traceback"),
    ("resume of a dir that does not exist", ["train", "--resume", "{tmp}/nowhere"], 2,
     "there is no run dir", "exit 2: '<dir>/checkpoint.pt does not exist (is <dir> a run dir?)'"),
    ("out dir is a file", ["train", "--out-dir", "{tmp}/a-file"], 2, "is a file",
     "exit 2: '[Errno 17] File exists'"),
]


def _bad_start(argv: list[str], tmp: Path, capsys) -> tuple[int, str]:
    (tmp / "a-file").write_text("not a dir")
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    if argv[0] == "train" and "--out-dir" not in argv and "--resume" not in argv:
        argv += ["--out-dir", str(tmp / "run")]
    capsys.readouterr()
    status = cli_main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case, argv, code, fragment, before", BAD_STARTS,
                         ids=[c[0] for c in BAD_STARTS])
def test_a_bad_start_is_one_sentence_and_leaves_the_dir_usable(case, argv, code, fragment,
                                                               before, tmp_path, capsys):
    status, err = _bad_start(argv, tmp_path, capsys)
    assert status == code, err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # validated before anything was written


def test_a_failed_start_can_be_started_again_and_resume_says_why_not(tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text("{}")  # a start killed before its first checkpoint
    status, err = _bad_start(["train", "--resume", str(out)], tmp_path, capsys)
    assert status == 2 and "holds no checkpoint.pt" in err and f"--out-dir {out}" in err
    result = fastacl.train(out_dir=str(out), **{**RUN, "epochs": 1})
    assert result.checkpoint.is_file()
    assert json.loads((out / "config.json").read_text())["config"]["method"] == "acl-air"


def test_a_corrupt_test_split_fails_before_training(tmp_path, capsys):
    from tests.synthetic import make_cifar10

    folder, _ = make_cifar10(tmp_path / "data", n=32)
    test_batch = folder / "test_batch"
    test_batch.write_bytes(test_batch.read_bytes()[:100])  # truncated
    status, err = _bad_start(["train", "--dataset", "cifar10", "--data-dir",
                              str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16"],
                             tmp_path, capsys)
    assert status == 2 and "test_batch" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_string_budget_from_python_is_a_clear_error(tmp_path):
    with pytest.raises(fastacl.FastaclError, match="got the string '8/255'"):
        fastacl.train(eps="8/255", out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---- the docs table ----------------------------------------------------------------------------

def _table() -> str:
    """docs/failing-well.md's tables, from running every case (about three minutes)."""
    import tempfile

    def cell(text: str, tmp: str) -> str:
        return " ".join(text.strip().replace(tmp, "<tmp>").replace("|", "\\|").split())

    rows = ["## Bad starts", "", "| case | command | before | now: exit code and message |",
            "|---|---|---|---|"]
    for case, argv, _, _, before in BAD_STARTS:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "a-file").write_text("not a dir")
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                status = cli_main([a.replace("{tmp}", tmp) for a in argv])
            command = "fastacl " + " ".join(argv).replace("{tmp}", "<tmp>")
            rows.append(f"| {case} | `{command}` | {before} | {status}: "
                        f"{cell(stderr.getvalue(), tmp)} |")
    rows += ["", "## Full and read-only disks", "",
             "| file that cannot be written | error | before | now: exit code and message | "
             "checkpoint after |", "|---|---|---|---|---|"]
    for name, (_, state_before) in DISK_CASES.items():
        for code in (errno.ENOSPC, errno.EROFS):
            with tempfile.TemporaryDirectory() as tmp:
                status, err = _disk_case(name, code, Path(tmp) / "run")
                checkpoint = Path(tmp) / "run" / "checkpoint.pt"
                after = "none"
                if checkpoint.exists():
                    saved = load_checkpoint(checkpoint)["extra"]["train_state"]
                    after = f"loads, next epoch {saved['epoch']}"
                rows.append(f"| {name} | {errno.errorcode[code]} | OSError traceback | "
                            f"{status}: {cell(err, tmp)} | {after} ({state_before}) |")
    with tempfile.TemporaryDirectory() as tmp:
        run = fastacl.train(out_dir=str(Path(tmp) / "run"), **{**RUN, "epochs": 1})
        for code in (errno.ENOSPC, errno.EROFS):
            status, err = _evaluation_json_case(run.checkpoint, Path(tmp) / "eval.json", code)
            rows.append(f"| eval.json (`fastacl evaluate --json`) | {errno.errorcode[code]} | "
                        f"OSError traceback | {status}: {cell(err, tmp)} | (not touched) |")
    rows += ["", "## SIGKILL, then continue", "",
             "| killed | then | parameters vs an uninterrupted run | metrics.jsonl epochs | "
             "temporary files left |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        reference = fastacl.train(out_dir=str(Path(tmp) / "full"), **RUN)
        expected = load_checkpoint(reference.checkpoint)["state_dict"]
        for index, where in enumerate(KILLS):
            run = _kill_and_resume(where, Path(tmp) / f"run{index}")
            same = all(torch.equal(run["parameters"][k], expected[k]) for k in expected)
            then = ("`--resume`" if run["had_checkpoint"] else
                    f"`--resume` refused (\"{cell(run['resume_refused'], tmp)}\"), new start")
            rows.append(f"| {where} | {then} | {'bit-identical' if same else 'DIFFERENT'} | "
                        f"{[r['epoch'] for r in run['records']]} | "
                        f"{len(run['temporary'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:5])
    else:  # the runs' own output would interleave with the table
        with contextlib.redirect_stdout(io.StringIO()):
            table = _table()
        print(table)
