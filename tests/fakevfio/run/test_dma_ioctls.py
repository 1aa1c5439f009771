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
import errno
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
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


# -- the same rules through the real ioctl path: a C program on the system <linux/vfio.h> ------
#: Built from this source (the legacy group path: the system's 6.1 header has no iommufd cdev).
C_SOURCE = r"""/* DMA logging under fakevfio run, on the type1 group path. */
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define IOVA 0x100000ULL
#define PAGES 64
#define PG 4096ULL
#define F_PROBE VFIO_DEVICE_FEATURE_PROBE
#define F_GET VFIO_DEVICE_FEATURE_GET
#define F_SET VFIO_DEVICE_FEATURE_SET
#define LOG_START VFIO_DEVICE_FEATURE_DMA_LOGGING_START
#define LOG_STOP VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
#define LOG_REPORT VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT

static char buf[sizeof(struct vfio_device_feature) + 64] __attribute__((aligned(8)));

static int feature(int dev, uint32_t flags, const void *payload, size_t len, size_t argsz) {
    struct vfio_device_feature *f = (void *)buf;
    memset(buf, 0, sizeof(buf));
    f->argsz = argsz;
    f->flags = flags;
    if (len) memcpy(f->data, payload, len);
    return ioctl(dev, VFIO_DEVICE_FEATURE, f) ? errno : 0;
}

static int start(int dev, uint64_t page_size, struct vfio_device_feature_dma_logging_range *r,
                 uint32_t n, size_t argsz) {
    struct vfio_device_feature_dma_logging_control c = {
        .page_size = page_size, .num_ranges = n, .ranges = (uintptr_t)r};
    return feature(dev, F_SET | LOG_START, &c,
                   sizeof(c), argsz ? argsz : sizeof(struct vfio_device_feature) + sizeof(c));
}

static int report(int dev, uint64_t iova, uint64_t length, uint64_t page_size, void *bitmap) {
    struct vfio_device_feature_dma_logging_report r = {
        .iova = iova, .length = length, .page_size = page_size, .bitmap = (uintptr_t)bitmap};
    return feature(dev, F_GET | LOG_REPORT, &r,
                   sizeof(r), sizeof(struct vfio_device_feature) + sizeof(r));
}

static int set_state(int dev, uint32_t state) {
    struct vfio_device_feature_mig_state s = {.device_state = state, .data_fd = -1};
    return feature(dev, VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &s,
                   sizeof(s), sizeof(struct vfio_device_feature) + sizeof(s));
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int container = open("/dev/vfio/vfio", O_RDWR);
    char path[64];
    snprintf(path, sizeof(path), "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (container < 0 || group < 0) { perror("open"); return 1; }
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) { perror("set_container"); return 1; }
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) { perror("set_iommu"); return 1; }
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (dev < 0) { perror("get_device_fd"); return 1; }
    unsigned char *mem = mmap(NULL, PAGES * PG, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)mem, .iova = IOVA, .size = PAGES * PG};
    printf("map %d\n", ioctl(container, VFIO_IOMMU_MAP_DMA, &map) ? errno : 0);
    printf("stop_first %d\n", set_state(dev, VFIO_DEVICE_STATE_STOP));

    struct vfio_device_feature_dma_logging_range ok = {IOVA, PAGES * PG};
    struct vfio_device_feature_dma_logging_range many[257];
    for (int i = 0; i < 257; i++) many[i] = (typeof(many[0])){IOVA + i * 2 * PG, PG};
    struct vfio_device_feature_dma_logging_range unaligned = {IOVA + 0x800, PG};
    struct vfio_device_feature_dma_logging_range wrap = {0xfffffffffffff000ULL, PG};
    struct vfio_device_feature_dma_logging_range overlap[2] = {{IOVA, 4 * PG}, {IOVA + 3 * PG, PG}};
    size_t hdr = sizeof(struct vfio_device_feature);

    printf("probe_set_start %d\n", feature(dev, F_PROBE | F_SET | LOG_START, NULL, 0, hdr));
    printf("probe_get_start %d\n", feature(dev, F_PROBE | F_GET | LOG_START, NULL, 0, hdr));
    printf("probe_get_report %d\n", feature(dev, F_PROBE | F_GET | LOG_REPORT, NULL, 0, hdr));
    printf("set_report %d\n", feature(dev, F_SET | LOG_REPORT, NULL, 0, hdr + 32));
    printf("start_short_argsz %d\n", start(dev, PG, &ok, 1, hdr + 23));
    printf("start_no_ranges %d\n", start(dev, PG, &ok, 0, 0));
    printf("start_257_ranges %d\n", start(dev, PG, many, 257, 0));
    printf("start_bad_ranges_ptr %d\n", start(dev, PG, (void *)8, 1, 0));
    printf("start_unaligned %d\n", start(dev, PG, &unaligned, 1, 0));
    printf("start_overflow %d\n", start(dev, PG, &wrap, 1, 0));
    printf("start_overlap %d\n", start(dev, PG, overlap, 2, 0));
    uint64_t bitmap[2] = {0, 0};
    printf("report_without_start %d\n", report(dev, IOVA, PAGES * PG, PG, bitmap));
    printf("start %d\n", start(dev, PG, &ok, 1, 0));
    struct vfio_device_feature_dma_logging_control *back =
        (void *)((struct vfio_device_feature *)buf)->data;
    printf("page_size %llu\n", (unsigned long long)back->page_size);
    printf("start_again %d\n", start(dev, PG, &ok, 1, 0));
    printf("report_small_page %d\n", report(dev, IOVA, PAGES * PG, 2048, bitmap));
    printf("report_overflow %d\n", report(dev, 0xfffffffffffff000ULL, PG, PG, bitmap));
    printf("report_outside %d\n", report(dev, IOVA - PG, 2 * PG, PG, bitmap));
    printf("report_bad_bitmap %d\n", report(dev, IOVA, PAGES * PG, PG, (void *)8));

    unsigned char *snap = malloc(PAGES * PG);
    memcpy(snap, mem, PAGES * PG);
    printf("running %d\n", set_state(dev, VFIO_DEVICE_STATE_RUNNING));
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    printf("stopped %d\n", set_state(dev, VFIO_DEVICE_STATE_STOP));
    uint64_t changed = 0;
    for (int p = 0; p < PAGES; p++)
        if (memcmp(mem + p * PG, snap + p * PG, PG)) changed |= 1ULL << p;
    printf("report %d\n", report(dev, IOVA, PAGES * PG, PG, bitmap));
    printf("changed 0x%llx\n", (unsigned long long)changed);
    printf("bitmap 0x%llx\n", (unsigned long long)bitmap[0]);
    printf("bitmap_word1 0x%llx\n", (unsigned long long)bitmap[1]);
    bitmap[0] = 0;
    printf("report_again %d\n", report(dev, IOVA, PAGES * PG, PG, bitmap));
    printf("bitmap_again 0x%llx\n", (unsigned long long)bitmap[0]);
    printf("stop_logging %d\n", feature(dev, F_SET | LOG_STOP, NULL, 0, hdr));
    printf("report_after_stop %d\n", report(dev, IOVA, PAGES * PG, PG, bitmap));
    return 0;
}
"""


@pytest.fixture(scope="module")
def dmalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = None
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        reason = "fakevfio run needs Linux on x86-64"
    elif os.geteuid() != 0:
        reason = "fakevfio run needs root (mount namespace, pidfd_getfd)"
    elif shutil.which("gcc") is None:
        reason = "gcc is missing"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("c")
    (work / "dmalog.c").write_text(C_SOURCE)
    exe = work / "dmalog"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(work / "dmalog.c")], check=True
    )
    return exe


def test_dma_logging_through_the_real_ioctl_path(
    dmalog: Path, fakevfio_mount: MountFactory
) -> None:
    with fakevfio_mount(["d0=ram:size=64K,dma_rate=1M,seed=3"]) as m:
        group = json.loads((m.path / "devices" / "d0" / "info").read_text())["iommu_group"]
        cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(m.path), "--"]
        done = subprocess.run(
            [*cmd, str(dmalog), str(group), "d0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        r = dict(line.split(" ", 1) for line in done.stdout.splitlines())
        expected = {
            "map": 0,
            "stop_first": 0,
            "probe_set_start": 0,
            "probe_get_start": errno.EINVAL,  # START is SET-only
            "probe_get_report": 0,
            "set_report": errno.EINVAL,  # REPORT is GET-only
            "start_short_argsz": errno.EINVAL,
            "start_no_ranges": errno.EINVAL,
            "start_257_ranges": errno.E2BIG,
            "start_bad_ranges_ptr": errno.EFAULT,
            "start_unaligned": errno.EINVAL,
            "start_overflow": errno.EOVERFLOW,
            "start_overlap": errno.EINVAL,
            "report_without_start": errno.EINVAL,
            "start": 0,
            "page_size": 4096,
            "start_again": errno.EINVAL,
            "report_small_page": errno.EINVAL,
            "report_overflow": errno.EOVERFLOW,
            "report_outside": errno.EINVAL,
            "report_bad_bitmap": errno.EFAULT,
            "running": 0,
            "stopped": 0,
            "report": 0,
            "report_again": 0,
            "stop_logging": 0,
            "report_after_stop": errno.EINVAL,
        }
        assert {k: int(r[k]) for k in expected} == expected, done.stdout
        # the pages whose content changed in the program's own memory, as the kernel reports
        assert int(r["changed"], 16) != 0
        assert r["bitmap"] == r["changed"]
        assert r["bitmap_word1"] == "0x0"  # one word for 64 pages; the next is untouched
        assert r["bitmap_again"] == "0x0"  # REPORT cleared what it reported
