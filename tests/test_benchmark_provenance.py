"""benchmarks/provenance.py: what each benchmark --json record says about its run."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import provenance  # noqa: E402


def test_run_info_records_commit_config_threads_and_versions(monkeypatch):
    monkeypatch.setenv("DECOUPLEQ_NUM_THREADS", "2")
    info = provenance.run_info({"shapes": ["8x64"], "out": provenance.REPO}, warmup=3)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout: the commit cannot be recorded")
    assert info["git_commit"] == git.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert isinstance(info["git_dirty"], bool)
    assert info["config"] == {"shapes": ["8x64"], "out": str(provenance.REPO)}
    assert info["extra_config"] == {"warmup": 3}
    assert info["threads"]["env"]["DECOUPLEQ_NUM_THREADS"] == "2"
    assert info["threads"]["core_threads"] == 2
    assert info["versions"]["numpy"] == np.__version__


def test_stamp_puts_the_run_in_every_record_or_at_the_top():
    info = {"git_commit": "x"}
    assert provenance.stamp([{"a": 1}, {"b": 2}], info) == [{"a": 1, "run": info}, {"b": 2, "run": info}]
    assert provenance.stamp({"records": []}, info) == {"records": [], "run": info}
    with pytest.raises(TypeError):
        provenance.stamp("text", info)
