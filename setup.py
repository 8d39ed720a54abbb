"""Build of the optional native CPU kernel ``gqsa._native_cpu`` (csrc/*.c); metadata is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler, no OpenMP) the install still succeeds and
``torch.ops.gqsa.linear`` falls back to the reference implementation. The AVX2 and AVX-512 code paths are
compiled per function (target attributes) and selected at run time (``__builtin_cpu_supports``), so the build uses
no ``-march`` or per-file ``-m`` flag and the wheel runs on any x86-64 CPU. csrc/gqsa_cpu.h lists what each file
holds.
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
            sources=[
                "csrc/binding.c",  # the CPython module
                "csrc/driver.c",  # run-time dispatch, the work split over threads
                "csrc/kernel_scalar.c",
                "csrc/kernel_avx2.c",
                "csrc/kernel_avx512.c",
                "csrc/kernel_a8.c",  # int8 activations
                "csrc/kernel_vnni.c",  # int8 activations, AVX-512 VNNI
            ],
            depends=["csrc/gqsa_cpu.h"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
            optional=True,  # a failed build must not fail the install
        )
    ]
)
