"""Each QEMU of the matrix accepts the PCI surface of fakevfio devices and migrates them.

Devices whose state is not a power of two (``ram`` of 48M and 16M in one VM;
``nic`` at its default options and ``gpu`` with 64M of memory; a PCI Express ``ram`` with 4096
bytes of config space) are given to QEMU as
``-device vfio-pci`` through the iommufd cdev path under ``fakevfio run`` (the
fds are opened inside the private namespace). QEMU sizes each BAR from
``VFIO_DEVICE_GET_REGION_INFO`` and the BAR registers (hw/pci/pci.c asserts a
power of two), builds MSI and MSI-X from the capability list, and SeaBIOS,
running in the source VM, sizes and programs the BARs through config space.
Checked against QEMU: ``query-pci`` lists every BAR with the size, type and
prefetchable bit the device declares, at the address SeaBIOS assigned, and
the destination QEMU, which restores config space itself, leaves the same BAR
registers and command register in the destination device.

The devices run with QEMU's default ``enable-migration=auto``: every device
offers DMA logging, so QEMU needs no ``enable-migration=on``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Qmp
from tests.conftest import MountFactory, MountHandle
from tests.test_qemu import qemu_session

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(300)]

#: QEMU's vfio-pci migration option for these devices: its default.
MIGRATION = "enable-migration=auto"
EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
FLAGS = "STOP_COPY+P2P+PRE_COPY"


def wait_migration(qmp: Qmp, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.1)


def _command(qemu: str, qmp: Path, ids: list[str], *extra: str) -> list[str]:
    """QEMU with fd 3 = /dev/iommu and fds 4.. = the devices' cdevs, in ``ids`` order."""
    devices: list[str] = []
    for n, name in enumerate(ids):
        devices += [
            "-device",
            f"vfio-pci,id={name},iommufd=iommufd0,fd={4 + n},rombar=0,{MIGRATION},"
            "x-migration-multifd-transfer=off",
        ]
    return [
        qemu,
        *("-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none", "-S"),
        *("-m", "64M", "-object", "iommufd,id=iommufd0,fd=3"),
        *devices,
        *("-qmp", f"unix:{qmp},server=on,wait=off"),
        *extra,
    ]


@contextlib.contextmanager
def _qemu(
    qemu: str, mount: MountHandle, tmp: Path, tag: str, ids: list[str], *extra: str
) -> Iterator[Qmp]:
    qmp_path = tmp / f"{tag}.qmp"
    log = tmp / f"{tag}.log"
    opens = " ".join(
        f"{4 + n}<>/dev/vfio/devices/{mount.info(name)['cdev']}" for n, name in enumerate(ids)
    )
    script = f'exec 3<>/dev/iommu {opens} && exec "$@"'
    argv = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount.path), "--"]
    argv += ["sh", "-c", script, "sh", *_command(qemu, qmp_path, ids, *extra)]
    with qemu_session(argv, qmp_path, log) as qmp:
        yield qmp


def _qemu_bars(qmp: Qmp, qdev_id: str) -> dict[int, dict[str, Any]]:
    """The BARs QEMU registered for device ``qdev_id`` (QMP ``query-pci``)."""
    for bus in qmp.cmd("query-pci"):
        for dev in bus["devices"]:
            if dev.get("qdev_id") == qdev_id:
                return {int(r["bar"]): r for r in dev["regions"]}
    raise AssertionError(f"query-pci does not list {qdev_id}")


def _bar_register(config: bytes, index: int) -> int:
    return int.from_bytes(config[0x10 + 4 * index : 0x14 + 4 * index], "little")


def _wait_bars_programmed(mount: MountHandle, name: str, timeout: float = 60) -> bytes:
    """Config space once SeaBIOS assigned an address to every memory BAR and enabled decoding."""
    deadline = time.monotonic() + timeout
    bars = mount.info(name)["bars"]
    while True:
        config = mount.read_bytes(mount.file(name, "config"))
        command = int.from_bytes(config[4:6], "little")
        if command & 0x2 and all(
            _bar_register(config, int(i)) & ~0xF for i, b in bars.items() if b["kind"] != "io"
        ):
            return config
        if time.monotonic() > deadline:
            raise TimeoutError(f"SeaBIOS did not program {name}'s BARs: {config[:0x40].hex()}")
        time.sleep(0.2)


def _check_qemu_sees_our_bars(qmp: Qmp, mount: MountHandle, name: str, config: bytes) -> None:
    ours = mount.info(name)["bars"]
    theirs = _qemu_bars(qmp, name)
    assert sorted(theirs) == sorted(int(i) for i in ours), (theirs, ours)
    for index, bar in ours.items():
        region = theirs[int(index)]
        assert region["size"] == bar["size"], (index, region, bar)
        assert region["type"] == ("io" if bar["kind"] == "io" else "memory")
        if bar["kind"] != "io":
            assert region["prefetch"] == bar["prefetchable"]
            assert region["mem_type_64"] == (bar["kind"] == "mem64")
            low = _bar_register(config, int(index)) & ~0xF
            high = _bar_register(config, int(index) + 1) if bar["kind"] == "mem64" else 0
            assert region["address"] == low | high << 32, (index, region, config[:0x40].hex())


def _migrate(
    qemu: str, src: MountHandle, dst: MountHandle, tmp: Path, ids: list[str]
) -> dict[str, bytes]:
    """Boot the source VM (SeaBIOS programs the BARs), migrate it; each device's source config."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caps = [{"capability": c, "state": True} for c in ("return-path", "switchover-ack")]
    configs: dict[str, bytes] = {}
    with (
        _qemu(qemu, src, tmp, "src", ids) as sq,
        _qemu(qemu, dst, tmp, "dst", ids, "-incoming", "defer") as dq,
    ):
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 1000})
        sq.cmd("cont")
        for name in ids:
            configs[name] = _wait_bars_programmed(src, name)
            _check_qemu_sees_our_bars(sq, src, name, configs[name])
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = wait_migration(sq, timeout=240)
        assert info["status"] == "completed", info
        assert wait_migration(dq)["status"] == "completed"
        for name in ids:
            assert src.info(name)["state"] == "STOP"
            assert dst.info(name)["state"] == "RESUMING" or dst.info(name)["state"] == "STOP"
        src_digests = {name: src.info(name)["state_digest"] for name in ids}
        dq.cmd("cont")
        dq.cmd("stop")
        for name in ids:
            assert dst.info(name)["state_digest"] == src_digests[name], name
            dst_config = dst.read_bytes(dst.file(name, "config"))
            # QEMU restores config space from its stream and writes the command
            # register through to the device (vfio_pci_load_config); the BARs
            # stay in QEMU's emulated config, at the source's addresses.
            assert dst_config[4:6] == configs[name][4:6], name
            _check_qemu_sees_our_bars(dq, dst, name, configs[name])
    log = (tmp / "src.log").read_text() + (tmp / "dst.log").read_text()
    for word in ("BAR", "MSI", "capabilit", "config space"):
        assert word not in log, log
    return configs


def test_two_ram_devices_of_48m_and_16m_migrate_in_one_qemu(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str
) -> None:
    specs = ["r48=ram:size=48M,seed=3", "r16=ram:size=16M,seed=4"]
    with (
        fakevfio_mount([f"{spec},flags={FLAGS}" for spec in specs]) as src,
        fakevfio_mount([f"{spec.split(',')[0]},flags={FLAGS}" for spec in specs]) as dst,
    ):
        assert src.info("r48")["bars"]["0"]["size"] == 64 << 20
        assert src.info("r48")["bars"]["0"]["backing"] == 48 << 20
        _migrate(qemu, src, dst, tmp_path, ["r48", "r16"])


def test_nic_and_gpu_migrate_in_qemu(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, qemu: str
) -> None:
    path = os.pathsep.join([str(EXAMPLES / "nic"), str(EXAMPLES / "gpu")])
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{path}{os.pathsep}{old}".rstrip(os.pathsep))
    extra = ["--driver", "nic=fakevfio_nic:NicDriver", "--driver", "gpu=fakevfio_gpu:GpuDriver"]
    with (
        # gpu's default mem=512M gives the same BAR layout as 64M (BAR2 is a 64-bit
        # prefetchable power of two) with 8 times the bytes to migrate (~50 s per QEMU).
        fakevfio_mount(["nic0=nic:seed=5", "gpu0=gpu:seed=6,mem=64M"], extra_args=extra) as src,
        fakevfio_mount(["nic0=nic", "gpu0=gpu:mem=64M"], extra_args=extra) as dst,
    ):
        nic = src.info("nic0")["bars"]
        assert nic["0"]["size"] == 256 << 10
        assert nic["0"]["backing"] == 151552
        assert src.info("gpu0")["bars"]["2"]["kind"] == "mem64"
        _migrate(qemu, src, dst, tmp_path, ["nic0", "gpu0"])


PCIE_DRIVER = '''
from fakevfio._ram import RamDriver


class PcieRam(RamDriver):
    """ram as a PCI Express endpoint: 4096 bytes of config space and a PCIe capability."""

    pcie = True

    def __init__(self, name, options):
        super().__init__(name, {**options, "config_size": "4096"})
'''


def test_a_pcie_device_with_extended_config_migrates_in_qemu(
    fakevfio_mount: MountFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, qemu: str
) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "h1_pcie_ram.py").write_text(PCIE_DRIVER)
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{plugin}{os.pathsep}{old}".rstrip(os.pathsep))
    extra = ["--driver", "pram=h1_pcie_ram:PcieRam"]
    with (
        fakevfio_mount(["e0=pram:size=16M,seed=2"], extra_args=extra) as src,
        fakevfio_mount(["e0=pram:size=16M"], extra_args=extra) as dst,
    ):
        config = src.read_bytes(src.file("e0", "config"))
        assert len(config) == 4096
        assert config[0x7C] == 0x10  # the PCI Express capability, after MSI and MSI-X
        _migrate(qemu, src, dst, tmp_path, ["e0"])
