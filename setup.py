"""Build the decoupleq._C extension against OpenBLAS.

By default the headers and library come from the pinned ``scipy-openblas32``
build requirement; its shared library is copied into the package and found at
run time through an ``$ORIGIN`` rpath, so the installed package needs neither a
system BLAS nor that wheel.  ``DECOUPLEQ_BLAS=system`` links a system OpenBLAS
found through pkg-config instead.
"""
import glob
import os
import shutil
import subprocess

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILE_ARGS = [
    "-O3",
    "-std=gnu11",
    # No contraction into FMA: the scalar paths must round exactly like the
    # NumPy reference does.  SIMD kernels use explicit intrinsics instead.
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fvisibility=hidden",
    "-Wall",
    "-Wno-unknown-pragmas",
]

# DECOUPLEQ_SANITIZE=1: an AddressSanitizer + UndefinedBehaviorSanitizer build
# for CI (tests/sanitize.sh), where any finding aborts the process.  GCC
# leaves float-cast-overflow out of "undefined": named here.
SANITIZE_FLAGS = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
SANITIZE = os.environ.get("DECOUPLEQ_SANITIZE", "") == "1"
if SANITIZE:
    # -fno-wrapv: CPython's own CFLAGS carry -fwrapv, which defines signed
    # overflow and so hides it from UBSan.
    COMPILE_ARGS = [a for a in COMPILE_ARGS if a != "-O3"] + [
        "-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv", *SANITIZE_FLAGS]


def _pkg_config(*args):
    return subprocess.check_output(["pkg-config", *args, "openblas"], text=True).split()


def blas_settings():
    """Return (extension keyword arguments, path of a library to vendor or None)."""
    if os.environ.get("DECOUPLEQ_BLAS", "").lower() == "system":
        try:
            cflags, libs = _pkg_config("--cflags"), _pkg_config("--libs")
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(
                "DECOUPLEQ_BLAS=system needs pkg-config and an OpenBLAS .pc file "
                "(Debian: apt-get install pkg-config libopenblas-dev)"
            ) from exc
        return dict(
            include_dirs=[f[2:] for f in cflags if f.startswith("-I")],
            library_dirs=[f[2:] for f in libs if f.startswith("-L")],
            libraries=[f[2:] for f in libs if f.startswith("-l")],
            define_macros=[("DQ_BLAS_PREFIX_NONE", "1")],
        ), None
    import scipy_openblas32 as ob

    lib_dir = ob.get_lib_dir()
    return dict(
        include_dirs=[ob.get_include_dir()],
        library_dirs=[lib_dir],
        libraries=[ob.get_library()],
        define_macros=[("DQ_BLAS_PREFIX_SCIPY", "1")],
        extra_link_args=["-Wl,-rpath,$ORIGIN"],
    ), os.path.join(lib_dir, ob.get_library(fullname=True))


class build_ext_vendoring(build_ext):
    """build_ext that puts the vendored OpenBLAS beside the built extension."""

    def run(self):
        super().run()
        if not VENDORED_LIB:
            return
        for ext in self.extensions:
            target_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            os.makedirs(target_dir, exist_ok=True)
            shutil.copy2(VENDORED_LIB, os.path.join(target_dir, os.path.basename(VENDORED_LIB)))


blas_kwargs, VENDORED_LIB = blas_settings()
extension = Extension(
    "decoupleq._C",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=sorted(glob.glob("csrc/*.h")),
    include_dirs=["csrc", np.get_include(), *blas_kwargs.pop("include_dirs")],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"), *blas_kwargs.pop("define_macros")],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-lpthread", "-lm", *blas_kwargs.pop("extra_link_args", []),
                     *(SANITIZE_FLAGS if SANITIZE else [])],
    **blas_kwargs,
)

setup(
    # A sanitized build keeps its objects apart: the ordinary build would
    # otherwise reuse them (same sources, newer objects) and link an ASan
    # extension by accident.
    options={"build": {"build_base": "build/sanitize-build"}} if SANITIZE else {},
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext_vendoring},
    package_data={"decoupleq": ["libscipy_openblas*.so"]},
)
