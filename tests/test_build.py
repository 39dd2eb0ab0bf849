"""The extension imports and links the BLAS it was built with."""
import os
import subprocess
import sys

import decoupleq


def test_backend_info_reports_blas_and_threads():
    info = decoupleq.backend_info()
    assert "OpenBLAS" in info["blas_config"]
    assert info["blas_threads"] >= 1
    assert info["core_threads"] >= 1


def test_extension_is_the_installed_one():
    # The vendored OpenBLAS sits beside the extension, found through $ORIGIN.
    pkg_dir = os.path.dirname(decoupleq.__file__)
    names = os.listdir(pkg_dir)
    assert any(n.startswith("_C.") for n in names)


def _environment_after_import(value):
    """OPENBLAS_THREAD_TIMEOUT in a fresh interpreter after ``import decoupleq``."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = value
    code = "import os, decoupleq; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(decoupleq.__file__)))
    return out.stdout.strip()


def test_openblas_worker_timeout_leaves_the_environment_as_it_was():
    # The import shortens the C core's OpenBLAS worker spin for its own load only:
    # an unset variable is unset again, and a user's value is kept.
    assert _environment_after_import(None) == "unset"
    assert _environment_after_import("12") == "12"
