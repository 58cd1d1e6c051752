"""Loading the C++/CUDA extension fastacl._C, and saying which way it was loaded.

Order: (1) the binary built at install (`pip install --no-build-isolation -e .`); (2) compiled on
first use from csrc/ with torch.utils.cpp_extension.load (ninja) into a cache directory; (3) when
neither works, one clear warning and the pure-PyTorch reference. `extension_status()` always says
which of the three happened, so the extension is never silently missing.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from pathlib import Path

import torch

# Must equal kAbiVersion in csrc/fastacl.cpp: a stale binary is rebuilt rather than trusted.
ABI_VERSION = 2

_status: dict = {}


def _csrc_dir() -> Path | None:
    # A source checkout (editable install) has csrc/ beside the package.
    candidate = Path(__file__).resolve().parents[2] / "csrc"
    return candidate if candidate.is_dir() else None


def _cache_dir() -> Path:
    root = os.environ.get("FASTACL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastacl"
    )
    tag = f"torch{torch.__version__.replace('+', '_')}-abi{ABI_VERSION}"
    path = Path(root) / "extension" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _abi_matches() -> bool:
    try:
        return int(torch.ops.fastacl.abi_version()) == ABI_VERSION
    except (AttributeError, RuntimeError):
        return False


def _load_built() -> str | None:
    try:
        from fastacl import _C
    except ImportError as err:
        return f"no installed binary ({err})"
    if not _abi_matches():
        return f"installed binary {_C.__file__} is stale (abi != {ABI_VERSION}); reinstall"
    _status.update(state="built", detail=f"installed binary {_C.__file__}", path=_C.__file__)
    return None


def _load_jit() -> str | None:
    if os.environ.get("FASTACL_NO_JIT") == "1":
        return "JIT compilation disabled by FASTACL_NO_JIT=1"
    csrc = _csrc_dir()
    if csrc is None:
        return "csrc/ sources not found next to the package"
    sources = sorted(glob.glob(str(csrc / "*.cpp")))
    try:
        from torch.utils.cpp_extension import CUDA_HOME, load

        # The CUDA kernels and their glue only against a CUDA torch (see setup.py).
        if torch.version.cuda and CUDA_HOME and os.environ.get("FASTACL_NO_CUDA") != "1":
            sources += sorted(glob.glob(str(csrc / "cuda" / "*.cpp")))
            sources += sorted(glob.glob(str(csrc / "cuda" / "*.cu")))
        load(
            name="fastacl_jit",
            sources=sources,
            build_directory=str(_cache_dir()),
            extra_cflags=["-O3", "-std=c++17", "-fopenmp"],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # a missing compiler or ninja surfaces as many exception types
        return f"JIT compilation failed: {type(err).__name__}: {str(err).strip()[:300]}"
    if not _abi_matches():
        return "JIT-compiled library does not report the expected abi_version"
    _status.update(state="jit", detail=f"compiled on first use into {_cache_dir()}",
                   path=str(_cache_dir()))
    return None


@functools.cache
def _load() -> None:
    reasons = []
    for loader in (_load_built, _load_jit):
        reason = loader()
        if reason is None:
            return
        reasons.append(reason)
    detail = "; ".join(reasons)
    _status.update(state="unavailable", detail=detail, path=None)
    warnings.warn(
        "fastacl: the C++ extension fastacl._C is unavailable, the RCS ops use the PyTorch "
        f"reference (slower). Why: {detail}",
        RuntimeWarning,
        stacklevel=3,
    )


def extension_available() -> bool:
    _load()
    return _status["state"] != "unavailable"


def extension_status() -> dict:
    """How the C++ extension was loaded: {"state": "built"|"jit"|"unavailable", "detail", "path"}.

    The first call loads it (and may compile it, which takes a minute).
    """
    _load()
    return dict(_status)
