"""Which ``VfioFs`` handlers run in the trio task and which hop to a worker thread.

The handlers are awaited directly (no mount). The test holds every worker token
of the adapter's limiter, so an operation that needs a worker thread cannot
finish, and one served inline (in the trio task) does. A ram device's
``migration/state`` writes and ``migration/data`` reads and writes are inline
while the device lock is free; with the lock held by another thread, or for any
other driver (a subclass of ram included), they wait for a worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import trio

pytest.importorskip("pyfuse3")

import pyfuse3

from fakevfio._fuse import VfioFs
from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import ROOT_INODE, Tree
from fakevfio.driver import ArcDriver

STATE = ("devices", "d", "migration", "state")
DATA = ("devices", "d", "migration", "data")


class SubRam(RamDriver):
    """A subclass: not trusted to be cheap, so always served by a worker thread."""


def make_fs(driver: str = "ram") -> VfioFs:
    drivers: dict[str, type[ArcDriver]] = {"ram": RamDriver, "subram": SubRam}
    registry = Registry(drivers)
    registry.create(DeviceSpec.from_cli(f"d={driver}:size=64K,flags=STOP_COPY,seed=3"))
    return VfioFs(Tree(registry))


def ino(fs: VfioFs, *path: str) -> pyfuse3.InodeT:
    parent = ROOT_INODE
    for name in path:
        parent = fs.tree.lookup(parent, name).ino
    return pyfuse3.InodeT(parent)


async def open_(fs: VfioFs, flags: int, *path: str) -> pyfuse3.FileHandleT:
    info = await fs.open(ino(fs, *path), flags, None)  # type: ignore[arg-type]
    return pyfuse3.FileHandleT(info.fh)


def starve(fs: VfioFs) -> None:
    """Take every worker token: from now on only inline operations complete."""
    for _ in range(int(fs.limiter.total_tokens)):
        fs.limiter.acquire_on_behalf_of_nowait(object())


async def write_state(fs: VfioFs, target: bytes) -> bool:
    """Whether a state write completed within 0.3 s (it cannot if it needs a worker)."""
    fh = await open_(fs, os.O_WRONLY, *STATE)
    with trio.move_on_after(0.3):
        assert await fs.write(fh, 0, target) == len(target)
        return True
    return False


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


async def test_fuse_ram_state_write_and_data_read_run_in_the_trio_task() -> None:
    fs = make_fs()
    with trio.fail_after(10):
        assert await write_state(fs, b"STOP\n")
        assert await write_state(fs, b"STOP_COPY\n")
        data = await open_(fs, os.O_RDONLY, *DATA)  # opening data takes a worker
        starve(fs)
        first = await fs.read(data, 0, 1 << 20)
        assert bytes(first[:8]) == b"FVIOSTRM"
        assert await write_state(fs, b"STOP\n")
        fh = await open_(fs, os.O_RDONLY, *STATE)
        assert bytes(await fs.read(fh, 0, 4096)) == b"STOP\n"
        assert await write_state(fs, b"RUNNING\n")


async def test_fuse_state_write_of_other_drivers_needs_a_worker() -> None:
    fs = make_fs("subram")
    starve(fs)
    with trio.fail_after(10):
        assert not await write_state(fs, b"STOP\n"), "a subclass's state write ran inline"


async def test_fuse_state_write_with_the_device_lock_held_needs_a_worker(
    release: threading.Event,
) -> None:
    fs = make_fs()
    device = fs.tree.registry.get("d")
    taken = threading.Event()

    def hold() -> None:
        with device.lock:
            taken.set()
            release.wait(10)

    threading.Thread(target=hold, daemon=True).start()
    assert taken.wait(5)
    starve(fs)
    with trio.fail_after(10):
        assert not await write_state(fs, b"STOP\n"), "ran inline although the lock was held"
    release.set()
    assert device.state.name == "RUNNING"
