"""``fakevfio doctor`` and ``--version`` (issue 20): what this machine lacks, and how to fix it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from fakevfio._environment import guest_problems, qemu_problems, run_problems


def _fakevfio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fakevfio", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_version_names_the_installed_distribution() -> None:
    done = _fakevfio("--version")
    assert done.returncode == 0
    assert done.stdout == f"fakevfio {importlib.metadata.version('fakevfio')}\n"


def test_doctor_reports_every_area_and_exits_by_what_it_found() -> None:
    done = _fakevfio("doctor", "--json")
    report = json.loads(done.stdout)
    assert set(report) == {"mount", "run", "qemu", "guest"}
    assert done.returncode == (1 if any(report.values()) else 0)
    text = _fakevfio("doctor").stdout.splitlines()
    assert len(text) == sum(max(1, len(p)) for p in report.values())


def test_doctor_names_what_is_missing_and_how_to_fix_it(tmp_path: Path) -> None:
    """With an empty PATH neither QEMU, apt-get nor dpkg-deb can be found."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), FAKEVFIO_QEMU="qemu-system-x86_64")
    done = _fakevfio("doctor", env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(
        line.startswith("MISSING  the QEMU tests:") and "bash .ci/setup-qemu" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("MISSING  the guest kit:") and "apt-get, dpkg-deb not found" in line
        for line in lines
    ), lines
    # (Mounting needs fusermount3 only without root: as root it still works.)
    assert any(line.startswith("ok       fakevfio mount") for line in lines) is (os.geteuid() == 0)


def test_run_problems_name_arch_kernel_and_root() -> None:
    assert run_problems(euid=0, machine="x86_64", release="6.1.0-57-amd64") == []
    problems = run_problems(euid=1000, machine="aarch64", release="5.4.0")
    assert len(problems) == 3
    assert "x86-64 only (this machine is aarch64)" in problems[0]
    assert "needs Linux >= 5.9" in problems[1]
    assert "needs root" in problems[2]
    assert "sudo" in problems[2]


def test_qemu_and_guest_problems_on_this_machine_match_what_is_installed() -> None:
    import shutil

    assert bool(qemu_problems("no-such-qemu-binary")) is True
    assert bool(guest_problems()) is (
        shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None
    )
