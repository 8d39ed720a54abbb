"""Build of the optional native CPU kernel ``gqsa._native_cpu`` (csrc/gqsa_cpu.c); metadata is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler, no OpenMP) the install still succeeds and
``torch.ops.gqsa.linear`` falls back to the reference implementation. The AVX2 code paths are selected at run
time (``__builtin_cpu_supports``), so the build uses no ``-march`` flag and the wheel runs on any x86-64 CPU.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    COMPILE_ARGS, LINK_ARGS = ["/O2", "/openmp"], []
else:
    COMPILE_ARGS, LINK_ARGS = ["-O3", "-std=c11", "-fopenmp"], ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "gqsa._native_cpu",
            sources=["csrc/gqsa_cpu.c"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
            optional=True,  # a failed build must not fail the install
        )
    ]
)
