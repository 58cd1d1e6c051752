"""The CUDA sources compile: `nvcc -c` on every csrc/**/*.cu (CI has nvcc but, like this machine,
maybe no GPU and a CPU-only torch, so the .cu files include nothing from torch; docs/design.md).
The glue that registers the CUDA dispatch key needs a CUDA torch and is built only there."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
# Ampere and Hopper (bf16 arithmetic, the GPUs fastacl targets) plus nvcc's default target.
GENCODE_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def test_cuda_sources_exist_and_cpu_builds_leave_them_out():
    assert CUDA_SOURCES, "no .cu files under csrc/"
    # setup.py and the JIT loader compile csrc/*.cpp on a CPU torch: the glue must not be there.
    assert not any("cuda" in path.name for path in CSRC.glob("*.cpp"))
    assert (CSRC / "cuda" / "rcs_cuda_glue.cpp").is_file()


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_nvcc_compiles(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile .cu files")
    command = [nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
               "-std=c++17", "-O3", f"-I{source.parent}", *GENCODE_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
