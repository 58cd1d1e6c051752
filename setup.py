"""Builds the C++/CUDA extension fastacl._C against the torch that is already installed.

Install with `pip install --no-build-isolation -e .` so this script sees that torch. When torch is
not importable here (an isolated build), the package is built without the extension and
fastacl.ops compiles it on first use with ninja (see fastacl/ops/_extension.py).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # isolated build: the extension is compiled on first use instead
    print("fastacl: torch is not importable at build time; fastacl._C will be JIT-compiled")
else:
    if os.environ.get("FASTACL_NO_BUILD_EXT") != "1":
        sources = sorted(glob.glob("csrc/*.cpp"))
        ext_modules.append(
            CppExtension(
                "fastacl._C",
                sources,
                extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
