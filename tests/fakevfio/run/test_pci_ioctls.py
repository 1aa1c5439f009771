"""The PCI surface through the real ioctl path: a C program built on the system's
<linux/vfio.h> and <linux/pci_regs.h> runs under ``fakevfio run`` and probes a device
as a VMM does (VFIO_DEVICE_GET_INFO, GET_REGION_INFO for every index, config space
through the config region's offset: the capability walk, BAR sizing probes, the
memory enable; BAR reads and writes through the device fd), and the supervisor's
region-info handler is called in-process for the argsz and struct-size rules.

Expected values are the kernel's: ``vfio_pci_ioctl_get_info`` and
``vfio_pci_ioctl_get_region_info`` (drivers/vfio/pci/vfio_pci_core.c: BAR size =
``pci_resource_len``, READ|WRITE; no ROM: size 0, no flags; no VGA: EINVAL; index
past the regions: EINVAL; argsz < 32: EINVAL), ``vfio_pci_bar_rw`` and
``vfio_config_do_rw`` (vfio_pci_rdwr.c, vfio_pci_config.c).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakevfio._run import Vfio
from fakevfio._run._caller import HeldFiles
from fakevfio._run._nodes import MountNodes
from tests.conftest import MountFactory
from tests.fakevfio.run.test_handlers import ARG, Caller, Env, _bound
from vfio_uapi import abi as uapi

pytestmark = pytest.mark.fuse

PROBE_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vfio.h>
#include <linux/pci_regs.h>

static int fd;
static uint64_t cfg_off;

static int err_of(long rc) { return rc < 0 ? errno : 0; }
static uint32_t cfg_read(int off, int size) {
    uint32_t v = 0;
    if (pread(fd, &v, size, cfg_off + off) != size) { perror("config pread"); exit(3); }
    return v;
}
static void cfg_write(int off, uint32_t v, int size) {
    if (pwrite(fd, &v, size, cfg_off + off) != size) { perror("config pwrite"); exit(3); }
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int container = open("/dev/vfio/vfio", O_RDWR);
    int group = open(argv[1], O_RDWR);
    if (container < 0 || group < 0) { perror("open"); return 2; }
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) return 4;
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) return 5;
    fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (fd < 0) { perror("get device fd"); return 2; }

    struct vfio_device_info di = { .argsz = sizeof di };
    int rc = err_of(ioctl(fd, VFIO_DEVICE_GET_INFO, &di));
    printf("info %d flags %u regions %u irqs %u\n", rc, di.flags, di.num_regions, di.num_irqs);
    for (unsigned i = 0; i <= VFIO_PCI_NUM_REGIONS; i++) {
        struct vfio_region_info ri = { .argsz = sizeof ri, .index = i };
        rc = err_of(ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &ri));
        printf("region %u rc %d size %llu flags %u offset %llu\n", i, rc,
               (unsigned long long)ri.size, ri.flags, (unsigned long long)ri.offset);
        if (i == VFIO_PCI_CONFIG_REGION_INDEX) cfg_off = ri.offset;
    }
    /* the capability walk, as lspci and QEMU's vfio_add_capabilities do */
    if (cfg_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST) {
        for (uint8_t pos = cfg_read(PCI_CAPABILITY_LIST, 1) & ~3, n = 0; pos && n < 48; n++) {
            uint8_t id = cfg_read(pos + PCI_CAP_LIST_ID, 1);
            printf("cap %u at %u\n", id, pos);
            if (id == PCI_CAP_ID_MSI)
                printf("msi_flags %u\n", cfg_read(pos + PCI_MSI_FLAGS, 2));
            if (id == PCI_CAP_ID_MSIX)
                printf("msix_flags %u table %u pba %u\n", cfg_read(pos + PCI_MSIX_FLAGS, 2),
                       cfg_read(pos + PCI_MSIX_TABLE, 4), cfg_read(pos + PCI_MSIX_PBA, 4));
            pos = cfg_read(pos + PCI_CAP_LIST_NEXT, 1) & ~3;
        }
    }
    printf("pin %u\n", cfg_read(PCI_INTERRUPT_PIN, 1));
    /* BAR sizing: save, write all-ones, read, restore (drivers/pci/probe.c) */
    for (int i = 0; i < 6; i++) {
        int reg = PCI_BASE_ADDRESS_0 + 4 * i;
        uint32_t orig = cfg_read(reg, 4);
        cfg_write(reg, 0xffffffffu, 4);
        printf("bar %d orig %u probe %u\n", i, orig, cfg_read(reg, 4));
        cfg_write(reg, orig, 4);
    }
    cfg_write(PCI_VENDOR_ID, 0xffffffffu, 4);
    printf("ids_after_write %u\n", cfg_read(PCI_VENDOR_ID, 4));
    char past[4];
    printf("config_past_end %d\n", err_of(pread(fd, past, 4, cfg_off + 254)));
    /* BAR0 through the device fd: EIO until memory decoding is on */
    uint64_t bar0 = (uint64_t)VFIO_PCI_BAR0_REGION_INDEX << 40;
    uint32_t word = 0;
    printf("bar0_memory_off %d\n", err_of(pread(fd, &word, 4, bar0)));
    cfg_write(PCI_COMMAND, cfg_read(PCI_COMMAND, 2) | PCI_COMMAND_MEMORY, 2);
    long backing = atol(getenv("BACKING"));
    long size = atol(getenv("BAR_SIZE"));
    long n;
    word = 0x11223344;
    printf("bar0_write_past_backing %ld\n", (long)pwrite(fd, &word, 4, bar0 + backing + 64));
    word = 0xffffffff;
    n = pread(fd, &word, 4, bar0 + backing + 64);
    printf("bar0_read_past_backing %ld value %u\n", n, word);
    word = 0xabcdef01;
    printf("bar0_write_inside %ld\n", (long)pwrite(fd, &word, 4, bar0 + 8));
    word = 0;
    n = pread(fd, &word, 4, bar0 + 8);
    printf("bar0_read_inside %ld value %u\n", n, word);
    printf("bar0_read_at_end %d\n", err_of(pread(fd, &word, 4, bar0 + size)));
    char two[8];
    printf("bar0_read_straddling %ld\n", (long)pread(fd, two, 8, bar0 + size - 2));
    uint64_t bar5 = (uint64_t)VFIO_PCI_BAR5_REGION_INDEX << 40;
    uint32_t ctrl = 0;
    n = pread(fd, &ctrl, 4, bar5 + 12);
    printf("msix_vector0_ctrl %ld value %u\n", n, ctrl);
    printf("bar1_read %d\n", err_of(pread(fd, &word, 4, (uint64_t)1 << 40)));
    printf("rom_read %d\n", err_of(pread(fd, &word, 4, (uint64_t)VFIO_PCI_ROM_REGION_INDEX << 40)));
    return 0;
}
"""


def _unavailable() -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "fakevfio run needs Linux on x86-64"
    if os.geteuid() != 0:
        return "fakevfio run needs root (mount namespace, pidfd_getfd)"
    if shutil.which("gcc") is None:
        return "gcc is missing"
    return None


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("pci_c")
    (work / "pci_probe.c").write_text(PROBE_C)
    exe = work / "pci_probe"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(work / "pci_probe.c")], check=True
    )
    return exe


def _lines(out: str) -> dict[str, list[str]]:
    """First word -> the rest of the line's words (last line of that word wins)."""
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        words = line.split()
        if words:
            result[" ".join(words[:2]) if words[0] in ("region", "bar", "cap") else words[0]] = (
                words
            )
    return result


def test_c_program_sees_vfio_pci_regions_config_and_bars(
    probe: Path, fakevfio_mount: MountFactory
) -> None:
    with fakevfio_mount(["p48=ram:size=48M,seed=9"]) as m:
        info = m.info("p48")
        env = {**os.environ, "BACKING": str(48 << 20), "BAR_SIZE": str(64 << 20)}
        group = f"/dev/vfio/{info['iommu_group']}"
        cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(m.path), "--"]
        done = subprocess.run(
            [*cmd, str(probe), group, "p48"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        r = _lines(done.stdout)
        flags = uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET
        assert r["info"] == ["info", "0", "flags", str(flags), "regions", "9", "irqs", "5"]
        rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        expected = {0: (64 << 20, rw), 5: (8192, rw), 7: (256, rw)}
        for index in range(7):  # BARs, ROM and config
            size, fl = expected.get(index, (0, 0))
            words = r[f"region {index}"]
            assert words[3:8:2] == ["0", str(size), str(fl)], words
            assert words[9] == str(index << 40)
        assert r["region 7"][3:8:2] == ["0", "256", str(rw)]
        assert r["region 8"][3] == str(errno.EINVAL)  # VGA: not a VGA device
        assert r["region 9"][3] == str(errno.EINVAL)
        assert r["cap 5"] == ["cap", "5", "at", "96"]  # MSI at 0x60
        assert r["cap 17"] == ["cap", "17", "at", "112"]  # MSI-X at 0x70
        assert r["msi_flags"] == ["msi_flags", str(0x80)]  # 64-bit, 1 vector, disabled
        assert r["msix_flags"] == ["msix_flags", "3", "table", "5", "pba", str(4096 | 5)]
        assert r["pin"] == ["pin", "1"]
        assert r["bar 0"][3:] == ["0", "probe", str(0xFC000000)]  # 64 MiB, 32-bit memory
        assert r["bar 5"][3:] == ["0", "probe", str(0xFFFFE000)]  # the 8 KiB MSI-X BAR
        for index in (1, 2, 3, 4):
            assert r[f"bar {index}"][3:] == ["0", "probe", "0"]
        assert r["ids_after_write"] == ["ids_after_write", str(0x10F01AF4)]
        assert r["config_past_end"] == ["config_past_end", str(errno.EFAULT)]
        assert r["bar0_memory_off"] == ["bar0_memory_off", str(errno.EIO)]
        assert r["bar0_write_past_backing"][1] == "4"  # accepted, dropped
        assert r["bar0_read_past_backing"][1:] == ["4", "value", "0"]
        assert r["bar0_write_inside"][1] == "4"
        assert r["bar0_read_inside"][1:] == ["4", "value", str(0xABCDEF01)]
        assert r["bar0_read_at_end"][1] == str(errno.EINVAL)
        assert r["bar0_read_straddling"][1] == "2"  # cut short at the BAR's end
        assert r["msix_vector0_ctrl"][1:] == ["4", "value", "1"]  # masked at reset
        assert r["bar1_read"][1] == str(errno.EINVAL)
        assert r["rom_read"][1] == str(errno.EINVAL)
        # the C program's BAR write landed in the device's state
        assert m.read_bytes(m.file("p48", "regions/bar0"))[8:12] == bytes.fromhex("01efcdab")


@pytest.fixture
def env48(fakevfio_mount: MountFactory) -> Iterator[Env]:
    with fakevfio_mount(["gpu0=ram:size=48K,seed=7"]) as m:
        info = json.loads((m.path / "devices" / "gpu0" / "info").read_text())
        nodes = MountNodes.open(m.path)
        files = HeldFiles(nodes.dev)
        caller = Caller(Vfio(nodes, files))
        vfio_dir = m.path / "dev" / "vfio"
        try:
            yield Env(
                caller,
                m.path,
                vfio_dir / "devices" / info["cdev"],
                vfio_dir / str(info["iommu_group"]),
            )
        finally:
            files.close()
            for fd in caller.fds:
                os.close(fd)


def test_region_info_argsz_index_and_struct_size(env48: Env) -> None:
    c = env48.caller
    dev, _iommu, _ioas = _bound(env48)
    region = uapi.VFIO_DEVICE_GET_REGION_INFO
    rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
    c.mem.buf[ARG + 32 : ARG + 40] = b"\xde\xad\xbe\xef" * 2
    assert c.ioctl(dev, region, uapi.REGION_INFO.pack(40, 0, 0, 0, 0, 0)) == 0
    argsz, flags, index, cap, size, offset = uapi.REGION_INFO.unpack_from(c.mem.buf, ARG)
    assert (argsz, flags, index, cap, size, offset) == (40, rw, 0, 0, 64 << 10, 0)
    assert bytes(c.mem.buf[ARG + 32 : ARG + 40]) == b"\xde\xad\xbe\xef" * 2  # only 32 bytes
    for bad in (uapi.VFIO_PCI_VGA_REGION_INDEX, 9, 0xFFFFFFFF):
        request = uapi.REGION_INFO.pack(32, 0, bad, 0, 0, 0)
        assert c.err(dev, region, request) == errno.EINVAL
        assert bytes(c.mem.buf[ARG : ARG + 32]) == request  # nothing written back
    assert c.err(dev, region, uapi.REGION_INFO.pack(31, 0, 0, 0, 0, 0)) == errno.EINVAL
    assert c.ioctl(dev, region, uapi.REGION_INFO.pack(32, 7, 6, 5, 4, 3)) == 0  # ROM
    assert uapi.REGION_INFO.unpack_from(c.mem.buf, ARG) == (32, 0, 6, 0, 0, 6 << 40)
