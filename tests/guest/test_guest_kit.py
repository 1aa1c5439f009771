"""The guest kit (fakevfio.guest) against a real Linux guest in a real QEMU.

What we did not write checks each result: the Linux kernel unpacks our cpio
archive and runs our init (so the archive format and the init are right); the
guest kernel enumerates the passed-through fakevfio device on its PCI bus and
shows, in its own sysfs, the vendor/device/class that the device's config space
(read from the mount) holds; QEMU's migration moves the running guest, whose
counter goes on on the destination; ``query-migrate`` supplies the statistics.

Without QEMU or apt the tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakevfio.guest import (
    EXIT_PREFIX,
    READY_LINE,
    Entry,
    Guest,
    GuestBuildError,
    GuestError,
    GuestSession,
    GuestTimeout,
    Qmp,
    QmpCommandError,
    boot,
    build_image,
    default_cache_dir,
    migrate,
    newc_archive,
)
from fakevfio.pytest_plugin import guest_missing_reason
from tests.conftest import MountFactory, MountHandle

pytest_plugins = ["pytester"]

#: Taken before pytester moves HOME, so that inner runs share the cache.
CACHE = default_cache_dir()

FLAGS = "STOP_COPY+P2P+PRE_COPY"

#: Lists every PCI function the guest kernel found: "ADDR VENDOR DEVICE CLASS".
LIST_PCI = textwrap.dedent(
    """\
    for d in /sys/bus/pci/devices/*; do
        echo "pci ${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"
    done
    """
)
TICKS = 'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.2; done\n'


@pytest.fixture
def _need_guest() -> None:
    reason = guest_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"guest tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def session(_need_guest: None, tmp_path: Path) -> Iterator[GuestSession]:
    with GuestSession(workdir=tmp_path / "guests") as s:
        yield s


# -- the initramfs writer and bad inputs (no QEMU) ------------------------------------------


def test_newc_archive_layout() -> None:
    """The header fields of buffer-format.rst: magic, 13 hex fields, 4-byte padding."""
    data = newc_archive([Entry.file("init", b"abc", 0o755), Entry.char_device("dev/console", 5, 1)])
    assert data.startswith(b"070701")
    fields = [int(data[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[0] == 1  # ino
    assert fields[1] == 0o100755  # S_IFREG | 0755
    assert fields[6] == 3  # filesize
    assert fields[11] == len(b"init") + 1  # namesize counts the NUL
    # 110 + 5 name bytes = 115, padded to 116; then the 3 data bytes, padded to 120.
    assert data[110:116] == b"init\0\0"
    assert data[116:120] == b"abc\0"
    second = data.index(b"070701", 1)
    assert second % 4 == 0
    dev = [int(data[second + 6 + 8 * i : second + 14 + 8 * i], 16) for i in range(13)]
    assert (dev[1] & 0o170000, dev[9], dev[10]) == (0o020000, 5, 1)
    # A 3-byte name: 110 + 4 = 114 bytes, padded to 116 (not 114) before the data.
    odd = newc_archive([Entry.file("abc", b"wxyz")])
    assert odd[110:116] == b"abc\0\0\0"
    assert odd[116:120] == b"wxyz"
    assert odd[120:126] == b"070701"
    assert data.rstrip(b"\0").endswith(b"TRAILER!!!")
    assert len(data) % 4 == 0
    assert newc_archive([Entry.file("init", b"abc", 0o755)]) == newc_archive(
        [Entry.file("init", b"abc", 0o755)]
    )


@pytest.mark.parametrize("name", ["", "/init", "a\0b", "x" * 4096])
def test_newc_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="expected a relative path"):
        newc_archive([Entry.file(name, b"")])


@pytest.mark.parametrize("name", ["", "a/b", "script"])
def test_build_rejects_bad_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(GuestBuildError, match="expected a plain file name"):
        build_image("true", files={name: b"x"}, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_boot_rejects_devices_without_a_mount(tmp_path: Path) -> None:
    image = None
    with (
        pytest.raises(GuestError, match="need the mount"),
        boot(image, None, ["gpu0"], workdir=tmp_path),  # type: ignore[arg-type]
    ):
        pass
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_migrate_rejects_switchover_ack_without_return_path() -> None:
    with pytest.raises(ValueError, match="needs return_path"):
        migrate(None, None, return_path=False, switchover_ack=True)  # type: ignore[arg-type]


# -- building ---------------------------------------------------------------------------------


def _seeded_cache(tmp_path: Path) -> Path:
    """A fresh cache that shares the downloaded .debs of the default one (no re-download)."""
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    default = CACHE / "debs"
    if default.is_dir():
        for deb in default.glob("*.deb"):
            (cache / "debs" / deb.name).symlink_to(deb)
    return cache


@pytest.mark.usefixtures("_need_guest")
def test_build_is_cached_and_keyed_by_its_inputs(tmp_path: Path) -> None:
    cache = _seeded_cache(tmp_path)
    first = build_image("echo one", cache_dir=cache)
    assert not first.cached
    assert first.kernel.is_file()
    assert first.kernel.stat().st_size > 1 << 20
    assert first.kernel_package.name.startswith("linux-image-")
    assert first.busybox_package.name == "busybox-static"
    # The Debian kernel has what the guest tests need built in (not as modules).
    for option in ("CONFIG_SERIAL_8250_PCI", "CONFIG_PCI_MSI", "CONFIG_DEVTMPFS", "CONFIG_DEVMEM"):
        assert first.config_option(option) == "y", option
    again = build_image("echo one", cache_dir=cache)
    assert again.cached
    assert (again.key, again.initrd) == (first.key, first.initrd)
    other = build_image("echo two", cache_dir=cache)
    assert not other.cached
    assert other.key != first.key
    assert other.kernel == first.kernel  # the kernel is unpacked once per version
    with_file = build_image("echo one", files={"data": b"x"}, cache_dir=cache)
    assert with_file.key not in (first.key, other.key)
    assert first.initrd.read_bytes() != other.initrd.read_bytes()


# -- booting ----------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.deadline(120)
def test_failing_guest_reports_its_console_tail(session: GuestSession) -> None:
    guest = session.boot(
        "echo hello from $(uname -r); echo 'guest-side detail: register 0x10 read 0xdead'; exit 3"
    )
    found = guest.wait_for_line(r"^hello from (\S+)$", timeout=30)
    assert found.group(1).endswith("-amd64")  # the Debian kernel runs our init and script
    assert guest.status() == "running"
    with pytest.raises(GuestError) as failed:
        guest.expect_success(timeout=30)
    message = str(failed.value)
    assert "exited with status 3, expected 0" in message
    assert "console tail" in message
    assert "guest-side detail: register 0x10 read 0xdead" in message
    assert f"{EXIT_PREFIX}3" in message
    # A wait for a line that never comes: GuestTimeout, with the tail too.
    with pytest.raises(GuestTimeout) as timed_out:
        guest.wait_for_line("never printed", timeout=1)
    assert "guest-side detail" in str(timed_out.value)
    lines = guest.console_lines()
    assert lines.index(READY_LINE) < lines.index(f"{EXIT_PREFIX}3")
    # QEMU's refusal of a QMP command comes back with QEMU's own error class.
    with pytest.raises(QmpCommandError) as refused:
        guest.cmd("fakevfio-no-such-command")
    assert refused.value.error_class == "CommandNotFound"
    assert "fakevfio-no-such-command" in str(refused.value)
    assert guest.status() == "running"  # the connection survives a refused command


@pytest.mark.usefixtures("_need_guest")
def test_qmp_connect_fails_at_once_with_qemus_log_when_qemu_exits(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    with open(log, "wb") as out:
        qemu = os.environ.get("FAKEVFIO_QEMU", "qemu-system-x86_64")
        process = subprocess.Popen([qemu, "-fakevfio-bad-option"], stdout=out, stderr=out)
    started = time.monotonic()
    with pytest.raises(GuestError) as failed:
        Qmp.connect(tmp_path / "qmp", process, log, timeout=30)
    assert time.monotonic() - started < 10  # not the 30 s timeout
    message = str(failed.value)
    assert f"QEMU exited with status {process.returncode}" in message
    assert "fakevfio-bad-option" in message  # QEMU's own complaint, from its log


def _await_state(mount: MountHandle, name: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := mount.info(name)["state"]) != state:
        assert time.monotonic() < deadline, f"{name} is {now} after {timeout} s, expected {state}"
        time.sleep(0.05)


def _assert_guest_lists(guest: Guest, config: bytes) -> None:
    """The guest kernel's sysfs shows the device with its config space's IDs, once."""
    vendor = int.from_bytes(config[0:2], "little")
    device = int.from_bytes(config[2:4], "little")
    klass = int.from_bytes(config[9:12], "little")
    found = [line.split() for line in guest.console_lines() if line.startswith("pci ")]
    ours = [f for f in found if f[2:4] == [f"0x{vendor:04x}", f"0x{device:04x}"]]
    assert len(ours) == 1, found
    assert ours[0][4] == f"0x{klass:06x}"
    assert ours[0][1].startswith("0000:00:")  # on the guest's root bus


@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.deadline(120)
@pytest.mark.parametrize(
    ("uri", "multifd", "return_path"),
    [("tcp", True, True), ("tcp", False, True), ("unix", False, False)],
    ids=["tcp-multifd", "tcp", "unix-no-return-path"],
)
@pytest.mark.usefixtures("_need_guest")
def test_guest_with_a_device_migrates_and_runs_on(
    tmp_path: Path,
    fakevfio_mount: MountFactory,
    uri: str,
    multifd: bool,
    return_path: bool,
) -> None:
    transfer = "on" if multifd else "off"
    options = f"rombar=0,x-migration-multifd-transfer={transfer}"
    with (
        fakevfio_mount([f"gpu0=ram:size=16M,flags={FLAGS},seed=5"]) as src_mnt,
        fakevfio_mount([f"gpu0=ram:size=16M,flags={FLAGS}"]) as dst_mnt,
        # Last in, first out: the guests end before their devices' mounts go.
        GuestSession(workdir=tmp_path / "guests") as session,
    ):
        image = session.build(LIST_PCI + TICKS)
        src = session.boot(image, src_mnt, ["gpu0"], name="src", vfio_options=options)
        dst = session.boot(
            image, dst_mnt, ["gpu0"], name="dst", vfio_options=options, incoming=True
        )
        src.wait_for_line(r"^tick 3$", timeout=30)
        # Waits walk the console forward: the next tick line is 4, not 1 again.
        assert src.wait_for_line(r"^tick (\d+)$", timeout=10).group(1) == "4"
        _assert_guest_lists(src, src_mnt.mount.config("gpu0"))
        stats = session.migrate(
            src,
            dst,
            uri=uri,
            multifd=multifd,
            return_path=return_path,
            switchover_ack=return_path,
        )
        assert stats.status == "completed"
        assert stats.vfio_transferred >= 16 << 20  # the device's state went along
        assert stats.transferred > 0
        assert 0 < stats.downtime_ms <= stats.total_time_ms
        assert src.status() == "postmigrate"
        # QEMU reports "completed" before its cleanup takes the source device
        # from STOP_COPY to STOP, so the device states are awaited, not sampled.
        _await_state(src_mnt, "gpu0", "STOP")
        _await_state(dst_mnt, "gpu0", "RUNNING")
        assert dst_mnt.info("gpu0")["state_digest"] == src_mnt.info("gpu0")["state_digest"]
        last = max(
            int(m.group(1))
            for m in map(re.compile(r"^tick (\d+)$").match, src.console_lines())
            if m
        )
        # The destination's console starts empty; the guest's counter goes on from
        # where the source stopped, and keeps going.
        first = int(dst.wait_for_line(r"tick (\d+)$", timeout=20).group(1))
        assert first in (last + 1, last + 2), (last, first)
        dst.wait_for_line(rf"^tick {first + 5}$", timeout=20)


# -- the pytest fixture, as another project uses it ------------------------------------------


def _plugin_args() -> list[str]:
    if any(ep.name == "fakevfio" for ep in importlib.metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "fakevfio.pytest_plugin"]


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.deadline(120)
@pytest.mark.usefixtures("_need_guest")
def test_vfio_guest_fixture_failure_shows_the_console(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKEVFIO_GUEST_CACHE", str(CACHE))
    pytester.makepyfile(
        test_inner="""
        def test_guest_driver(vfio_guest):
            guest = vfio_guest.boot("echo 'lost register: expected 0x1234 got 0x0'; exit 1")
            guest.expect_success(timeout=30)
        """
    )
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "GuestError" in out
    assert "lost register: expected 0x1234 got 0x0" in out
    assert "console tail" in out


# -- the CLI verb -------------------------------------------------------------------------------


def _fakevfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fakevfio", *args],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


@pytest.mark.usefixtures("_need_guest")
def test_cli_guest_build_prints_the_image() -> None:
    done = _fakevfio("guest", "build", "-c", "echo from the cli")
    assert done.returncode == 0, done.stderr
    image = json.loads(done.stdout)
    assert Path(image["kernel"]).is_file()
    assert Path(image["initrd"]).is_file()
    assert image["busybox_package"].startswith("busybox-static=")
    assert _fakevfio("guest", "build", "-c", "echo from the cli").stdout == done.stdout.replace(
        '"cached": false', '"cached": true'
    )


def test_cli_guest_rejects_bad_usage(tmp_path: Path) -> None:
    done = _fakevfio("guest", "boot", "--device", "gpu0")
    assert done.returncode == 2
    assert "--device needs --mount" in done.stderr
    done = _fakevfio("guest", "boot", "--script", str(tmp_path / "missing.sh"))
    assert done.returncode == 2
    assert "cannot read the script" in done.stderr


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.deadline(120)
@pytest.mark.usefixtures("_need_guest")
def test_cli_guest_boot_prints_the_console_and_exits_with_the_script() -> None:
    done = _fakevfio("guest", "boot", "-c", "echo cli says $((6 * 7)); exit 4")
    assert done.returncode == 4, done.stderr
    assert "cli says 42" in done.stdout.splitlines()


@pytest.mark.parametrize("layout", ["bin", "usr/bin"])
def test_busybox_is_found_in_either_debian_layout(tmp_path: Path, layout: str) -> None:
    """Debian 12's busybox-static ships bin/busybox, Debian 13's (merged /usr)
    usr/bin/busybox: a package built by dpkg-deb either way gives the same binary."""
    from fakevfio.guest import _image

    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: busybox-static\nVersion: 1\nArchitecture: amd64\n"
        "Maintainer: t <t@example.org>\nDescription: t\n"
    )
    (root / layout).mkdir(parents=True)
    (root / layout / "busybox").write_bytes(b"\x7fELF busybox")
    deb = tmp_path / "busybox-static.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    _image.extract_busybox(deb, tmp_path / "out")
    assert (tmp_path / "out" / "busybox").read_bytes() == b"\x7fELF busybox"
