"""``fakevfio check``: the conformance suite against real mounts, sound and broken.

Sound devices (the ram driver in all four flag sets, the example drivers) must pass
every check over the files, and one device over the real ioctl path under
``fakevfio run``. Broken devices (fault rules of the device itself, and a driver
plugin below whose resume accepts anything) must each be reported by the check
named for the rule they break. The rules themselves come from the kernel:
``vfio_uapi.fsm`` is checked against the kernel's tables in tests/vfio_uapi.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import pytest

from fakevfio import check
from fakevfio._ram import RamDriver
from fakevfio.driver import LoadStream, SaveStream
from tests.conftest import MountFactory
from tests.test_run import _seccomp_missing, run_under
from vfio_uapi.fsm import State

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]
FLAG_SETS = ["STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"]
EXAMPLES = {
    "mtty": ("fakevfio_mtty:MttyDriver", "nr_ports=2"),
    "nic": ("fakevfio_nic:NicDriver", "ring_size=16,filters=8"),
    "gpu": ("fakevfio_gpu:GpuDriver", "mem=64K,seed=3"),
    "edu": ("fakevfio_edu:EduDriver", ""),
}


class _Swallow(LoadStream):
    def write(self, data: memoryview) -> None:
        del data


class GarbageDriver(RamDriver):
    """Broken on purpose: its resume accepts any bytes and loads nothing."""

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        if (current, nxt) == (State.STOP, State.RESUMING):
            return _Swallow()
        if (current, nxt) == (State.RESUMING, State.STOP):
            self.load_range(0, memoryview(b"\xa5" * 64))
            return None
        return super().step(current, nxt, stream)


def _by_check(results: list[check.CheckResult]) -> Mapping[str, check.CheckResult]:
    return {r.check: r for r in results}


def _failed(results: list[check.CheckResult]) -> set[str]:
    return {r.check for r in results if r.status == "fail"}


def test_ram_all_flag_sets_pass_every_check(fakevfio_mount: MountFactory) -> None:
    devices = [f"d{i}=ram:size=64K,seed={i + 1},flags={f}" for i, f in enumerate(FLAG_SETS)]
    with fakevfio_mount(devices) as m:
        paths = [str(m.path / "devices" / f"d{i}") for i in range(4)]
        results = check.run_checks(paths, destructive=True, timeout=30)
        bad = [r for r in results if not r.ok]
        assert not bad, check.table(bad)
        assert len(results) == 4 * len(check.CHECKS)
        by = {(r.device, r.check): r for r in results}
        # PRE_COPY checks ran on the PRE_COPY flag sets only, and passed there.
        assert by[(paths[0], "data_fd.precopy-enomsg")].status == "skip"
        assert by[(paths[3], "data_fd.precopy-enomsg")].status == "pass"
        # all 7 * 7 - 2 (STOP_COPY -> PRE_COPY*) pairs of the full flag set were walked
        assert by[(paths[3], "fsm.shortest-path")].detail.startswith("47 ")


def test_example_drivers_pass_every_check(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(str(ROOT / "examples" / n) for n in EXAMPLES),
    )
    extra: list[str] = []
    devices = []
    for name, (entry, options) in EXAMPLES.items():
        extra += ["--driver", f"{name}={entry}"]
        devices.append(f"x{name}={name}" + (f":{options}" if options else ""))
    with fakevfio_mount(devices, extra_args=extra) as m:
        paths = [str(m.path / "devices" / f"x{n}") for n in EXAMPLES]
        results = check.run_checks(paths, destructive=True, timeout=30)
        bad = [r for r in results if not r.ok]
        assert not bad, check.table(bad)


def test_failing_arc_is_reported_by_the_path_check(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["a=ram:size=16K,flags=STOP_COPY+P2P+PRE_COPY"]) as m:
        m.write("a", "faults", "arc RUNNING_P2P PRE_COPY_P2P EIO\n")
        dev = str(m.path / "devices" / "a")
        results = _by_check(check.run_checks([dev], pattern="fsm.", timeout=20))
        assert results["fsm.shortest-path"].status == "fail"
        assert "PRE_COPY_P2P" in results["fsm.shortest-path"].detail
        assert "EIO" in results["fsm.shortest-path"].detail


def test_resume_that_accepts_garbage_is_reported(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    extra = ["--driver", "garbage=tests.fakevfio.test_check:GarbageDriver"]
    with fakevfio_mount(["g=garbage:size=16K,flags=STOP_COPY"], extra_args=extra) as m:
        dev = str(m.path / "devices" / "g")
        results = check.run_checks([dev], destructive=True, timeout=20)
        failed = _failed(results)
        assert "resume.hardening" in failed
        assert "accepted the stream" in _by_check(results)["resume.hardening"].detail
        # a sound round trip of its own stream still works: no unrelated check fails
        assert failed == {"resume.hardening"}, check.table(results)


def test_hanging_read_is_a_failed_check_not_a_hung_tool(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["h=ram:size=16K,flags=STOP_COPY"]) as m:
        dev = str(m.path / "devices" / "h")
        # 8 s, not 600 s: the mount's teardown waits for the delayed read.
        m.write("h", "faults", "delay read 8000\n")
        start = time.monotonic()
        cmd = [sys.executable, "-m", "fakevfio", "check", "--timeout", "1", "--json", dev]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        took = time.monotonic() - start
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] is False
        first = report["results"][0]
        assert first["status"] == "fail"
        assert first["detail"].startswith("timeout")
        assert took < 8


def test_cli_json_junit_list_and_exit_status(fakevfio_mount: MountFactory, tmp_path: Path) -> None:
    with fakevfio_mount(["a=ram:size=16K,flags=STOP_COPY+PRE_COPY"]) as m:
        dev = str(m.path / "devices" / "a")
        xml = tmp_path / "out.xml"
        cmd = [sys.executable, "-m", "fakevfio", "check", "--json", "--junit-xml", str(xml), dev]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] is True
        names = {r["check"] for r in report["results"]}
        assert names == {c.name for c in check.CHECKS if not c.destructive}
        suite = ET.parse(xml).getroot()
        assert suite.tag == "testsuite"
        assert int(suite.get("tests", "0")) == len(names)
        assert int(suite.get("failures", "1")) == 0
        # a broken arc makes the exit status 1 and a <failure> in the XML
        m.write("a", "faults", "arc STOP STOP_COPY EIO\n")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 1
        failures = ET.parse(xml).getroot().findall("testcase/failure")
        assert failures
    listing = subprocess.run(
        [sys.executable, "-m", "fakevfio", "check", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for c in check.CHECKS:
        assert c.name in listing.stdout


def test_checks_pass_over_the_ioctl_path_under_fakevfio_run(
    fakevfio_mount: MountFactory,
) -> None:
    reason = _seccomp_missing()
    if reason:
        pytest.skip(reason)
    with fakevfio_mount(["gpu0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=7"]) as m:
        done = run_under(
            m.path,
            sys.executable,
            "-m",
            "fakevfio",
            "check",
            "--json",
            "--destructive",
            "/dev/vfio/devices/vfio0",
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert {r["check"] for r in report["results"]} == {c.name for c in check.CHECKS}
        # the checks really went through the device: its log saw the ioctl-driven arcs
        log = (m.path / "devices" / "gpu0" / "migration" / "log").read_text().splitlines()
        assert "RESET" in log
        assert "RUNNING PRE_COPY" in log


class _KeepsSession(check.FileDevice):
    """Broken on purpose: its data_fds never die (a pipe stands in for the stream)."""

    def open_data(self, write: bool) -> int:
        os.close(super().open_data(write))  # the real session must still be live
        rfd, wfd = os.pipe()
        os.write(wfd, b"x" * 64)
        if write:
            os.close(rfd)
            return wfd
        os.close(wfd)
        return rfd


def test_reset_that_keeps_the_session_is_reported(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["k=ram:size=16K,flags=STOP_COPY"]) as m:
        dev = _KeepsSession(m.path / "devices" / "k")
        results = _by_check(check.run_checks([dev], destructive=True, pattern="reset", timeout=20))
        assert results["reset.every-state"].status == "fail"
        assert "survived the reset" in results["reset.every-state"].detail
