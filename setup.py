"""The native part: the Markov solvers' sequential recursions in C++ (``csrc/``), registered with
``jax.ffi`` at run time (``gpgrad_jax/_solver/markov/native.py``). Built by ``pip install``; if it
cannot be built (no C++ compiler), the package installs without it and the solvers run their
JAX scans, with a one-time warning."""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include():
    import jaxlib  # a build requirement (pyproject.toml): the XLA FFI headers ship with it

    return os.path.join(os.path.dirname(jaxlib.__file__), "include")


class _BuildExt(build_ext):
    def build_extensions(self):
        for extension in self.extensions:
            extension.include_dirs.append(_ffi_include())
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "gpgrad_jax._native",
            sources=["csrc/covariance.cc", "csrc/square_root.cc"],
            depends=["csrc/small_matrix.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-Wno-attributes", "-Wno-return-type"],
            optional=True,  # no compiler: install without it (the JAX scans run instead)
        )
    ],
    cmdclass={"build_ext": _BuildExt},
)
