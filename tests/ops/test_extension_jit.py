"""The first-use compilation path and the no-compiler fallback, each in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["fastacl._C"] = None  # hide the installed binary: forces the next loader
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from fastacl.ops import extension_status
        status = extension_status()
        extension_status()
    print(status["state"])
    print(sum("C++ extension" in str(w.message) for w in caught))
    """
)


def _run(env_extra):
    env = {**os.environ, **env_extra}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_no_compiler_falls_back_with_one_warning():
    state, warnings_seen = _run({"FASTACL_NO_JIT": "1"})
    assert state == "unavailable"
    assert warnings_seen == "1"


@pytest.mark.slow
def test_jit_compiles_on_first_use(tmp_path):
    state, warnings_seen = _run({"FASTACL_CACHE_DIR": str(tmp_path)})
    assert state == "jit"
    assert warnings_seen == "0"
