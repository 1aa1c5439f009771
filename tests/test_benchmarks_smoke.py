"""The benchmark suite still runs: ``python -m benchmarks --size-scale tiny``.

No timed assertions: only that it completes, prints every scenario with its
same-run baselines, and writes the table and (with matplotlib) the plot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.fuse, pytest.mark.deadline(600)]


def test_tiny_suite_completes_and_prints_every_scenario(tmp_path: Path) -> None:
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # QEMU's view is left out: two QEMUs add half a minute, and tests/test_qemu.py
    # migrates between QEMUs already.
    names = [name for name in SCENARIOS if name != "qemu"]
    only = [arg for name in names for arg in ("--only", name)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size-scale", "tiny", "--out", str(tmp_path), *only],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for name in names:
        assert f"| {name}" in table, f"scenario {name} missing from:\n{table}"
    assert "FAILED" not in table, table
    for key in ("cpu:", "cores:", "kernel:", "python:", "pyfuse3:", "trio:", "fuse max request:"):
        assert key in table
    for baseline in ("FUSE floor read", "FUSE floor 4-byte pread", "model 250 ms"):
        assert baseline in table, f"same-run baseline {baseline!r} missing from:\n{table}"
    assert (tmp_path / "table.txt").read_text().strip() == table.strip()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG\r\n")
    else:
        assert "matplotlib is not installed" in proc.stderr
