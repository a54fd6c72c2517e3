"""A selection that collects nothing is a failure: a mistyped `-k` or marker must not pass CI
green (tests/conftest.py once turned pytest's exit code 5 into success)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_selection_that_collects_nothing_fails():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "no_such_test_name", "tests/tsp/test_zigzag.py"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 5, out.stdout[-2000:] + out.stderr[-2000:]  # pytest's "no tests collected"
    assert "deselected" in out.stdout

