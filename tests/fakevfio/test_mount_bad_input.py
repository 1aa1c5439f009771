"""Bad input to every writable file, and fault injection, through a real mount.

Every bad write must fail with a clear errno, change nothing (state, log,
digest) and leave the mount serving.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.fuse

SHIFT = 40


@pytest.fixture(scope="module")
def mnt(fakevfio_mount_module: Any) -> Iterator[Any]:
    devices = [
        "a=ram:size=64K,seed=1",
        "b=ram:size=64K",
        "big=ram:size=128K,seed=2",
        "p2p=ram:size=64K,flags=STOP_COPY+P2P",
    ]
    with fakevfio_mount_module(devices) as m:
        yield m


def _snapshot(m: Any, name: str) -> tuple[str, list[str], str]:
    return m.state(name), m.log_lines(name), m.info(name)["state_digest"]


def _save(m: Any, name: str) -> bytes:
    m.reset(name)
    assert m.set_state(name, "STOP_COPY") is None
    data: bytes = m.read_bytes(m.file(name, "migration/data"))
    m.reset(name)
    return data


def test_mount_bad_state_writes_change_nothing(mnt: Any) -> None:
    m = mnt
    m.reset("a")
    before = _snapshot(m, "a")
    # (A 0-byte write never reaches a FUSE filesystem, so b"" is not among them.)
    bad = [
        b"\n",
        b"\xff\xfe\x00",
        b"RUNNINGX\n",
        b"-1\n",
        b"8\n",
        b"running please\n",
        b"0x2\n",
        b"STOP\0",
    ]
    for text in bad:
        assert m.write("a", "migration/state", text) == errno.EINVAL, text
    assert m.write("a", "migration/state", b"STOP" * 20000) == errno.EFBIG
    assert _snapshot(m, "a") == before
    # Valid name, illegal now: refused and logged, state kept.
    assert m.set_state("a", "STOP_COPY") is None
    assert m.set_state("a", "PRE_COPY") == errno.EINVAL
    assert m.set_state("a", "ERROR") == errno.EINVAL
    assert m.state("a") == "STOP_COPY"
    assert m.log_lines("a")[-2:] == ["REFUSED STOP_COPY PRE_COPY", "REFUSED STOP_COPY ERROR"]
    assert m.set_state("p2p", "PRE_COPY_P2P") == errno.EINVAL
    m.reset("a")


def test_mount_read_only_files_and_wrong_modes(mnt: Any) -> None:
    m = mnt
    for rel in (
        "info",
        "migration/flags",
        "migration/log",
        "migration/data_size",
        "migration/precopy_info",
    ):
        assert m.write("a", rel, "x\n") == errno.EACCES, rel
    for rel in ("reset", "remove"):
        assert m.errno_of(os.open, m.file("a", rel), os.O_RDONLY) == errno.EACCES
    assert (
        m.errno_of(os.open, m.path / "devices" / "a" / "nope", os.O_WRONLY | os.O_CREAT, 0o644)
        == errno.EACCES
    )
    m.reset("a")
    assert m.write("a", "migration/precopy_info", "") == errno.EACCES
    assert m.errno_of(m.read, "a", "migration/precopy_info") == errno.EINVAL  # not in PRE_COPY
    assert m.read("a", "migration/flags") == "STOP_COPY P2P PRE_COPY\n"


def test_mount_config_regions_and_node_files(mnt: Any) -> None:
    m = mnt
    config = m.file("a", "config")
    bar0 = m.file("a", "regions/bar0")
    fd = os.open(config, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\xab\xcd", 0x40) == 2
        assert os.pread(fd, 2, 0x40) == b"\xab\xcd"
        assert m.errno_of(os.pwrite, fd, b"x" * 16, 250) == errno.EINVAL
    finally:
        os.close(fd)
    info_json = m.info("a")
    node = m.path / "dev" / "vfio" / "devices" / info_json["cdev"]
    fd = os.open(node, os.O_RDWR)
    try:  # vfio_pci_bar_rw: a memory BAR is EIO while memory decoding is off
        assert m.errno_of(os.pread, fd, 4, 0) == errno.EIO
    finally:
        os.close(fd)
    fd = os.open(config, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x02\x00", 4)  # PCI_COMMAND_MEMORY
    finally:
        os.close(fd)
    cfg = m.read_bytes(config)
    assert len(cfg) == 256
    fd = os.open(bar0, os.O_RDWR)
    try:
        assert m.errno_of(os.pwrite, fd, b"x" * 16, 65536 - 8) == errno.EINVAL
        region_head = os.pread(fd, 64, 0)
    finally:
        os.close(fd)
    group = m.path / "dev" / "vfio" / str(info_json["iommu_group"])
    for path in (node, group):
        fd = os.open(path, os.O_RDWR)
        try:
            assert os.pread(fd, 256, 7 << SHIFT) == cfg
            assert os.pread(fd, 64, 0) == region_head
            for index in (1, 6, 8, 0xFFFF):
                assert m.errno_of(os.pread, fd, 4, index << SHIFT) == errno.EINVAL
        finally:
            os.close(fd)
    for path in (m.path / "dev" / "vfio" / "vfio", m.path / "dev" / "iommu"):
        fd = os.open(path, os.O_RDWR)
        try:
            assert m.errno_of(os.read, fd, 8) == errno.EINVAL
            assert m.errno_of(os.write, fd, b"x") == errno.EINVAL
        finally:
            os.close(fd)


def test_mount_bad_fault_rules_keep_old_rules(mnt: Any) -> None:
    m = mnt
    assert m.write("a", "faults", "delay read 1\n") is None
    for text in (
        "nonsense\n",
        "arc RUNNING STOP ENOTANERRNO\n",
        "arc FOO STOP EIO\n",
        "read EIO after -1\n",
        "delay read 99999999\n",
        "corrupt at 5\n",
        b"\xff\xfe",
        "delay read 1\n" * 100,
    ):
        assert m.write("a", "faults", text) == errno.EINVAL, text
    assert m.write("a", "faults", "#" * (70 * 1024)) == errno.EFBIG
    assert m.read("a", "faults") == "delay read 1\n"
    assert m.write("a", "faults", "") is None
    assert m.read("a", "faults") == ""


def test_mount_bad_create_lines(mnt: Any) -> None:
    m = mnt
    create = m.path / "drivers" / "ram" / "create"
    for line in (
        b"\n",
        b"bad/name\n",
        b"x size=abc\n",
        b"x unknown=1\n",
        b"x size\n",
        b"x flags=P2P\n",
        b"\xff\xfe\n",
        b"x size=0\n",
        b"x " + b"k=v " * 100 + b"\n",
    ):
        assert m.write_bytes(create, line) == errno.EINVAL, line
    assert m.write_bytes(create, b"x" * (65 * 1024)) == errno.EFBIG
    assert m.write_bytes(create, b"a\n") == errno.EEXIST
    assert not (m.path / "drivers" / "nodriver").exists()
    assert sorted(os.listdir(m.path / "devices")) == ["a", "b", "big", "p2p"]


@pytest.mark.parametrize("damage", ["magic", "version", "size", "truncated", "trailing"])
def test_mount_corrupt_resume_streams_fail_and_stay_resuming(mnt: Any, damage: str) -> None:
    m = mnt
    stream = bytearray(_save(m, "big" if damage == "size" else "a"))
    if damage == "magic":
        stream[0] ^= 0xFF
    elif damage == "version":
        stream[8:12] = struct.pack("<I", 99)
    elif damage == "truncated":
        del stream[-100:]
    elif damage == "trailing":
        stream += b"\0" * 16
    m.reset("b")
    digest = m.info("b")["state_digest"]
    assert m.set_state("b", "RESUMING") is None
    fd = os.open(m.file("b", "migration/data"), os.O_WRONLY)
    try:
        try:
            os.write(fd, bytes(stream))
            write_errno = None
        except OSError as exc:
            write_errno = exc.errno
    finally:
        os.close(fd)
    expected_write = {
        "magic": errno.EINVAL,
        "version": errno.EOPNOTSUPP,
        "size": errno.EOPNOTSUPP,
        "truncated": None,
        "trailing": errno.ENOMEM,
    }[damage]
    assert write_errno == expected_write
    if damage in ("magic", "version", "size"):
        assert m.info("b")["state_digest"] == digest  # nothing was loaded
    if damage != "trailing":
        assert m.set_state("b", "STOP") == errno.EINVAL
        assert m.state("b") == "RESUMING"
        assert m.log_lines("b")[-1] == "RESUMING STOP EINVAL"
    m.reset("b")
    assert m.state("b") == "RUNNING"  # the mount keeps serving


# -- fault injection --------------------------------------------------------------------
def test_mount_fault_arc_stops_in_last_reached_state(mnt: Any) -> None:
    m = mnt
    m.reset("p2p")
    assert m.write("p2p", "faults", "arc RUNNING_P2P STOP EIO\n") is None
    assert m.set_state("p2p", "STOP") == errno.EIO
    assert m.state("p2p") == "RUNNING_P2P"
    assert m.log_lines("p2p")[-2:] == ["RUNNING RUNNING_P2P", "RUNNING_P2P STOP EIO"]
    assert m.write("p2p", "faults", "") is None
    assert m.set_state("p2p", "STOP") is None
    m.reset("p2p")


def test_mount_fault_read_and_write_errors_after_bytes(mnt: Any) -> None:
    m = mnt
    stream = _save(m, "a")
    assert m.write("a", "faults", "read EIO after 1000\n") is None
    assert m.set_state("a", "STOP_COPY") is None
    fd = os.open(m.file("a", "migration/data"), os.O_RDONLY)
    try:
        assert os.read(fd, 4096) == stream[:1000]
        assert m.errno_of(os.read, fd, 4096) == errno.EIO
    finally:
        os.close(fd)
    assert m.write("a", "faults", "") is None
    m.reset("a")
    m.reset("b")
    assert m.write("b", "faults", "write ENOSPC after 500\n") is None
    assert m.set_state("b", "RESUMING") is None
    fd = os.open(m.file("b", "migration/data"), os.O_WRONLY)
    try:
        assert os.write(fd, stream[:400]) == 400
        assert m.errno_of(os.write, fd, stream[400:800]) == errno.ENOSPC
    finally:
        os.close(fd)
    assert m.write("b", "faults", "") is None
    m.reset("b")


def test_mount_fault_delays(mnt: Any) -> None:
    m = mnt
    m.reset("a")
    assert m.write("a", "faults", "delay arc 150\ndelay read 150\n") is None
    t0 = time.monotonic()
    assert m.set_state("a", "STOP") is None  # RUNNING -> RUNNING_P2P -> STOP: 2 arcs
    assert time.monotonic() - t0 >= 0.3
    assert m.set_state("a", "STOP_COPY") is None
    fd = os.open(m.file("a", "migration/data"), os.O_RDONLY)
    try:
        t0 = time.monotonic()
        assert os.read(fd, 100)
        assert time.monotonic() - t0 >= 0.15
    finally:
        os.close(fd)
    assert m.read("a", "faults") == "delay arc 150\ndelay read 150\n"
    assert m.write("a", "faults", "delay write 150\n") is None
    m.reset("a")
    assert m.set_state("a", "RESUMING") is None
    fd = os.open(m.file("a", "migration/data"), os.O_WRONLY)
    try:
        t0 = time.monotonic()
        os.write(fd, b"\0" * 10)
        assert time.monotonic() - t0 >= 0.15
    finally:
        os.close(fd)
    assert m.write("a", "faults", "") is None
    m.reset("a")


def test_mount_fault_corrupt_flips_one_bit(mnt: Any) -> None:
    m = mnt
    clean = _save(m, "a")
    assert m.write("a", "faults", "corrupt after 40\n") is None
    corrupted = _save(m, "a")
    assert m.write("a", "faults", "") is None
    diff = [i for i, (x, y) in enumerate(zip(clean, corrupted, strict=True)) if x != y]
    assert diff == [40]
    assert clean[40] ^ corrupted[40] == 0x01
