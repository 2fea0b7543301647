"""Every numbered example runs as a user would run it and ends with OK (each asserts its own
results against numpy or the plaintext model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("[0-9][0-9]_*.py"))


def test_examples_are_numbered_from_01():
    assert [p.name[:2] for p in EXAMPLES] == [f"{i:02d}" for i in range(1, len(EXAMPLES) + 1)]
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.rstrip().endswith("OK"), r.stdout[-2000:]
