"""Builds the C++/CUDA extension fastacl._C against the torch that is already installed.

Install with `pip install --no-build-isolation -e .` so this script sees that torch. When torch is
not importable here (an isolated build), the package is built without the extension and
fastacl.ops compiles it on first use with ninja (see fastacl/ops/_extension.py). The CUDA
kernels (csrc/cuda/) are built only when the installed torch is a CUDA build and nvcc is found;
FASTACL_NO_CUDA=1 skips them.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # isolated build: the extension is compiled on first use instead
    print("fastacl: torch is not importable at build time; fastacl._C will be JIT-compiled")
else:
    if os.environ.get("FASTACL_NO_BUILD_EXT") != "1":
        sources = sorted(glob.glob("csrc/*.cpp"))
        cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
        # csrc/cuda/ (kernels + the glue that registers the CUDA key) needs a CUDA torch: a CPU
        # torch has no CUDA libraries for the glue to link against (see docs/design.md).
        if torch.version.cuda and CUDA_HOME and os.environ.get("FASTACL_NO_CUDA") != "1":
            sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
            extension = CUDAExtension(
                "fastacl._C",
                sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        else:
            extension = CppExtension(
                "fastacl._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
            )
        ext_modules.append(extension)
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
