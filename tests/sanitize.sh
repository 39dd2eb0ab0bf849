#!/usr/bin/env bash
# CI: the C extension built with AddressSanitizer + UndefinedBehaviorSanitizer
# (DECOUPLEQ_SANITIZE=1, every finding aborts), then the C-boundary tests and
# a bounded fuzz run of every _C entry point under it.
#
# The build goes to build/sanitize/lib (the package's Python files and the
# sanitized _C beside them), put first on PYTHONPATH; the interpreter is the
# .venv one (not built with ASan), so libasan is preloaded.
# Extra arguments go to the fuzz run's pytest (for example -x).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
root="$(pwd)"
lib="$root/build/sanitize/lib"
rm -rf "$root/build/sanitize" && mkdir -p "$lib"
# A wheel built in pip's isolated environment (the pinned OpenBLAS and
# setuptools of pyproject.toml), unpacked into $lib; setup.py keeps its
# objects in build/sanitize-build, away from the ordinary build's.
DECOUPLEQ_SANITIZE=1 python -m pip wheel -q --no-deps -w "$root/build/sanitize/wheel" . || exit 1
python -m zipfile -e "$root"/build/sanitize/wheel/decoupleq-*.whl "$lib"
libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$libasan $libubsan"
# Leaks: the interpreter's own allocations at exit are not ours to judge.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}"
set +e
cd tests
python -c "import decoupleq, sys; assert decoupleq.__file__.startswith('$lib'), decoupleq.__file__; print('sanitized build:', decoupleq.__file__)" || exit 1
python -m pytest -q -p no:cacheprovider test_c_*.py test_packing.py test_kernels.py test_hessian.py \
    -m "not slow" -k "not benchmark_writes and not sigint"
status=$?
if [ "$status" -ne 0 ]; then
    echo "C-boundary tests under ASan/UBSan failed ($status)" >&2
    exit "$status"
fi
DECOUPLEQ_FUZZ=1 python -m pytest -q -p no:cacheprovider -s fuzz "$@"
