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


# The source tree these tests belong to (a checkout or an unpacked sdist).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_compiler_env():
    """The environment with CC naming a compiler that does not exist."""
    env = dict(os.environ, CC="/nonexistent/cc", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("LDSHARED", None)
    return env


def test_building_without_a_compiler_says_so(tmp_path):
    # pip builds in its isolated environment (the pinned build requirements), then
    # build_ext must stop before compiling anything, with a message naming the missing
    # compiler and what to do, instead of a raw "No such file or directory".
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), ROOT],
        env=_no_compiler_env(), capture_output=True, text=True, cwd=str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "needs a C compiler" in text and "'/nonexistent/cc' (from $CC) was not found" in text, text
    assert "prebuilt decoupleq wheel" in text, text
    assert "No such file or directory" not in text, text
    assert not list(tmp_path.glob("*.whl"))


def _source_files(*subdirs):
    """Files under ``subdirs`` of the source tree, relative to it (caches left out)."""
    skip = {"__pycache__", ".hypothesis", ".pytest_cache"}
    found = set()
    for sub in subdirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, sub)):
            dirnames[:] = [d for d in dirnames if d not in skip]
            for name in filenames:
                if not name.endswith((".pyc", ".so")):
                    found.add(os.path.relpath(os.path.join(dirpath, name), ROOT))
    return found


def test_sdist_carries_what_its_tests_need(tmp_path):
    # The test suite imports helper modules beside the tests (_pipeline_models, zoo_helpers),
    # reads tests/data and runs benchmark scripts: an sdist without them fails its own tests.
    import shutil
    import tarfile

    # From a copy without build outputs: setuptools adds the files listed in a stale
    # decoupleq.egg-info/SOURCES.txt (left by an earlier in-tree build) to the sdist,
    # which would hide a file the manifest leaves out.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".git", "*.so"))
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(src)],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = tmp_path.glob("decoupleq-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need = _source_files("tests", "benchmarks") | {"LICENSE", "setup.py", "pyproject.toml", "README.md"}
    assert {"tests/_pipeline_models.py", "tests/zoo_helpers.py"} <= need
    assert sorted(need - names) == []
    assert not [n for n in names if "__pycache__" in n or ".hypothesis" in n]
