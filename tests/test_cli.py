import json
import subprocess
import sys


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "fastacl", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: fastacl" in out and "info" in out


def test_info_reports_extension_state():
    out = subprocess.run(
        [sys.executable, "-m", "fastacl", "info"], capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out)
    assert info["extension"]["state"] in ("built", "jit")
    assert info["torch"]


def test_bench_outside_a_source_checkout_says_what_it_needs(monkeypatch, tmp_path, capsys):
    """An installed (non-editable) package has no benchmarks/ beside it: a clear error."""
    from fastacl import cli

    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path / "site-packages" / "benchmarks")
    assert cli.main(["bench", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "bench_train_step.py" in err and "pip install" in err


def test_only_fastacl_errors_are_clean_exits(monkeypatch):
    """Bad input is one sentence and exit 2; a bug (any other exception) keeps its traceback."""
    import pytest

    import fastacl
    from fastacl import cli
    from fastacl.errors import ConfigError

    def bad_input(**options):
        raise ConfigError("eps must be in (0, 1]")

    def bug(**options):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(fastacl, "train", bad_input)
    assert cli.main(["train"]) == 2
    monkeypatch.setattr(fastacl, "train", bug)
    with pytest.raises(ValueError, match="internal inconsistency"):
        cli.main(["train"])


def test_train_accepts_a_fraction_for_every_float_option(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastacl", "train", "--eps", "8", "--out-dir",
         str(tmp_path / "run")], capture_output=True, text=True,
    )
    assert result.returncode == 2 and "did you mean 8/255" in result.stderr
    assert not (tmp_path / "run").exists()
    result = subprocess.run(
        [sys.executable, "-m", "fastacl", "train", "--eps", "8/2x55"], capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "a fraction like 8/255" in result.stderr


def test_debug_shows_the_traceback_of_a_one_sentence_error(tmp_path):
    argv = [sys.executable, "-m", "fastacl", "train", "--eps", "8", "--out-dir",
            str(tmp_path / "run")]
    plain = subprocess.run(argv, capture_output=True, text=True)
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_progress_off_a_terminal_is_a_line_every_interval(capsys, monkeypatch):
    """nohup, a log file, a cluster job: no bar, a plain line at a steady interval."""
    import time

    from fastacl.utils import progress

    clock = iter([0.0, 0.0, 10.0, 31.0, 45.0, 50.0, 70.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress(6, "epoch 1/5", initial=1, interval=30.0)
    for _ in range(5):
        bar.set_postfix(loss="1.0")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # A line at t = 31 (30 s after the start; a resumed epoch starts at step 1), none at 45 or
    # 50 (under 30 s later), and the last state at close.
    assert len(lines) == 2, lines
    assert lines[0].startswith("fastacl: epoch 1/5: 4/6 steps") and "loss=1.0" in lines[0]
    assert "ETA" in lines[0] and lines[1].startswith("fastacl: epoch 1/5: 6/6 steps")
