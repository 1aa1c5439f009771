"""The benchmark suite still runs: ``python -m benchmarks --size-scale tiny``.

No timed assertions: only that it completes and prints every scenario.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.fuse, pytest.mark.deadline(600)]


def test_tiny_suite_completes_and_prints_every_scenario() -> None:
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size-scale", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for name in SCENARIOS:
        assert f"| {name}" in table, f"scenario {name} missing from:\n{table}"
    assert "FAILED" not in table, table
    for key in ("cpu:", "cores:", "kernel:", "python:", "pyfuse3:", "trio:", "fuse max request:"):
        assert key in table
    if shutil.which("socat") is None:
        assert "socat not installed" in table
