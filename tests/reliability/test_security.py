"""Security defaults, each checked against the real programs.

* the mount is for its owner: no ``allow_other`` unless ``--allow-other``;
* device names and create lines cannot escape the tree;
* driver plugins come only from entry points or an explicit ``--driver``;
* ``migrator incoming`` accepts exactly one migration;
* ``--uuid`` pins the source, checked before any destination device is touched;
* sizes read from the main channel are checked before anything is allocated.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakevfio.testing import PeakRss
from tests.conftest import MountFactory, MountHandle, mount_fakevfio
from tests.migrator import qemu_reference as ref
from tests.migrator import wire_sender as ws
from tests.migrator.helpers import MIGRATOR, digest, finish, migrate, start_incoming
from tests.reliability import assert_reset, error_line, phase_of

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(90)]
Mounts = tuple[MountHandle, MountHandle]
_names = itertools.count()
NOBODY = 65534


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[Mounts]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


def _pair(mounts: Mounts, flags: str = "STOP_COPY+P2P", size: str = "2M") -> str:
    src, dst = mounts
    name = f"sec{next(_names)}"
    assert src.create(name, "ram", f"size={size} flags={flags} seed=21") is None
    assert dst.create(name, "ram", f"size={size} flags={flags}") is None
    return name


# --- the mount is its owner's ----------------------------------------------------------------


def _mount_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            return fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not in /proc/mounts")


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="fakevfio-sec-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("allow_other", [False, True])
def test_mount_is_private_unless_allow_other(open_base: Path, allow_other: bool) -> None:
    extra = ["--allow-other"] if allow_other else []
    with mount_fakevfio(open_base, ["p0=ram:size=4K"], extra_args=extra) as m:
        options = _mount_options(m.path)
        assert ("allow_other" in options) is allow_other, options
        assert "default_permissions" in options, options
        if os.geteuid() != 0:
            return  # cannot switch users to try it for real
        listing = _as_nobody("ls", str(m.device("p0")))
        if allow_other:
            assert listing.returncode == 0, listing.stderr
            # Files belong to the mount's owner: another user still cannot drive the device.
            state = m.file("p0", "migration/state")
            write = _as_nobody("sh", "-c", f"echo STOP > {state}")
            assert write.returncode != 0
            assert m.state("p0") == "RUNNING"
        else:
            assert listing.returncode != 0
            assert "Permission denied" in listing.stderr, listing.stderr


# --- names cannot escape the tree --------------------------------------------------------------

BAD_NAMES = ["../x", "..", ".", "a/b", "/abs", "x" * 65, "a\x00b", "dev\nice", "", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_device_names_are_refused(fakevfio_mount: MountFactory, name: str) -> None:
    with fakevfio_mount([]) as m:
        before = os.listdir(m.path)
        # (" size=4K" is a line without a name; "a b" is name "a" with a bad option "b";
        # an empty write never reaches the server.)
        for line in (f"{name} size=4K", name) if name else (" size=4K",):
            err = m.write_bytes(m.path / "drivers" / "ram" / "create", line.encode())
            assert err == errno.EINVAL, (line, err)
        assert os.listdir(m.path / "devices") == []
        assert os.listdir(m.path) == before
        assert not (m.path.parent / "x").exists()
        if "\x00" in name or not name:
            return  # cannot even be passed in argv
        mp = m.path.parent / f"cli{next(_names)}"
        mp.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "fakevfio", "mount", str(mp), "--device", f"{name}=ram"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1, done.stderr
        assert "invalid device" in done.stderr
        assert os.listdir(mp) == []


# --- plugins come only from entry points or --driver ---------------------------------------

EVIL = """\
from pathlib import Path
Path({marker!r}).write_text("imported")
from fakevfio._ram import RamDriver as Evil
"""


def _fakevfio_script() -> str:
    script = Path(sys.executable).parent / "fakevfio"
    return str(script) if script.exists() else shutil.which("fakevfio") or "fakevfio"


def test_plugins_from_the_cwd_are_not_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (tmp_path / "mp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def fakevfio(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_fakevfio_script(), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    listed = fakevfio("drivers")
    assert listed.returncode == 0, listed.stderr
    assert "evil" not in listed.stdout
    mount = fakevfio("mount", str(tmp_path / "mp"), "--device", "x=evil")
    assert mount.returncode == 1
    assert "unknown driver 'evil'" in mount.stderr
    assert not marker.exists(), "a module in the working directory was imported"
    # An explicit --driver NAME=module:Class is the one way in (module on the path).
    env["PYTHONPATH"] = str(tmp_path)
    explicit = fakevfio("drivers", "--driver", "evil=evil:Evil")
    assert explicit.returncode == 0, explicit.stderr
    assert "evil:" in explicit.stdout
    assert marker.exists()


# --- incoming accepts exactly one migration ----------------------------------------------------


def test_incoming_exits_after_one_migration(mounts: Mounts, tmp_path: Path) -> None:
    src, dst = mounts
    name = _pair(mounts)
    sock = tmp_path / "one.sock"
    source, dest = migrate(f"unix:{sock}", [str(src.device(name))], [str(dst.device(name))])
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    # The process has exited: nobody answers on its address any more.
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as again,
        pytest.raises((ConnectionRefusedError, FileNotFoundError)),
    ):
        again.connect(str(sock))


def test_second_main_connection_during_a_migration_is_closed(
    mounts: Mounts, tmp_path: Path
) -> None:
    src, dst = mounts
    name = f"sec{next(_names)}"
    # 8 MiB read at 8 MiB/s: about a second of stop-copy to intrude on.
    assert src.create(name, "ram", "size=8M flags=STOP_COPY+P2P seed=4 read_bandwidth=8M") is None
    assert dst.create(name, "ram", "size=8M flags=STOP_COPY+P2P") is None
    incoming, addr = start_incoming("tcp:127.0.0.1:0", [str(dst.device(name))])
    source = subprocess.Popen(
        [*MIGRATOR, "migrate", "--to", addr, str(src.device(name))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while src.state(name) != "STOP_COPY":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        intruder_closed = False
        try:
            with ws.connect(addr, 5) as intruder:
                intruder.sendall(ws.main_prologue([f"{name}/vfio"]))
                intruder_closed = intruder.recv(4096) == b""
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            intruder_closed = True  # the listener is already closed: even better
        assert intruder_closed
        src_result = finish(source, 30)
        dst_result = finish(incoming, 30)
    finally:
        for proc in (source, incoming):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert src_result.returncode == 0, src_result.stderr
    assert dst_result.returncode == 0, dst_result.stderr
    assert digest(dst, name) == digest(src, name)


# --- --uuid -----------------------------------------------------------------------------------


def test_uuid_on_both_sides_migrates(mounts: Mounts, tmp_path: Path) -> None:
    src, dst = mounts
    name = _pair(mounts, "STOP_COPY+P2P+PRE_COPY")
    uid = str(uuidlib.uuid4())
    source, dest = migrate(
        "tcp:127.0.0.1:0",
        [str(src.device(name))],
        [str(dst.device(name))],
        "--uuid",
        uid,
        "--multifd-transfer",
        "on",
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    assert digest(dst, name) == digest(src, name)


@pytest.mark.parametrize("attempt", range(3))
@pytest.mark.parametrize("source_uuid", [None, "other"])
def test_uuid_mismatch_is_refused_before_touching_devices(
    mounts: Mounts, tmp_path: Path, source_uuid: str | None, attempt: int
) -> None:
    src, dst = mounts
    name = _pair(mounts)
    before = digest(src, name)
    dst_log = dst.log_lines(name)
    want = str(uuidlib.uuid4())
    src_args = ["--uuid", str(uuidlib.uuid4())] if source_uuid else []
    incoming, addr = start_incoming("tcp:127.0.0.1:0", [str(dst.device(name))], "--uuid", want)
    try:
        source = subprocess.run(
            [*MIGRATOR, "migrate", "--to", addr, *src_args, str(src.device(name))],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        dest = finish(incoming, 30)
    assert dest.returncode != 0
    line = error_line(dest.stderr)
    assert "uuid" in line.lower(), line
    assert source.returncode != 0
    # The refusal reaches the source as a refusal, whichever of its sockets noticed
    # first (it used to say "cannot connect" or "Broken pipe" about 1 run in 4).
    assert "the destination refused or failed the migration" in error_line(source.stderr)
    assert dst.state(name) == "RUNNING"
    assert dst.log_lines(name) == dst_log  # never touched: no RESUMING, no reset
    assert src.state(name) == "RUNNING"
    assert digest(src, name) == before


# --- sizes from the wire are checked before allocating --------------------------------------


def _be(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


HUGE_BLOCKS: dict[str, tuple[list[ref.Record], bytes, str]] = {
    "DATA block of 2^62 bytes": (
        [("end", 1)],
        _be(ref.MARKERS["DATA"], 8) + _be(1 << 62, 8),
        f"DATA block of {1 << 62} bytes exceeds the maximum",
    ),
    # QEMU's config blob carries no length: the flood's 0x5a bytes become its version
    # field, which is refused before anything is read past it.
    "config blob with no length": (
        [("full", 1, "{idstr}", 0, 1), ("marker", 1, "CONFIG_STATE")],
        b"",
        "config blob: PCIDevice version_id 1515870810, expected 1 or 2",
    ),
}


@pytest.mark.parametrize("case", list(HUGE_BLOCKS))
def test_huge_sizes_on_the_main_channel_fail_before_allocating(
    mounts: Mounts, tmp_path: Path, case: str
) -> None:
    _, dst = mounts
    name = f"sec{next(_names)}"
    assert dst.create(name, "ram", "size=1M flags=STOP_COPY") is None
    idstr = f"{name}/vfio"
    records, claim, message = HUGE_BLOCKS[case]
    head = [tuple(idstr if f == "{idstr}" else f for f in r) for r in records]
    incoming, addr = start_incoming(
        f"unix:{tmp_path}/h.sock", [str(dst.device(name))], "--multifd-transfer", "off"
    )
    peak = PeakRss(incoming.pid)
    started = time.monotonic()
    try:
        with ws.RawSource(addr, timeout=15) as sender:
            sender.send_main(ws.main_prologue([idstr]) + ref.build_stream(head) + claim)
            filler = b"\x5a" * (1 << 20)

            def flood() -> None:
                for _ in range(256):  # 256 MiB a buffering destination would hold
                    sender.main.sendall(filler)

            with contextlib.suppress(OSError):
                flood()
            rp = sender.read_return_path()
    finally:
        result = finish(incoming, 30)
    assert time.monotonic() - started < 15
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert message in line, line
    # QEMU's blob has no length: it is parsed where it is restored, in the config phase.
    assert phase_of(line) == ("config" if message.startswith("config blob") else "load"), line
    peak_kib = peak.join()
    assert 0 < peak_kib < 128 << 10, f"destination peaked at {peak_kib} KiB"
    assert_reset(dst, name)
    assert (ws.RP_SHUT, struct.pack(">I", 1)) in rp


def test_a_silent_connection_does_not_delay_the_source(mounts: Mounts, tmp_path: Path) -> None:
    """A connection that never sends its first bytes holds up only itself."""
    src, dst = mounts
    name = _pair(mounts)
    incoming, addr = start_incoming(
        "tcp:127.0.0.1:0", [str(dst.device(name))], "--peer-timeout", "20"
    )
    silent = ws.connect(addr, 5)
    try:
        started = time.monotonic()
        source = subprocess.run(
            [*MIGRATOR, "migrate", "--to", addr, str(src.device(name))],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        elapsed = time.monotonic() - started
    finally:
        dest = finish(incoming, 30)
        with contextlib.suppress(OSError):
            silent.close()
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    assert digest(dst, name) == digest(src, name)
    # Each connection is sniffed in its own task: the silent one costs the
    # real source nothing (it would cost the whole 20 s peer timeout otherwise).
    assert elapsed < 10, elapsed
