"""migration/data through a real mount: save/restore, pre-copy, sessions, concurrency."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.fuse

MIB = 1 << 20


@pytest.fixture(scope="module")
def mnt(fakevfio_mount_module: Any) -> Iterator[Any]:
    devices = [
        "src=ram:size=64M,seed=11",
        "dst=ram:size=64M",
        "pre=ram:size=8M,seed=5,dirty_rate=4M",
        "pre_dst=ram:size=8M",
        "small=ram:size=64K,seed=3",
    ]
    with fakevfio_mount_module(devices) as m:
        yield m


def _data(m: Any, name: str) -> Path:
    return m.file(name, "migration/data")  # type: ignore[no-any-return]


def _read_all(fd: int, size: int = MIB) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, size):
        out += chunk
    return bytes(out)


def _write_all(fd: int, data: bytes, size: int) -> None:
    view = memoryview(data)
    for off in range(0, len(view), size):
        assert os.write(fd, view[off : off + size]) == len(view[off : off + size])


def test_mount_save_restore_64mib_in_mixed_chunk_sizes(mnt: Any) -> None:
    m = mnt
    m.reset("src")
    m.reset("dst")
    assert m.set_state("src", "STOP") is None
    digest = m.info("src")["state_digest"]
    assert m.set_state("src", "STOP_COPY") is None
    expected_size = int(m.read("src", "migration/data_size"))
    assert m.set_state("dst", "RESUMING") is None
    src = os.open(_data(m, "src"), os.O_RDONLY)
    dst = os.open(_data(m, "dst"), os.O_WRONLY)
    total = 0
    try:
        # 1-byte reads and writes for the first 4 KiB, 4097 up to 8 MiB, then 1 MiB.
        for limit, chunk in ((4096, 1), (8 * MIB, 4097), (None, MIB)):
            while limit is None or total < limit:
                data = os.read(src, chunk if limit is None else min(chunk, limit - total))
                if not data:
                    break
                assert os.write(dst, data) == len(data)
                total += len(data)
        assert total == expected_size
        assert os.read(src, MIB) == b""  # EOF, and again
        assert os.read(src, 1) == b""
    finally:
        os.close(src)
        os.close(dst)
    assert m.set_state("dst", "STOP") is None
    assert m.info("dst")["state_digest"] == digest
    assert m.read_bytes(m.file("src", "config")) == m.read_bytes(m.file("dst", "config"))
    assert m.set_state("src", "STOP") is None
    assert m.log_lines("dst")[-1] == "RESUMING STOP"


def test_mount_precopy_enomsg_dirty_workload_and_full_migration(mnt: Any) -> None:
    m = mnt
    m.reset("pre")
    m.reset("pre_dst")
    assert m.set_state("pre", "PRE_COPY") is None
    assert m.set_state("pre_dst", "RESUMING") is None
    src = os.open(_data(m, "pre"), os.O_RDONLY)
    dst = os.open(_data(m, "pre_dst"), os.O_WRONLY)
    try:
        initial = int(m.read("pre", "migration/precopy_info").split()[1])
        assert initial > 8 * MIB
        moved = 0
        while moved < initial:
            data = os.read(src, MIB)
            os.write(dst, data)
            moved += len(data)
        assert moved >= initial
        # Drain to the temporary end: the running workload may have dirtied
        # pages while the initial bytes moved, and those come first.
        ended_with: int | None = None
        for _ in range(1000):
            try:
                os.write(dst, os.read(src, MIB))
            except OSError as exc:
                ended_with = exc.errno
                break
        assert ended_with == errno.ENOMSG, "pre-copy never reached its temporary end"
        # The workload keeps dirtying pages; they show up as dirty_bytes and as data.
        deadline = time.monotonic() + 5
        dirty = 0
        while dirty == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            text = m.read("pre", "migration/precopy_info")
            assert text.startswith("initial_bytes 0\ndirty_bytes ")
            dirty = int(text.split()[3])
        assert dirty > 0
        more = os.read(src, MIB)
        assert more
        os.write(dst, more)
        assert m.info("pre")["pages_dirtied"] > 0
        assert m.set_state("pre", "STOP_COPY") is None
        os.write(dst, _read_all(src))
    finally:
        os.close(src)
        os.close(dst)
    assert m.set_state("pre_dst", "STOP") is None
    assert m.info("pre_dst")["state_digest"] == m.info("pre")["state_digest"]
    assert m.set_state("pre", "STOP") is None


def test_mount_data_sessions_enodev_eacces_and_shared_position(mnt: Any) -> None:
    m = mnt
    m.reset("small")
    data = _data(m, "small")
    # No live session: ENODEV at open.
    assert m.errno_of(os.open, data, os.O_RDONLY) == errno.ENODEV
    assert m.set_state("small", "STOP_COPY") is None
    for flags in (os.O_WRONLY, os.O_RDWR):
        assert m.errno_of(os.open, data, flags) == errno.EACCES
    a = os.open(data, os.O_RDONLY)
    b = os.open(data, os.O_RDONLY)
    try:
        first, second = os.read(a, 100), os.read(b, 100)
        # Offsets are ignored and the data file is not seekable.
        assert m.errno_of(os.pread, a, 10, 0) == errno.ESPIPE
        assert m.set_state("small", "STOP") is None  # ends the session
        for fd in (a, b):
            assert m.errno_of(os.read, fd, 10) == errno.ENODEV
    finally:
        os.close(a)
        os.close(b)
    # A fresh session of the stopped device yields the same stream: a and b shared one position.
    assert m.set_state("small", "STOP_COPY") is None
    fd = os.open(data, os.O_RDONLY)
    try:
        assert os.read(fd, 200) == first + second
        # Removal is refused while the session lives.
        assert m.remove("small") == errno.EBUSY
    finally:
        os.close(fd)
    assert m.set_state("small", "RESUMING") is None
    assert m.errno_of(os.open, data, os.O_RDONLY) == errno.EACCES
    m.reset("small")
    assert m.state("small") == "RUNNING"


def test_mount_create_and_remove_at_run_time(mnt: Any) -> None:
    m = mnt
    for _ in range(2):  # re-create under the same name: fresh device, fresh inodes
        assert m.create("dyn", options="size=16K seed=9 flags=STOP_COPY") is None
        assert "dyn" in os.listdir(m.path / "devices")
        info = m.info("dyn")
        assert info["migration_flags"] == ["STOP_COPY"]
        assert info["cdev"] in os.listdir(m.path / "dev" / "vfio" / "devices")
        assert str(info["iommu_group"]) in os.listdir(m.path / "dev" / "vfio")
        assert m.create("dyn") == errno.EEXIST
        state = m.device("dyn") / "migration" / "state"
        assert m.remove("dyn") is None
        assert not state.exists()
        assert "dyn" not in os.listdir(m.path / "devices")
        assert info["cdev"] not in os.listdir(m.path / "dev" / "vfio" / "devices")
        assert m.remove("src2") is not None  # never existed


_READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = 0
while chunk := os.read(fd, 1 << 16):
    n += len(chunk)
print(n)
"""


@pytest.mark.deadline(30)
def test_mount_concurrent_slow_readers_do_not_block_the_fs(mnt: Any) -> None:
    m = mnt
    names = [f"slow{i}" for i in range(3)]
    for name in names:
        assert m.create(name, options="size=2M read_bandwidth=1M") is None
        assert m.set_state(name, "STOP_COPY") is None
    sizes = [int(m.read(n, "migration/data_size")) for n in names]
    # Several processes per session, sharing its position; one slow device each.
    procs = [
        subprocess.Popen([sys.executable, "-c", _READER, str(_data(m, n))], stdout=subprocess.PIPE)
        for n in names
        for _ in range(2)
    ]
    try:
        worst = 0.0
        start = time.monotonic()
        while time.monotonic() - start < 0.6:
            t0 = time.monotonic()
            assert m.state("src") in ("RUNNING", "STOP")
            m.read("small", "migration/log")
            worst = max(worst, time.monotonic() - t0)
        # A blocked loop would stall for a whole 2 s device read; allow for a busy machine.
        assert worst < 1.0, f"fs blocked for {worst:.2f} s while slow readers ran"
        counts = [int(p.communicate(timeout=20)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, size in enumerate(sizes):
        assert counts[2 * i] + counts[2 * i + 1] == size
    for name in names:
        assert m.set_state(name, "STOP") is None
        assert m.remove(name) is None
