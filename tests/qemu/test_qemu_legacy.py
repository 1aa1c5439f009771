"""Each QEMU reaches fakevfio devices by PCI address on the legacy group path, and migrates them.

The source QEMU gets its device as ``-device vfio-pci,host=ADDR``, the destination as
``-device vfio-pci,sysfsdev=/sys/bus/pci/devices/ADDR``, each under ``fakevfio run``
on its own mount, with no fd passed and no iommufd: QEMU finds the device in the
sysfs view of the child's namespace (``vfio_device_get_name``: stat + basename;
``vfio_device_get_groupid``: readlink ``iommu_group``), opens ``/dev/vfio/vfio``
and ``/dev/vfio/<group>``, attaches a type1 container (``VFIO_IOMMU_GET_INFO``,
``MAP_DMA`` of guest RAM) and asks ``VFIO_GROUP_GET_DEVICE_FD`` for the address.
The two devices have different PCI addresses on the two hosts, as real ones may.
The migration goes over TCP with the multifd, return-path and switchover-ack
capabilities; the device's state digest and arcs must match what a migration
through the iommufd path gives (``tests/test_qemu.py``). The QMP client is this
file's own, so the test does not move with another file's helpers.

Without ``qemu-system-x86_64`` the tests skip, except under ``CI=true`` where
they fail.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Qmp
from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import DEST_ARCS, SOURCE_ARCS, digest
from tests.test_qemu import qemu_session

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(300)]

FLAGS = "STOP_COPY+P2P+PRE_COPY"
SRC_ADDRESS = "0000:02:00.0"
DST_ADDRESS = "0000:f0:00.0"  # the destination mount's default for its first device


def wait_migration(qmp: Qmp, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.1)


def _command(
    qemu: str, qmp: Path, device: str, migration: str, multifd: str, *extra: str
) -> list[str]:
    return [
        qemu,
        *("-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none", "-S"),
        *("-m", "64M"),
        "-device",
        f"vfio-pci,id=gpu0,{device},rombar=0,{migration},x-migration-multifd-transfer={multifd}",
        *("-qmp", f"unix:{qmp},server=on,wait=off"),
        *extra,
    ]


@contextlib.contextmanager
def _qemu(mount: MountHandle, tmp: Path, tag: str, argv: list[str]) -> Iterator[tuple[Qmp, Path]]:
    log = tmp / f"{tag}.log"
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount.path), "--", *argv]
    with qemu_session(cmd, tmp / f"{tag}.qmp", log) as qmp:
        yield qmp, log


def _arcs(mount: MountHandle) -> list[str]:
    return mount.read("gpu0", "migration/log").splitlines()


@pytest.mark.parametrize(
    ("migration", "multifd"),
    [
        ("enable-migration=on", "on"),
        ("enable-migration=on", "off"),
        ("enable-migration=auto", "on"),  # device DMA logging
        # type1 VFIO_IOMMU_DIRTY_PAGES (QEMU's auto mode counts only iommufd dirty tracking
        # as IOMMU tracking, so the legacy container needs enable-migration=on for it)
        ("enable-migration=on,x-device-dirty-page-tracking=off", "off"),
    ],
)
def test_qemu_host_and_sysfsdev_devices_migrate(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str, migration: str, multifd: str
) -> None:
    with (
        fakevfio_mount(
            [f"gpu0=ram:size=16M,flags={FLAGS},seed=7,dirty_rate=2M,address={SRC_ADDRESS}"]
        ) as src,
        fakevfio_mount([f"gpu0=ram:size=16M,flags={FLAGS}"]) as dst,
    ):
        assert src.info("gpu0")["pci_address"] == SRC_ADDRESS
        assert dst.info("gpu0")["pci_address"] == DST_ADDRESS
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        src_argv = _command(qemu, tmp_path / "src.qmp", f"host={SRC_ADDRESS}", migration, multifd)
        dst_argv = _command(
            qemu,
            tmp_path / "dst.qmp",
            f"sysfsdev=/sys/bus/pci/devices/{DST_ADDRESS}",
            migration,
            multifd,
            "-incoming",
            "defer",
        )
        caps = [
            {"capability": c, "state": True} for c in ("multifd", "return-path", "switchover-ack")
        ]
        with (
            _qemu(src, tmp_path, "src", src_argv) as (sq, src_log),
            _qemu(dst, tmp_path, "dst", dst_argv) as (dq, dst_log),
        ):
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities", capabilities=caps)
                q.cmd("migrate-set-parameters", **{"multifd-channels": 2})
            sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 1000})
            sq.cmd("cont")
            dst_start = len(_arcs(dst))
            dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            src_start = len(_arcs(src))
            sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = wait_migration(sq)
            assert info["status"] == "completed", info
            assert wait_migration(dq)["status"] == "completed"
            src_digest = digest(src, "gpu0")
            dq.cmd("cont")
            dst_end = len(_arcs(dst))
            dq.cmd("stop")
            assert dst.info("gpu0")["state"] == "STOP"
            assert digest(dst, "gpu0") == src_digest
            assert _arcs(src)[src_start:] == SOURCE_ARCS[FLAGS]
            assert _arcs(dst)[dst_start:dst_end] == DEST_ARCS[True]
            assert info["vfio"]["transferred"] >= 16 << 20
            assert src.info("gpu0")["pages_dirtied"] > 0
        for log in (src_log, dst_log):
            text = log.read_text()
            assert "iommu_group" not in text, text
            assert "Failed" not in text, text
