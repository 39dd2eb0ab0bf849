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
import sysconfig

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import PlatformError

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


def openblas_licence():
    """Path of the licence file shipped with the pinned scipy-openblas32 wheel
    (OpenBLAS, LAPACK and the GCC runtime linked into its library)."""
    from importlib.metadata import distribution

    dist = distribution("scipy-openblas32")
    for f in dist.files or ():
        if f.name.upper().startswith("LICENSE") and ".dist-info" in str(f):
            return str(dist.locate_file(f))
    raise RuntimeError("scipy-openblas32 ships no licence file: the vendored OpenBLAS cannot be "
                       "redistributed without one")


def _is_absolute_rpath(arg):
    """True for a linker argument that adds a run-time search path outside the package."""
    for prefix in ("-Wl,-rpath,", "-Wl,-rpath=", "-Wl,-R,", "-Wl,-R"):
        if arg.startswith(prefix):
            return not arg[len(prefix):].startswith("$ORIGIN")
    return False


class build_ext_vendoring(build_ext):
    """build_ext that checks for a compiler first, keeps the extension's run-time search path
    to ``$ORIGIN``, and puts the vendored OpenBLAS (and its licence) beside the extension."""

    def build_extensions(self):
        self._check_toolchain()
        if VENDORED_LIB:
            # Python's own LDSHARED may carry -Wl,-rpath,<its prefix>/lib (pyenv, some
            # distributions): that path would be searched before $ORIGIN on the user's
            # machine.  The vendored build needs no path but its own folder.
            for attr in ("linker_so", "linker_so_cxx"):
                cmd = getattr(self.compiler, attr, None)
                if cmd:
                    setattr(self.compiler, attr, [a for a in cmd if not _is_absolute_rpath(a)])
        super().build_extensions()

    def _check_toolchain(self):
        """A clear error before any work when the compiler or Python's headers are missing
        (setuptools would otherwise fail with a bare "No such file or directory")."""
        tools = {"C compiler": getattr(self.compiler, "compiler_so", None),
                 "linker": getattr(self.compiler, "linker_so", None)}
        for what, cmd in tools.items():
            if cmd and shutil.which(cmd[0]) is None:
                src = " (from $CC)" if os.environ.get("CC", "").split()[:1] == cmd[:1] else ""
                raise PlatformError(
                    f"building decoupleq from source needs a C compiler, but the {what} "
                    f"{cmd[0]!r}{src} was not found. Install one with the Python headers "
                    "(Debian/Ubuntu: apt-get install gcc python3-dev; Fedora: dnf install gcc "
                    "python3-devel), or install a prebuilt decoupleq wheel for this platform "
                    "(pip install --only-binary decoupleq decoupleq).")
        include = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(include, "Python.h")):
            raise PlatformError(
                f"building decoupleq from source needs Python's C headers, and {include}/Python.h "
                "does not exist (Debian/Ubuntu: apt-get install python3-dev), or install a "
                "prebuilt decoupleq wheel for this platform.")

    def run(self):
        super().run()
        if not VENDORED_LIB:
            return
        for ext in self.extensions:
            target_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            os.makedirs(target_dir, exist_ok=True)
            shutil.copy2(VENDORED_LIB, os.path.join(target_dir, os.path.basename(VENDORED_LIB)))
            # The library's licence travels with it (redistribution requires it).
            shutil.copy2(OPENBLAS_LICENCE, os.path.join(target_dir, VENDORED_LICENCE_NAME))


blas_kwargs, VENDORED_LIB = blas_settings()
OPENBLAS_LICENCE = openblas_licence() if VENDORED_LIB else None
VENDORED_LICENCE_NAME = "libscipy_openblas.LICENSE.txt"
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
    package_data={"decoupleq": ["libscipy_openblas*.so", "libscipy_openblas.LICENSE.txt"]},
)
