"""The PCI surface of a device (fakevfio/_pci.py) against the kernel's and the spec's rules.

The rules come from drivers/vfio/pci/vfio_pci_config.c (the write masks of
``init_pci_cap_basic_perm``, ``init_pci_cap_msi_perm``, ``init_pci_cap_exp_perm``;
``vfio_bar_fixup`` for BAR reads; ``vfio_msi_config_write`` for the queue size
clamp), drivers/vfio/pci/vfio_pci_rdwr.c (BAR and config accesses through the
device fd), drivers/pci/probe.c (how Linux sizes a BAR from what a probe of
all-ones reads back), and include/uapi/linux/pci_regs.h. The capability chain
is walked as ``lspci`` does, and, where pciutils is installed, ``lspci -F``
itself decodes a dump of the config space.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fakevfio import _pci
from fakevfio._device import Device
from fakevfio._pci import PciLayout, PciSpace, pci_space
from fakevfio._ram import RamDriver
from fakevfio._tree import VFIO_PCI_OFFSET_SHIFT, _node_io
from fakevfio.driver import ArcDriver, Bar, BarKind, LoadStream, SaveStream
from fakevfio.errors import DeviceError
from tests.conftest import MountFactory
from vfio_uapi.fsm import MigFlags, State

CONFIG = 7 << VFIO_PCI_OFFSET_SHIFT
FLAGS = "STOP_COPY+P2P+PRE_COPY"


class PciDriver(ArcDriver):
    """A driver that only declares a PCI surface (subclassed per test)."""

    description = "PCI surface test driver"
    backing: ClassVar[dict[str, int]] = {"bar0": 48 << 20}
    declared: ClassVar[dict[int, Bar] | None] = None
    status = 0

    def __init__(self, name: str = "p0", options: Mapping[str, str] | None = None) -> None:
        super().__init__(name, options or {})
        self.written: list[tuple[str, int, bytes]] = []

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY

    def initial_config(self) -> bytes:
        cfg = bytearray(self.config_size)
        struct.pack_into("<HHHH", cfg, 0, 0x1234, 0xABCD, 0, self.status)
        cfg[8:12] = bytes([0x07, 0x02, 0x00, 0x02])  # revision 7, class 0x020000 (Ethernet)
        struct.pack_into("<HH", cfg, 0x2C, 0x1AF4, 0x1100)  # subsystem vendor / id
        cfg[0x40:0x44] = b"dev!"  # device-specific bytes before the capabilities
        return bytes(cfg)

    def regions(self) -> Mapping[str, int]:
        return self.backing

    def bars(self) -> Mapping[int, Bar]:
        return self.declared if self.declared is not None else super().bars()

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        return bytes((offset + i) & 0xFF for i in range(size))

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        self.written.append((region, offset, bytes(data)))

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        return None

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return 0

    def digest(self) -> str:
        return "0" * 64


def driver(**attributes: Any) -> PciDriver:
    cls = type("Declared", (PciDriver,), attributes)
    made = cls()
    assert isinstance(made, PciDriver)
    return made


def device(**attributes: Any) -> Device:
    return Device("p0", "pci", driver(**attributes), 0)


def u16(dev: Device, offset: int) -> int:
    return int.from_bytes(dev.config_read(offset, 2), "little")


def u32(dev: Device, offset: int) -> int:
    return int.from_bytes(dev.config_read(offset, 4), "little")


def put(dev: Device, offset: int, value: int, size: int = 4) -> None:
    assert dev.config_write(offset, memoryview(value.to_bytes(size, "little"))) == size


def linux_bar_size(readback: int, io: bool) -> int:
    """drivers/pci/probe.c pci_size(): the lowest set bit of the address bits read back."""
    size = readback & (~0x3 if io else ~0xF) & 0xFFFFFFFF
    return size & -size


def capability_chain(config: bytes) -> list[tuple[int, int]]:
    """(offset, id) of each capability, walked as lspci does (status bit 4, 0x34, next)."""
    if not config[6] & 0x10:
        return []
    chain: list[tuple[int, int]] = []
    pos = config[0x34] & ~3
    while pos and len(chain) < 48:
        chain.append((pos, config[pos]))
        pos = config[pos + 1] & ~3
    return chain


# ---------------------------------------------------------------------------
# BARs: sizing probe, type bits, 64-bit pairs (vfio_bar_fixup, Rule 5)


def test_sizing_probe_reads_the_size_mask_with_the_type_bits() -> None:
    dev = device(
        backing={"bar0": 48 << 20, "bar2": 8 << 30, "bar4": 8},
        declared={
            0: Bar(size=64 << 20),
            2: Bar(size=8 << 30, kind=BarKind.MEM64, prefetchable=True),
            4: Bar(size=8, kind=BarKind.IO),
        },
    )
    assert [u32(dev, 0x10 + 4 * i) for i in range(6)] == [0, 0, 0xC, 0, 0x1, 0]
    for i in range(6):
        put(dev, 0x10 + 4 * i, 0xFFFFFFFF)
    bars = [u32(dev, 0x10 + 4 * i) for i in range(6)]
    assert bars[0] == 0xFC000000  # 64M, 32-bit, non-prefetchable
    assert linux_bar_size(bars[0], io=False) == 64 << 20
    assert bars[1] == 0  # unimplemented BARs read 0 ("Unmapped by host = unimplemented")
    assert bars[2] == 0x0000000C  # 64-bit prefetchable; the low 32 address bits are all size
    assert bars[3] == 0xFFFFFFFE  # upper half: ~(8G - 1) >> 32
    size64 = (bars[3] << 32 | bars[2]) & ~0xF
    assert size64 & -size64 == 8 << 30
    assert bars[4] == 0xFFFFFFF9  # 8-byte I/O BAR: bit 0 set, bit 1 reserved 0
    assert linux_bar_size(bars[4], io=True) == 8
    assert bars[5] == 0
    assert u32(dev, 0x30) == 0  # no expansion ROM
    put(dev, 0x30, 0xFFFFFFFF)
    assert u32(dev, 0x30) == 0


def test_bar_addresses_stick_within_the_mask_and_type_bits_are_read_only() -> None:
    dev = device(declared={0: Bar(size=64 << 20, prefetchable=True)})
    put(dev, 0x10, 0xF4123457)  # address bits below the size and the type bits do not stick
    assert u32(dev, 0x10) == 0xF4000008
    put(dev, 0x12, 0xE800, 2)  # a 2-byte write of the upper word (as the kernel allows)
    assert u32(dev, 0x10) == 0xE8000008


def test_default_bars_are_the_power_of_two_over_the_backing() -> None:
    layout = PciLayout.from_driver(driver(backing={"bar0": 151552, "bar1": 100}), 256)
    assert layout.bars[0] == Bar(size=256 << 10)
    assert layout.bars[1] == Bar(size=4096)
    big = PciLayout.from_driver(driver(backing={"bar0": (2 << 30) + 1}), 256)
    assert big.bars[0] == Bar(size=4 << 30, kind=BarKind.MEM64, prefetchable=True)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"declared": {0: Bar(size=48 << 20)}}, "not a power of two"),
        ({"declared": {0: Bar(size=2048)}}, "at least 4096"),
        ({"declared": {0: Bar(size=2, kind=BarKind.IO)}, "backing": {}}, "at least 4 bytes"),
        ({"declared": {0: Bar(size=8, kind=BarKind.IO, prefetchable=True)}}, "prefetchable"),
        ({"declared": {0: Bar(size=4 << 30)}, "backing": {}}, "at most 2 GiB"),
        ({"declared": {5: Bar(size=4096, kind=BarKind.MEM64)}, "backing": {}}, "BAR 5"),
        (
            {"declared": {0: Bar(size=1 << 26, kind=BarKind.MEM64), 1: Bar(size=4096)}},
            "upper half",
        ),
        ({"declared": {6: Bar(size=4096)}, "backing": {}}, "expected 0..5"),
        ({"declared": {0: Bar(size=1 << 24)}}, "larger than BAR 0"),
        ({"declared": {}, "backing": {"bar3": 10}}, "region bar3 has no BAR"),
        ({"interrupt_pin": 5}, "interrupt_pin 5"),
        ({"msi_vectors": 3}, "msi_vectors 3"),
        ({"msix_vectors": 2049}, "msix_vectors 2049"),
        ({"msix_vectors": 1, "msix_bar": 0}, "msix_bar 0 is not a free"),
        ({"pcie": True}, "config_size 4096"),
    ],
)
def test_bad_declarations_are_refused_with_what_to_change(
    attributes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        PciLayout.from_driver(driver(**attributes), 256)
    assert "device p0" in str(info.value)


def test_a_full_bar_table_leaves_no_room_for_msix() -> None:
    bars = {i: Bar(size=4096) for i in range(6)}
    with pytest.raises(ValueError, match="no free BAR index"):
        PciLayout.from_driver(driver(declared=bars, backing={}, msix_vectors=2), 256)


# ---------------------------------------------------------------------------
# The header: read-only IDs, command and status (init_pci_cap_basic_perm)


def test_header_ids_are_the_drivers_and_read_only() -> None:
    dev = device(interrupt_pin=2)
    before = dev.config_bytes()
    assert before[0:4] == bytes.fromhex("3412cdab")
    assert before[8:12] == bytes([0x07, 0x02, 0x00, 0x02])
    assert before[0x2C:0x30] == bytes.fromhex("f41a0011")
    assert before[0x40:0x44] == b"dev!"
    for offset in (0x00, 0x08, 0x0C, 0x2C, 0x34, 0x3C):
        dev.config_write(offset, memoryview(b"\xff" * 4))
    after = dev.config_bytes()
    assert after[0:4] == before[0:4]  # vendor, device
    assert after[8:12] == before[8:12]  # revision, class
    assert after[0x2C:0x30] == before[0x2C:0x30]  # subsystem
    assert after[0x0E] == 0  # header type
    assert after[0x0C:0x0E] == b"\xff\xff"  # cache line size, latency timer: writable
    assert after[0x0F] == 0  # BIST: not capable
    assert after[0x34] == before[0x34]  # capabilities pointer
    assert after[0x3C] == 0xFF  # interrupt line: writable
    assert after[0x3D] == 2  # interrupt pin: the driver's declaration, read-only
    put(dev, 0x40, 0x12345678)  # between header and capabilities: raw, as vfio-pci
    assert u32(dev, 0x40) == 0x12345678


def test_command_writable_bits_and_status_write_one_to_clear() -> None:
    dev = device(msi_vectors=1, status=0x8100)  # parity error bits set by "hardware"
    put(dev, 0x04, 0xFFFF, 2)
    assert u16(dev, 0x04) == 0x0547  # IO, MEMORY, MASTER, PARITY, SERR, INTX_DISABLE
    put(dev, 0x04, 0, 2)
    assert u16(dev, 0x04) == 0
    assert u16(dev, 0x06) == 0x8110  # bit 4: the capability list
    put(dev, 0x06, 0x0010, 2)  # writing 1 to CAP_LIST changes nothing; 0 keeps the error bits
    assert u16(dev, 0x06) == 0x8110
    put(dev, 0x06, 0x8000, 2)
    assert u16(dev, 0x06) == 0x0110
    put(dev, 0x04, 0xFFFF0000)  # a dword write of command+status: status bits cleared
    assert u16(dev, 0x06) == 0x0010
    assert u16(dev, 0x04) == 0


def test_bad_config_writes_change_nothing() -> None:
    dev = device(msi_vectors=1)
    before = dev.config_bytes()
    for offset, data in ((255, b"ab"), (256, b"a"), (-1, b"a"), (0, b"x" * 257)):
        with pytest.raises(DeviceError) as info:
            dev.config_write(offset, memoryview(data))
        assert info.value.errno == errno.EINVAL
        assert "past the end" in str(info.value)
    assert dev.config_bytes() == before


# ---------------------------------------------------------------------------
# Capabilities: the chain, MSI, MSI-X, PCI Express


def test_capability_chain_walks_like_lspci() -> None:
    dev = device(msi_vectors=4, msix_vectors=16, interrupt_pin=1)
    config = dev.config_bytes()
    assert capability_chain(config) == [(0x60, 0x05), (0x70, 0x11)]
    assert capability_chain(device().config_bytes()) == []
    assert not device().config_bytes()[6] & 0x10  # no list: status bit 4 clear
    pcie = device(config_size=4096, pcie=True, msi_vectors=1)
    chain = capability_chain(pcie.config_bytes())
    assert chain == [(0x60, 0x05), (0x70, 0x10)]
    assert pcie.config_bytes()[0x100:0x104] == bytes(4)  # empty extended list
    flags = u16(pcie, 0x72)
    assert flags & 0xF == 2  # PCI_EXP_FLAGS_VERS 2
    assert flags >> 4 & 0xF == 0  # PCI_EXP_TYPE_ENDPOINT


def test_msi_control_follows_vfio_msi_config_write() -> None:
    dev = device(msi_vectors=4)
    assert u16(dev, 0x62) == 0x0084  # 64-bit, multiple message capable = 4 (QMASK 2)
    put(dev, 0x62, 0x0071, 2)  # enable + ask for 32 vectors
    assert u16(dev, 0x62) == 0x00A4  # QSIZE clamped to 4; enable dropped (MSI not enabled)
    dev.irqs.active = 1  # SET_IRQS enabled MSI (VFIO_PCI_MSI_IRQ_INDEX)
    put(dev, 0x62, 0x0011, 2)
    assert u16(dev, 0x62) == 0x0095  # enable sticks, QSIZE 2 kept
    put(dev, 0x62, 0xFFFF, 2)  # the upper byte and QMASK/64BIT are read-only
    assert u16(dev, 0x62) == 0x00A5
    put(dev, 0x64, 0xFEE01004)  # address low, high and data: writable
    put(dev, 0x68, 0x00000001)
    put(dev, 0x6C, 0x4041, 2)
    assert (u32(dev, 0x64), u32(dev, 0x68), u16(dev, 0x6C)) == (0xFEE01004, 1, 0x4041)
    assert dev.config_read(0x60, 2) == b"\x05\x00"  # id and next: read-only
    put(dev, 0x60, 0xFFFF, 2)
    assert dev.config_read(0x60, 2) == b"\x05\x00"


def test_msix_capability_is_read_only_and_points_at_its_bar() -> None:
    dev = device(msix_vectors=16)
    layout = pci_space(dev).layout
    assert layout.msix is not None
    assert layout.msix.bar == 5  # the highest free index
    assert layout.bars[5] == Bar(size=8192)  # table 256 bytes at 0, PBA at 4096
    before = dev.config_read(0x60, 12)
    assert before == bytes.fromhex("11000f000500000005100000")
    for offset in range(0x60, 0x6C, 2):
        put(dev, offset, 0xFFFF, 2)
    assert dev.config_read(0x60, 12) == before  # vfio-pci drops writes (no writefn)
    chosen = pci_space(device(msix_vectors=1, msix_bar=3)).layout
    assert chosen.msix is not None
    assert chosen.msix.bar == 3
    big = pci_space(device(msix_vectors=2048)).layout
    assert big.msix is not None
    assert (big.msix.pba_offset, big.bars[5].size) == (32768, 65536)


def test_pcie_device_control_status_and_flr() -> None:
    dev = device(config_size=4096, pcie=True)
    at = 0x60
    assert u16(dev, at + 8) == 0x2810
    put(dev, at + 8, 0xFFFF, 2)
    assert u16(dev, at + 8) == 0x7DFF  # phantom functions (bit 9) read-only, FLR (15) reads 0
    put(dev, at + 40, 0xFFFF, 2)
    assert u16(dev, at + 40) == 0xFFDF  # DEVCTL2 but ARI
    put(dev, at + 4, 0xFFFFFFFF)
    assert u32(dev, at + 4) == 0x8000  # device capabilities: read-only
    put(dev, at + 18, 0, 2)
    assert u16(dev, at + 18) == 0x0011  # link status: read-only (x1, 2.5 GT/s)


# ---------------------------------------------------------------------------
# BAR regions: backing, zeros past it, the MSI-X table


def test_bar_region_reads_zeros_past_the_backing_and_drops_writes_there() -> None:
    dev = device(backing={"bar0": 5000})
    drv = dev.driver
    assert isinstance(drv, PciDriver)
    assert dev.region_read("bar0", 4990, 20) == bytes((4990 + i) & 0xFF for i in range(10)) + bytes(
        10
    )
    assert dev.region_read("bar0", 8000, 1000) == bytes(192)  # up to the 8 KiB BAR's end
    assert dev.region_read("bar0", 8192, 1) == b""
    assert dev.region_write("bar0", 4996, memoryview(b"12345678")) == 8
    assert drv.written == [("bar0", 4996, b"1234")]
    assert dev.region_write("bar0", 6000, memoryview(b"xy")) == 2
    assert drv.written == [("bar0", 4996, b"1234")]
    with pytest.raises(DeviceError) as info:
        dev.region_write("bar0", 8190, memoryview(b"xyz"))
    assert info.value.errno == errno.EINVAL
    assert drv.written == [("bar0", 4996, b"1234")]
    assert dev.info(with_digest=False)["bars"] == {
        "0": {"size": 8192, "kind": "mem32", "prefetchable": False, "backing": 5000}
    }


def test_msix_table_starts_masked_and_stores_entries_pba_reads_zero() -> None:
    dev = device(msix_vectors=3)
    table = dev.region_read("bar5", 0, 48)
    for vector in range(3):
        entry = table[16 * vector : 16 * vector + 16]
        assert entry == bytes(12) + b"\x01\x00\x00\x00"  # vector control: masked
    assert pci_space(dev).msix_masked(1)
    dev.region_write("bar5", 16, memoryview(struct.pack("<IIII", 0xFEE00000, 0, 0x41, 0)))
    assert not pci_space(dev).msix_masked(1)
    assert dev.region_read("bar5", 16, 16) == struct.pack("<IIII", 0xFEE00000, 0, 0x41, 0)
    dev.region_write("bar5", 4096, memoryview(b"\xff" * 8))  # PBA: read-only
    assert dev.region_read("bar5", 4096, 8) == bytes(8)
    info = dev.info(with_digest=False)["bars"]
    assert isinstance(info, dict)
    assert info["5"]["msix"] == {"vectors": 3, "table_offset": 0, "pba_offset": 4096}


# ---------------------------------------------------------------------------
# Through the device node, as vfio_pci_rw (vfio_pci_rdwr.c, vfio_config_do_rw)


def test_node_io_follows_vfio_pci_rw() -> None:
    dev = device(
        backing={"bar0": 5000, "bar2": 4},
        declared={0: Bar(size=8192), 2: Bar(size=8, kind=BarKind.IO)},
    )
    assert _node_io(dev, CONFIG, 4, None) == bytes.fromhex("3412cdab")
    for off, size in ((CONFIG + 255, 2), (CONFIG + 256, 1)):
        with pytest.raises(DeviceError) as info:
            _node_io(dev, off, size, None)
        assert info.value.errno == errno.EFAULT
    with pytest.raises(DeviceError) as info:
        _node_io(dev, 0, 4, None)
    assert info.value.errno == errno.EIO  # memory decoding is off
    assert "memory enable" in str(info.value)
    assert _node_io(dev, 2 << VFIO_PCI_OFFSET_SHIFT, 8, None) == bytes([0, 1, 2, 3, 0, 0, 0, 0])
    _node_io(dev, CONFIG + 4, 2, memoryview(b"\x02\x00"))  # command: memory enable
    assert _node_io(dev, 4998, 4, None) == bytes([4998 & 0xFF, 4999 & 0xFF, 0, 0])
    assert _node_io(dev, 8190, 16, None) == bytes(2)  # cut short at the BAR's end
    for off in (
        8192,
        1 << VFIO_PCI_OFFSET_SHIFT,
        6 << VFIO_PCI_OFFSET_SHIFT,
        8 << VFIO_PCI_OFFSET_SHIFT,
    ):
        with pytest.raises(DeviceError) as info:
            _node_io(dev, off, 1, None)
        assert info.value.errno == errno.EINVAL


# ---------------------------------------------------------------------------
# The built-in ram driver and lspci


def test_ram_declares_intx_msi_and_msix() -> None:
    dev = Device("r0", "ram", RamDriver("r0", {"size": "48M", "flags": FLAGS}), 0)
    config = dev.config_bytes()
    assert config[0x3D] == 1
    assert capability_chain(config) == [(0x60, 0x05), (0x70, 0x11)]
    bars = dev.info(with_digest=False)["bars"]
    assert isinstance(bars, dict)
    assert sorted(bars) == ["0", "5"]
    assert bars["0"] == {
        "size": 64 << 20,
        "kind": "mem32",
        "prefetchable": False,
        "backing": 48 << 20,
    }


def _dump(config: bytes) -> str:
    lines = ["00:00.0 Ethernet controller: fakevfio"]
    lines += [
        f"{base:02x}: " + " ".join(f"{b:02x}" for b in config[base : base + 16])
        for base in range(0, len(config), 16)
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
def test_lspci_decodes_the_config_space(tmp_path: Path) -> None:
    dev = device(
        backing={"bar0": 48 << 20, "bar2": 1 << 20, "bar4": 8},
        declared={
            0: Bar(size=64 << 20),
            2: Bar(size=1 << 20, kind=BarKind.MEM64, prefetchable=True),
            4: Bar(size=8, kind=BarKind.IO),
        },
        interrupt_pin=1,
        msi_vectors=8,
        msix_vectors=5,
    )
    put(dev, 0x10, 0xF0000000)
    put(dev, 0x18, 0x00100000)
    put(dev, 0x1C, 0x1)
    put(dev, 0x20, 0xC040)
    dump = tmp_path / "config.dump"
    dump.write_text(_dump(dev.config_bytes()))
    out = subprocess.run(
        ["lspci", "-vvv", "-F", str(dump)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"Interrupt: pin A", out), out
    assert "Region 0: Memory at f0000000 (32-bit, non-prefetchable)" in out, out
    assert "Region 2: Memory at 100100000 (64-bit, prefetchable)" in out, out
    assert "Region 4: I/O ports at c040" in out, out
    assert re.search(r"Capabilities: \[60\] MSI: Enable- Count=1/8 Maskable- 64bit\+", out), out
    assert re.search(r"Capabilities: \[70\] MSI-X: Enable- Count=5 Masked-", out), out
    assert re.search(r"Vector table: BAR=5 offset=00000000", out), out
    assert re.search(r"PBA: BAR=5 offset=00001000", out), out
    assert "Subsystem: Red Hat, Inc." in out or "Subsystem: Device 1af4:1100" in out, out


def test_pci_module_is_pure() -> None:
    source = Path(_pci.__file__).read_text()
    for banned in ("import trio", "import pyfuse3", "import os", "import socket"):
        assert banned not in source
    assert PciSpace.__doc__


def intx_disabled(dev: Device) -> bool:
    return bool(dev.irqs.line.disabled)


def test_config_writes_drive_intx_disable_and_msi_enable_as_vfio_pci() -> None:
    dev = device(interrupt_pin=1, msi_vectors=1)
    put(dev, 0x04, 0x0400, 2)  # PCI_COMMAND_INTX_DISABLE: vfio_basic_config_write masks INTx
    assert intx_disabled(dev)
    put(dev, 0x05, 0x00, 1)  # a byte write of the command's upper half clears it
    assert not intx_disabled(dev)
    put(dev, 0x62, 0x0001, 2)  # MSI enable without SET_IRQS: dropped
    assert u16(dev, 0x62) & 1 == 0
    dev.irqs.active = 1  # VFIO_PCI_MSI_IRQ_INDEX enabled by SET_IRQS
    put(dev, 0x62, 0x0001, 2)
    assert u16(dev, 0x62) & 1 == 1


@pytest.mark.fuse
def test_mount_bar_file_is_the_bar_size_with_zeros_past_the_backing(
    fakevfio_mount: MountFactory,
) -> None:
    with fakevfio_mount(["b0=ram:size=48K,seed=1"]) as m:
        path = m.file("b0", "regions/bar0")
        assert os.stat(path).st_size == 64 << 10  # the BAR, not the 48 KiB state
        before = m.info("b0")["state_digest"]
        fd = os.open(path, os.O_RDWR)
        try:
            assert os.pread(fd, 8, (48 << 10) + 100) == bytes(8)
            assert os.pwrite(fd, b"lost", (48 << 10) + 100) == 4
            assert os.pread(fd, 4, (48 << 10) + 100) == bytes(4)
            assert m.errno_of(os.pwrite, fd, b"x" * 8, (64 << 10) - 4) == errno.EINVAL
            assert os.pread(fd, 16, (64 << 10) - 8) == bytes(8)  # EOF at the BAR's end
        finally:
            os.close(fd)
        assert m.info("b0")["state_digest"] == before  # nothing past the backing is state
        assert len(m.read_bytes(path)) == 64 << 10
