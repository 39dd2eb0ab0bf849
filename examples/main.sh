#!/usr/bin/env bash
# The README's main command: build .venv (tests/env.sh), then quantize SmolLM2-135M to 2 bits
# in groups of 64 with decoupleQ and block tuning on the CPU, printing WikiText-2 perplexity
# before and after, sizes, time and peak memory. Extra arguments go to the example, e.g.
#   bash examples/main.sh --out smollm2-w2g64
source "$(dirname "${BASH_SOURCE[0]}")/../tests/env.sh"
python examples/quantize_smollm2.py "$@"
