"""``fakevfio check``: the conformance suite against real mounts, sound and broken.

Sound devices (the ram driver in all four flag sets, every example driver) must
pass every check over the files, and all of them together over the real ioctl
path under ``fakevfio run`` (cdevs and the legacy group path by PCI address).
Broken devices must each be reported by the check named for the rule they break
and by no other: driver plugins below (a resume that accepts anything, a
PRECOPY_INFO that grows while read), the devices' own fault rules (a failing arc,
a hung read, a DMA tracker that loses pages), and device wrappers for the rules
the fakevfio core enforces for every driver, so that no plugin can break them (a
wrong arc path, a data_fd that survives its session or a reset, dirty_bytes that
count the initial data). The rules themselves come from the kernel:
``vfio_uapi.fsm`` is checked against the kernel's tables in tests/vfio_uapi.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from fakevfio import check
from fakevfio._ram import RamDriver
from fakevfio.driver import ArcDriver, LoadStream, PrecopyInfo, SaveStream
from fakevfio.testing._conformance import DriverRuleError, check_uapi
from tests.conftest import MountFactory
from tests.test_run import _seccomp_missing, run_under
from vfio_uapi.fsm import PRECOPY_STATES, SAVING_STATES, State

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]
FLAG_SETS = ["STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"]
EXAMPLES = {
    "mtty": ("fakevfio_mtty:MttyDriver", "nr_ports=2"),
    "nic": ("fakevfio_nic:NicDriver", "ring_size=16,filters=8"),
    "gpu": ("fakevfio_gpu:GpuDriver", "mem=64K,seed=3"),
    "edu": ("fakevfio_edu:EduDriver", ""),
}
STATE_DRIVERS = {"nic", "edu"}
#: The slow-arc threshold of the sound-device tests: a loaded CI machine, not the driver,
#: makes an arc take a second there (arc.time's own failure is tested with a delay rule).
SLOW = 10.0


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


class _GrowingInfo(SaveStream):
    """A pre-copy stream whose initial_bytes grows by 1 MiB with every read."""

    def __init__(self, inner: SaveStream) -> None:
        self.inner = inner
        self.reads = 0

    def read(self, size: int, state: State) -> bytes | bytearray | memoryview:
        self.reads += 1
        return self.inner.read(size, state)

    def precopy_info(self) -> PrecopyInfo:
        info = self.inner.precopy_info()
        if info.initial_bytes == 0:
            return info
        return PrecopyInfo(
            initial_bytes=info.initial_bytes + (self.reads << 20), dirty_bytes=info.dirty_bytes
        )

    def remaining(self) -> int:
        return self.inner.remaining()


def _unwrap(stream: SaveStream | LoadStream | None) -> SaveStream | LoadStream | None:
    return stream.inner if isinstance(stream, _GrowingInfo) else stream


class GrowingInfoDriver(RamDriver):
    """Broken on purpose: PRECOPY_INFO's initial_bytes grows while the stream is read."""

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        out = super().step(current, nxt, _unwrap(stream))
        if nxt in PRECOPY_STATES and isinstance(out, SaveStream):
            return _GrowingInfo(out)
        return out

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return super().data_size(_unwrap(stream))


class _Detour(check.FileDevice):
    """Broken on purpose: STOP -> RUNNING_P2P detours through RUNNING (a wrong arc path)."""

    def set_state(self, target: State | int) -> bool:
        if int(target) == State.RUNNING_P2P and self.state() is State.STOP:
            super().set_state(State.RUNNING_P2P)
            super().set_state(State.RUNNING)
        return super().set_state(target)


class _Undying(check.FileDevice):
    """Broken on purpose: the data_fds it handed out keep working after their session
    ended (on a session-ending arc, or on reset): each becomes /dev/zero."""

    on_arcs = False
    on_reset = False

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._handed: list[tuple[int, int, int]] = []

    def open_data(self, write: bool) -> int:
        fd = super().open_data(write)
        st = os.fstat(fd)
        self._handed.append((fd, st.st_dev, st.st_ino))
        return fd

    def _keep_alive(self, stand_in: str = "/dev/zero") -> None:
        for fd, dev, ino in self._handed:
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # closed by the check
            if (st.st_dev, st.st_ino) != (dev, ino):
                continue  # the number now belongs to another file
            other = os.open(stand_in, os.O_RDWR)
            os.dup2(other, fd)
            os.close(other)
        self._handed.clear()

    def set_state(self, target: State | int) -> bool:
        new = super().set_state(target)
        if self.on_arcs and (new or self.state() not in SAVING_STATES | {State.RESUMING}):
            self._keep_alive()
        return new

    def reset(self) -> None:
        super().reset()
        if self.on_reset:
            self._keep_alive()


class _SurvivesSession(_Undying):
    on_arcs = True


class _SurvivesReset(_Undying):
    on_reset = True


class _EndsAtStopCopy(_Undying):
    """Broken on purpose: the pre-copy data_fd stops at PRE_COPY* -> STOP_COPY (reads
    EOF, as /dev/null), so the saving group does not share one stream."""

    def set_state(self, target: State | int) -> bool:
        before = self.state()
        new = super().set_state(target)
        if before in PRECOPY_STATES and int(target) == State.STOP_COPY:
            self._keep_alive("/dev/null")
        return new


class _LoadsItsOwn(check.FileDevice):
    """Broken on purpose: a resume loads the device's own last saved stream, whatever
    was written (a load that ignores another device's state and says nothing)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._saving = bytearray()
        self._saved = b""
        self._written = 0

    def set_state(self, target: State | int) -> bool:
        before = self.state()
        new = super().set_state(target)
        if new:
            self._saving, self._written = bytearray(), 0
        if before is State.STOP_COPY:
            self._saved = bytes(self._saving)
        return new

    def read(self, fd: int, size: int) -> bytes:
        data = super().read(fd, size)
        self._saving += data
        return data

    def write(self, fd: int, data: bytes | memoryview) -> int:
        at, n = self._written, len(data)
        if at + n <= len(self._saved):
            data = self._saved[at : at + n]
        self._written += n
        return super().write(fd, data)


class _DirtyCountsInitial(check.FileDevice):
    """Broken on purpose: dirty_bytes includes the initial data (mlx5's bug before its fix)."""

    def precopy_info(self, fd: int) -> tuple[int, int]:
        initial, dirty = super().precopy_info(fd)
        return initial, dirty + initial


def _by_check(results: list[check.CheckResult]) -> Mapping[str, check.CheckResult]:
    return {r.check: r for r in results}


def _failed(results: list[check.CheckResult]) -> set[str]:
    return {r.check for r in results if r.status == "fail"}


def test_ram_all_flag_sets_pass_every_check(fakevfio_mount: MountFactory) -> None:
    devices = [f"d{i}=ram:size=64K,seed={i + 1},flags={f}" for i, f in enumerate(FLAG_SETS)]
    devices[3] += ",dma_rate=4M"
    devices.append("d4=ram:size=32K,seed=9,flags=STOP_COPY")  # another configuration
    with fakevfio_mount(devices) as m:
        paths = [str(m.path / "devices" / f"d{i}") for i in range(4)]
        foreign = str(m.path / "devices" / "d4")
        results = check.run_checks(
            paths, destructive=True, timeout=30, peers=[foreign], slow_arc_s=SLOW
        )
        bad = [r for r in results if r.status not in ("pass", "skip")]
        assert not bad, check.table(bad)
        assert len(results) == 4 * len(check.CHECKS)
        by = {(r.device, r.check): r for r in results}
        # PRE_COPY checks ran on the PRE_COPY flag sets only, and passed there.
        assert by[(paths[0], "data_fd.precopy-enomsg")].status == "skip"
        assert by[(paths[3], "data_fd.precopy-enomsg")].status == "pass"
        assert by[(paths[3], "precopy_info.dirty-bytes")].status == "pass"
        # all 7 * 7 - 2 (STOP_COPY -> PRE_COPY*) pairs of the full flag set were walked
        assert by[(paths[3], "fsm.shortest-path")].detail.startswith("47 ")
        assert by[(paths[3], "data_fd.shared-stream")].detail.startswith(
            "one data_fd across PRE_COPY -> PRE_COPY_P2P -> STOP_COPY"
        )
        # the 64K devices made round trips with each other
        assert by[(paths[0], "migration.two-device")].detail.startswith(f"into {paths[1]}")
        # the DMA-ing device's writes were all in its DMA logging report
        dma = by[(paths[3], "dma_logging.rules")].detail
        assert "pages written, all reported" in dma, dma
        assert "; save " in by[(paths[3], "arc.time")].detail
        # the 32K peer's stream was the foreign one, and it was refused
        assert "another configuration" not in by[(paths[0], "resume.hardening")].detail
        assert "19 bad streams refused" in by[(paths[0], "resume.hardening")].detail
        # the ram stream carries a CRC: every bit flip was refused, none loaded
        assert "LOADED" not in by[(paths[0], "resume.hardening")].detail


def _example_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """PYTHONPATH for the examples (never installed into .venv) and the --driver args."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(str(ROOT / "examples" / n) for n in EXAMPLES))
    extra: list[str] = []
    for name, (entry, _options) in EXAMPLES.items():
        extra += ["--driver", f"{name}={entry}"]
    return extra


def _spec(name: str, device: str) -> str:
    options = EXAMPLES[name][1]
    return f"{device}={name}" + (f":{options}" if options else "")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_driver_passes_every_check(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    extra = _example_env(monkeypatch)
    with fakevfio_mount([_spec(name, "a"), _spec(name, "b")], extra_args=extra) as m:
        a, b = (str(m.path / "devices" / n) for n in ("a", "b"))
        results = check.run_checks([a], destructive=True, timeout=30, peers=[b], slow_arc_s=SLOW)
        bad = [r for r in results if not r.ok]
        assert not bad, check.table(bad)
        by = {r.check: r for r in results}
        assert len(by) == len(check.CHECKS)
        assert by["migration.two-device"].detail.startswith(f"into {b}")
        hardening = by["resume.hardening"]
        # The StateDrivers' streams (nic, edu) carry the core's CRC and refuse every
        # flip; the arc drivers' own formats (mtty, gpu) have none, and the flips
        # that loaded are reported by offset as a warning, never a silent pass.
        if name in STATE_DRIVERS:
            assert hardening.status == "pass", hardening.detail
        else:
            assert hardening.status == "warn", hardening.detail
            assert "LOADED" in hardening.detail


def test_failing_arc_is_reported_by_the_path_check(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["a=ram:size=16K,flags=STOP_COPY+P2P+PRE_COPY"]) as m:
        m.write("a", "faults", "arc RUNNING_P2P PRE_COPY_P2P EIO\n")
        dev = str(m.path / "devices" / "a")
        results = _by_check(check.run_checks([dev], pattern="fsm.", timeout=20))
        assert results["fsm.shortest-path"].status == "fail"
        assert "PRE_COPY_P2P" in results["fsm.shortest-path"].detail
        assert "EIO" in results["fsm.shortest-path"].detail
        # a slow arc is flagged by arc.time (here: every arc 100 ms, 50 ms allowed)
        m.write("a", "faults", "delay arc 100\n")
        (slow,) = check.run_checks([dev], pattern="arc.time", timeout=20, slow_arc_s=0.05)
        assert slow.status == "fail"
        assert slow.detail.startswith("slow arcs (> 0.05 s): ")


#: Broken device -> (mount spec, wrapper, fault rules, the one check that must fail).
BROKEN: dict[str, tuple[str, type[check.FileDevice], str, str]] = {
    "garbage": ("garbage:size=16K,flags=STOP_COPY", check.FileDevice, "", "resume.hardening"),
    "growing": (
        "growing:size=256K,flags=STOP_COPY+PRE_COPY",
        check.FileDevice,
        "",
        "precopy_info.initial-bytes",
    ),
    "detour": ("ram:size=16K,flags=STOP_COPY+P2P", _Detour, "", "fsm.shortest-path"),
    "undying": ("ram:size=16K,flags=STOP_COPY", _SurvivesSession, "", "data_fd.dead-session"),
    "resetkeeps": ("ram:size=16K,flags=STOP_COPY", _SurvivesReset, "", "reset.every-state"),
    "ends": (
        "ram:size=16K,flags=STOP_COPY+PRE_COPY",
        _EndsAtStopCopy,
        "",
        "data_fd.shared-stream",
    ),
    "dirtyinit": (
        "ram:size=16K,flags=STOP_COPY+PRE_COPY",
        _DirtyCountsInitial,
        "",
        "precopy_info.dirty-bytes",
    ),
    "losing": (
        "ram:size=16K,flags=STOP_COPY,dma_rate=4M",
        check.FileDevice,
        "dirty lose 100\n",
        "dma_logging.rules",
    ),
}


@pytest.mark.slow
def test_each_broken_device_is_reported_by_its_check_only(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    extra = [
        "--driver",
        "garbage=tests.fakevfio.test_check:GarbageDriver",
        "--driver",
        "growing=tests.fakevfio.test_check:GrowingInfoDriver",
    ]
    devices = [f"{name}={spec}" for name, (spec, _, _, _) in BROKEN.items()]
    devices.append("corrupt=ram:size=16K,flags=STOP_COPY")
    devices += ["pa=ram:size=16K,flags=STOP_COPY,seed=1", "pb=ram:size=16K,flags=STOP_COPY"]
    with fakevfio_mount(devices, extra_args=extra) as m:
        failed: dict[str, set[str]] = {}
        details: dict[str, str] = {}
        for name, (_spec, wrapper, faults, _want) in BROKEN.items():
            if faults:
                m.write(name, "faults", faults)
            dev = wrapper(m.path / "devices" / name)
            results = check.run_checks([dev], destructive=True, timeout=20, slow_arc_s=SLOW)
            failed[name] = _failed(results)
            details[name] = check.table([r for r in results if r.status == "fail"])
        assert failed == {name: {want} for name, (_, _, _, want) in BROKEN.items()}, details
        # a partner that loads its own state instead of A's fails the round trip alone
        partner = _LoadsItsOwn(m.path / "devices" / "pb")
        results = check.run_checks(
            [str(m.path / "devices" / "pa")], destructive=True, timeout=20, peers=[partner]
        )
        assert _failed(results) == {"migration.two-device"}, check.table(results)
        # a stream the device corrupts on its way out fails the suite, never hangs it
        m.write("corrupt", "faults", "corrupt after 100\n")
        results = check.run_checks([str(m.path / "devices" / "corrupt")], timeout=20)
        assert "migration.repeat" in _failed(results), check.table(results)


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


@pytest.mark.slow
def test_every_driver_passes_over_the_ioctl_path_under_fakevfio_run(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``fakevfio run``: ram by PCI address (legacy group path, type1 DMA) and
    by cdev (iommufd), and every example by cdev; each is the others' foreign stream."""
    reason = _seccomp_missing()
    if reason:
        pytest.skip(reason)
    extra = _example_env(monkeypatch)
    devices = [
        "gpu0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=7,dma_rate=4M,address=0000:00:07.0",
        "gpu1=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=8",
        *(_spec(name, f"x{name}") for name in EXAMPLES),
    ]
    with fakevfio_mount(devices, extra_args=extra) as m:
        names = ["gpu1", *(f"x{name}" for name in EXAMPLES)]
        cdevs = [f"/dev/vfio/devices/{m.info(n)['cdev']}" for n in names]
        done = run_under(
            m.path,
            sys.executable,
            "-m",
            "fakevfio",
            "check",
            "--json",
            "--destructive",
            "--slow-arc",
            str(SLOW),
            "0000:00:07.0",
            *cdevs,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        by = {(r["device"], r["check"]): r for r in report["results"]}
        assert {d for d, _ in by} == {"0000:00:07.0", *cdevs}
        assert {c for _, c in by} == {c.name for c in check.CHECKS}
        assert by[("0000:00:07.0", "migration.two-device")]["detail"].startswith(f"into {cdevs[0]}")
        dma = by[("0000:00:07.0", "dma_logging.rules")]["detail"]
        assert "pages written, all reported" in dma, dma
        # the checks really went through the devices: their logs saw ioctl-driven arcs
        for name in ("gpu0", *names):
            log = m.log_lines(name)
            assert "RESET" in log, name
            assert "STOP STOP_COPY" in log, name
        assert "RUNNING PRE_COPY" in m.log_lines("gpu0")


def _make(cls: type[ArcDriver], options: dict[str, str], name: str) -> ArcDriver:
    return cls(name, options)


def test_the_checks_run_in_process_on_every_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fakevfio.testing.check_uapi``: the same checks on in-process devices (no FUSE),
    through LocalCheckDevice; a broken plugin is named by the check for its rule."""
    for name in EXAMPLES:
        monkeypatch.syspath_prepend(str(ROOT / "examples" / name))
    factories: dict[str, Callable[[str], ArcDriver]] = {
        "ram": lambda n: RamDriver(n, {"size": "64K", "seed": "3"}),
    }
    for name, (entry, options) in EXAMPLES.items():
        module, _, cls = entry.partition(":")
        driver = getattr(importlib.import_module(module), cls)
        opts = dict(kv.split("=") for kv in options.split(",") if kv)
        factories[name] = functools.partial(_make, driver, opts)
    for factory in factories.values():
        check_uapi(factory)  # raises DriverRuleError naming the failed checks
    broken = {"size": "256K", "flags": "STOP_COPY+PRE_COPY"}
    with pytest.raises(DriverRuleError) as info:
        check_uapi(functools.partial(_make, GrowingInfoDriver, broken))
    assert info.value.rule == "uapi"
    assert info.value.detail.startswith("precopy_info.initial-bytes: initial_bytes grew")
    assert ";" not in info.value.detail  # no other check failed


def test_device_arguments_that_are_nothing_say_what_is_expected(tmp_path: Path) -> None:
    """A PCI address with no such device names the sysfs file it read; an argument that
    is no device form lists the three forms."""
    missing = "0000:ff:1f.7"
    assert not (check._access.SYS_PCI_DEVICES / missing).exists()
    (result,) = check.run_checks([missing])
    assert (result.check, result.status) == ("open", "fail")
    assert f"read /sys/bus/pci/devices/{missing}/iommu_group" in result.detail
    assert "ENOENT" in result.detail
    (result,) = check.run_checks([str(tmp_path)])
    assert "failed with EINVAL" in result.detail
    assert "a PCI address" in result.detail


def test_cli_peers_are_partners_not_checked(fakevfio_mount: MountFactory) -> None:
    """`--peer` devices serve the two-device round trip and the foreign stream; only the
    DEVICE arguments appear in the results."""
    devices = ["a=ram:size=16K,seed=3", "b=ram:size=16K", "c=ram:size=8K"]
    with fakevfio_mount(devices) as m:
        cmd = [sys.executable, "-m", "fakevfio", "check", "--destructive", "--json"]
        peers = ["--peer", str(m.device("b")), "--peer", str(m.device("c"))]
        out = subprocess.run(
            [*cmd, *peers, str(m.device("a"))], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stdout + out.stderr
        results = json.loads(out.stdout)["results"]
        assert {r["device"] for r in results} == {str(m.device("a"))}
        by_check = {r["check"]: r for r in results}
        assert by_check["migration.two-device"]["status"] == "pass"
        assert "another configuration" not in by_check["resume.hardening"]["detail"]
