"""Fuzzing of the C boundary: a short run in every test run, the long one in CI
(DECOUPLEQ_FUZZ=1, from tests/sanitize.sh under ASan + UBSan)."""
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install hypothesis)")
