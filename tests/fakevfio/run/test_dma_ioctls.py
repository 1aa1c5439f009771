"""``VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT`` through the supervisor's handlers.

The handlers are called directly, as in test_handlers.py (this process is the
caller, its ioctl structs live in a fake caller memory), on a real mount whose
``ram`` device DMA-writes, with ``dma_rate``, into real anonymous memory of
this process mapped through the device's ``dma`` file. Expected errnos and
their order are those of ``vfio_check_feature`` and
``vfio_ioctl_device_feature_logging_start/stop/report`` (drivers/vfio/vfio_main.c)
and of the mlx5/pds drivers (second START, REPORT without START, a range
outside the started ones); the reported bitmap is checked against the pages
whose content really changed in this process's memory.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from fakevfio._run import Vfio
from fakevfio._run._caller import HeldFiles
from fakevfio._run._nodes import MountNodes
from tests.conftest import MountFactory, MountHandle
from tests.fakevfio.run.test_handlers import PAYLOAD, RO, Caller
from vfio_uapi import abi as uapi

pytestmark = pytest.mark.fuse

F_GET, F_SET, F_PROBE = (
    uapi.VFIO_DEVICE_FEATURE_GET,
    uapi.VFIO_DEVICE_FEATURE_SET,
    uapi.VFIO_DEVICE_FEATURE_PROBE,
)
START = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
STOP = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
REPORT = uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
FEAT = uapi.VFIO_DEVICE_FEATURE
RANGES = 0x6000  # where the ranges array goes in the fake caller memory
BITMAP = 0x8000
IOVA = 0x100000
PAGES = 64
K4 = 4096


@attrs.frozen
class Env:
    caller: Caller
    mount: MountHandle
    dev: int
    memory: mmap.mmap
    addr: int

    def dma_text(self) -> str:
        return (self.mount.path / "devices" / "gpu0" / "dma").read_text()

    def state(self, state: str) -> None:
        (self.mount.path / "devices" / "gpu0" / "migration" / "state").write_text(state + "\n")


@pytest.fixture
def env(fakevfio_mount: MountFactory) -> Iterator[Env]:
    spec = "gpu0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=7,dma_rate=1M"
    with fakevfio_mount([spec]) as m:
        memory = mmap.mmap(-1, PAGES * K4)
        buf = (ctypes.c_char * (PAGES * K4)).from_buffer(memory)
        addr = ctypes.addressof(buf)
        del buf
        info = json.loads((m.path / "devices" / "gpu0" / "info").read_text())
        nodes = MountNodes.open(m.path)
        files = HeldFiles(nodes.dev)
        caller = Caller(Vfio(nodes, files))
        env = Env(caller, m, 0, memory, addr)
        env.state("STOP")  # no DMA until a test wants it
        (m.path / "devices" / "gpu0" / "dma").write_text(
            f"map {IOVA:#x} {PAGES * K4:#x} {os.getpid()} {addr:#x} rw\n"
        )
        try:
            cdev = m.path / "dev" / "vfio" / "devices" / str(info["cdev"])
            dev = _bound(caller, cdev, m.path / "dev" / "iommu")
            yield attrs.evolve(env, dev=dev)
        finally:
            files.close()
            for fd in caller.fds:
                os.close(fd)
            memory.close()


def _bound(c: Caller, cdev: Path, iommu_path: Path) -> int:
    dev, iommu = c.open(cdev), c.open(iommu_path)
    assert c.ioctl(dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, struct.pack("<IIiI", 16, 0, iommu, 0)) == 0
    assert c.ioctl(iommu, uapi.IOMMU_IOAS_ALLOC, struct.pack("<III", 12, 0, 0)) == 0
    (ioas,) = c.out(8, "<I")
    assert c.ioctl(dev, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, struct.pack("<III", 12, 0, ioas)) == 0
    return dev


def feature(env: Env, flags: int, payload: bytes = b"", argsz: int | None = None) -> int:
    size = 8 + len(payload) if argsz is None else argsz
    return env.caller.err(env.dev, FEAT, struct.pack("<II", size, flags) + payload)


def ok(env: Env, flags: int, payload: bytes = b"") -> None:
    assert (
        env.caller.ioctl(env.dev, FEAT, struct.pack("<II", 8 + len(payload), flags) + payload) == 0
    )


def control(page_size: int, ranges: list[tuple[int, int]], env: Env, ptr: int = RANGES) -> bytes:
    table = b"".join(uapi.DMA_LOGGING_RANGE.pack(i, n) for i, n in ranges)
    env.caller.mem.buf[RANGES : RANGES + len(table)] = table
    return uapi.DMA_LOGGING_CONTROL.pack(page_size, len(ranges), 0, ptr)


def report(iova: int, length: int, page_size: int, bitmap: int = BITMAP) -> bytes:
    return uapi.DMA_LOGGING_REPORT.pack(iova, length, page_size, bitmap)


def test_dma_logging_probe_and_the_get_set_rules(env: Env) -> None:
    c = env.caller
    # QEMU's probe: argsz 8, PROBE|SET|DMA_LOGGING_START (flags 0x40006 + SET)
    assert c.ioctl(env.dev, FEAT, struct.pack("<II", 8, F_PROBE | F_SET | START)) == 0
    assert c.ioctl(env.dev, FEAT, struct.pack("<II", 8, F_PROBE | F_SET | STOP)) == 0
    assert c.ioctl(env.dev, FEAT, struct.pack("<II", 8, F_PROBE | F_GET | REPORT)) == 0
    EINVAL = 22
    assert feature(env, F_PROBE | F_GET | START) == EINVAL  # START is SET-only
    assert feature(env, F_GET | STOP) == EINVAL
    assert feature(env, F_SET | REPORT) == EINVAL  # REPORT is GET-only
    assert feature(env, START, control(4096, [(IOVA, K4)], env)) == EINVAL  # no GET/SET
    # the payload must hold the struct: 24 bytes for START, 32 for REPORT
    assert feature(env, F_SET | START, control(4096, [(IOVA, K4)], env), argsz=8 + 23) == EINVAL
    assert feature(env, F_GET | REPORT, report(IOVA, K4, K4), argsz=8 + 31) == EINVAL
    assert "log off" in env.dma_text()
    ok(env, F_SET | STOP)  # STOP when not started succeeds (mlx5, pds)


def test_dma_logging_start_rules_and_order(env: Env) -> None:
    c = env.caller
    E2BIG, EINVAL, EFAULT, EOVERFLOW = 7, 22, 14, 75
    # num_ranges is checked before the ranges pointer is read (0: would be EFAULT)
    assert feature(env, F_SET | START, uapi.DMA_LOGGING_CONTROL.pack(4096, 0, 0, 0)) == EINVAL
    assert feature(env, F_SET | START, uapi.DMA_LOGGING_CONTROL.pack(4096, 257, 0, 0)) == E2BIG
    assert feature(env, F_SET | START, uapi.DMA_LOGGING_CONTROL.pack(4096, 1, 0, 0)) == EFAULT
    assert feature(env, F_SET | START, control(4096, [(IOVA + 0x800, K4)], env)) == EINVAL
    assert feature(env, F_SET | START, control(4096, [(IOVA, 0x800)], env)) == EINVAL
    assert feature(env, F_SET | START, control(4096, [(2**64 - K4, K4)], env)) == EOVERFLOW
    overlap = [(IOVA, 4 * K4), (IOVA + 3 * K4, K4)]
    assert feature(env, F_SET | START, control(4096, overlap, env)) == EINVAL
    assert "log off" in env.dma_text()
    # control struct not writable: EFAULT and the logging is stopped again
    c.mem.buf[RO : RO + 32] = struct.pack("<II", 32, F_SET | START) + control(
        4096, [(IOVA, K4)], env
    )
    assert c.err(env.dev, FEAT, RO) == EFAULT
    assert "log off" in env.dma_text()
    # unsorted ranges are fine; the device's page size comes back in the struct
    unsorted = [(IOVA + 32 * K4, 32 * K4), (IOVA, 16 * K4)]
    ok(env, F_SET | START, control(0x3000, [(IOVA + 32 * K4, 32 * K4), (IOVA, 16 * K4)], env))
    assert struct.unpack_from("<Q", c.mem.buf, PAYLOAD) == (8192,)
    assert f"log on 8192 {IOVA:#x}:0x10000,{IOVA + 32 * K4:#x}:0x20000" in env.dma_text()
    assert feature(env, F_SET | START, control(4096, unsorted, env)) == EINVAL  # second START
    ok(env, F_SET | STOP)
    assert "log off" in env.dma_text()


def _run_dma(env: Env, seconds: float) -> None:
    before = env.mount.info("gpu0")["dma"]["bytes_written"]
    env.state("RUNNING")
    deadline = time.monotonic() + 10
    time.sleep(seconds)
    while env.mount.info("gpu0")["dma"]["bytes_written"] == before:
        assert time.monotonic() < deadline, "the device did not DMA"
        time.sleep(0.02)
    env.state("STOP")


def _changed_pages(env: Env, snapshot: bytes) -> set[int]:
    now = env.memory[:]
    return {
        p for p in range(PAGES) if now[p * K4 : (p + 1) * K4] != snapshot[p * K4 : (p + 1) * K4]
    }


def _bits(data: bytes) -> set[int]:
    value = int.from_bytes(data, "little")
    return {i for i in range(len(data) * 8) if value >> i & 1}


def test_dma_logging_report_of_real_dma(env: Env) -> None:
    c = env.caller
    EINVAL, EFAULT, EOVERFLOW = 22, 14, 75
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4)) == EINVAL  # no START
    ok(env, F_SET | START, control(4096, [(IOVA, PAGES * K4)], env))
    snapshot = env.memory[:]
    _run_dma(env, 0.15)
    changed = _changed_pages(env, snapshot)
    assert changed
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, 2048)) == EINVAL
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, 0x3000)) == EINVAL
    assert feature(env, F_GET | REPORT, report(2**64 - K4, K4, K4)) == EOVERFLOW
    assert feature(env, F_GET | REPORT, report(IOVA - K4, 2 * K4, K4)) == EINVAL  # outside
    # a bitmap the caller cannot write: EFAULT, and nothing is cleared
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4, bitmap=RO)) == EFAULT
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4, bitmap=0xFFFC)) == EFAULT
    # the kernel only sets bits: a bit the caller had set stays set; past the bitmap, untouched
    preset = min(set(range(PAGES)) - changed)
    c.mem.buf[BITMAP : BITMAP + 16] = struct.pack("<QQ", 1 << preset, 1 << 63)
    ok(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4))
    assert _bits(bytes(c.mem.buf[BITMAP : BITMAP + 8])) == changed | {preset}
    assert struct.unpack_from("<Q", c.mem.buf, BITMAP + 8) == (1 << 63,)
    # REPORT cleared what it reported
    c.mem.buf[BITMAP : BITMAP + 8] = bytes(8)
    ok(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4))
    assert bytes(c.mem.buf[BITMAP : BITMAP + 8]) == bytes(8)
    # a 16 KiB report page: one bit per four pages
    snapshot = env.memory[:]
    _run_dma(env, 0.1)
    changed = _changed_pages(env, snapshot)
    ok(env, F_GET | REPORT, report(IOVA, PAGES * K4, 4 * K4))
    assert _bits(bytes(c.mem.buf[BITMAP : BITMAP + 8])) == {p // 4 for p in changed}
    ok(env, F_SET | STOP)
    assert feature(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4)) == EINVAL


def test_dma_logging_report_with_dirty_lose_100_is_empty(env: Env) -> None:
    c = env.caller
    assert env.mount.write("gpu0", "faults", "dirty lose 100\n") is None
    ok(env, F_SET | START, control(4096, [(IOVA, PAGES * K4)], env))
    snapshot = env.memory[:]
    _run_dma(env, 0.1)
    assert _changed_pages(env, snapshot)  # the device did write
    c.mem.buf[BITMAP : BITMAP + 8] = bytes(8)
    ok(env, F_GET | REPORT, report(IOVA, PAGES * K4, K4))
    assert bytes(c.mem.buf[BITMAP : BITMAP + 8]) == bytes(8)
    assert env.mount.info("gpu0")["dma"]["pages_lost"] > 0


def test_dma_logging_arg_outside_the_caller_memory_is_efault(env: Env) -> None:
    assert env.caller.err(env.dev, FEAT, PAYLOAD + 0xF000) == 14
