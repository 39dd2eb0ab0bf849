#!/usr/bin/env bash
# The test command of the README: build and install into .venv, then run pytest.
# Extra arguments go to pytest (for example: -m "not slow").
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
set +e
# Run from outside the source tree so the installed package (with its
# compiled extension) is what gets imported, not the source folder.
(cd tests && python -m pytest -q -p no:cacheprovider "$@")
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
