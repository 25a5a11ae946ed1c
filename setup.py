"""Packaging hook for what pyproject.toml cannot express.

* The C++ sources are shipped inside the package (``m2d_kernels/csrc``) so that an installed
  wheel can still compile the ``cpp`` backend on first use.
* ``M2D_BUILD_EXT=1 pip install --no-build-isolation .`` additionally builds the extension
  ahead of time as ``m2d_kernels._C`` against the torch already installed (no build
  isolation, so no second PyTorch is downloaded). Without it the install is pure Python.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCES = Path(__file__).resolve().parent / "csrc"


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib, "m2d_kernels", "csrc")
        target.mkdir(parents=True, exist_ok=True)
        for source in SOURCES.glob("*.cpp"):
            shutil.copy2(source, target / source.name)


def extension_options():
    if os.environ.get("M2D_BUILD_EXT") != "1":
        return {"cmdclass": {"build_py": BuildPyWithSources}}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        "m2d_kernels._C",
        ["csrc/m2d_cpu.cpp"],
        # Portable flags, as for the JIT build (whose instruction set M2D_ISA picks).
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"],  # see cpp.build_flags
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_py": BuildPyWithSources, "build_ext": BuildExtension}}


setup(**extension_options())
