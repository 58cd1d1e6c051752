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
