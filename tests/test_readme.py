"""Every command in README.md is one the code accepts: `fastacl train` lines resolve and
validate their config (--dry-run: nothing is read or written), `fastacl evaluate` and `torchrun`
lines parse, and `fastacl bench` flags exist. The demo itself (`fastacl train`) runs in
tests/test_train.py at a smaller size; CI runs the set-up and test commands."""

import re
import shlex
from pathlib import Path

import pytest

from fastacl.cli import build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def _fastacl_argv(line: str) -> list[str] | None:
    words = shlex.split(line)
    if words[0] == "fastacl":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("fastacl") + 1:]
    return None


def test_readme_has_the_commands_ci_runs():
    commands = _commands()
    assert any(c.startswith("pip install") for c in commands)
    assert 'python -m pytest -m "not gpu"' in commands
    assert "fastacl train" in commands  # the main job: the demo, with no arguments


@pytest.mark.parametrize("line", [c for c in _commands() if _fastacl_argv(c) is not None])
def test_readme_command_is_accepted(line, capsys):
    argv = _fastacl_argv(line)
    if argv[0] == "train" and "--help" in argv:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    elif argv[0] == "train" and "--resume" not in argv:
        assert main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    elif argv[0] == "bench":
        from benchmarks.bench_train_step import parse_args

        parse_args(argv[1:])
    else:  # evaluate, and train --resume: the arguments parse (the files are the user's)
        build_parser().parse_args(argv)
