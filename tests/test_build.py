"""The extension imports and links the BLAS it was built with."""
import os

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
