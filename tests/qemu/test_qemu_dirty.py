"""Each QEMU migrates a VM whose fakevfio device DMA-writes guest RAM all through pre-copy.

Two QEMUs run under ``fakevfio run`` with the device as ``-device vfio-pci`` on
the iommufd cdev path and QEMU's default ``enable-migration=auto``: QEMU
accepts the device only because it supports dirty tracking, device DMA logging
(``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``) or, with
``x-device-dirty-page-tracking=off``, IOMMU dirty tracking through iommufd.
The source's ``ram`` device has ``dma_rate`` set: once the test has set Bus
Master Enable in its command register (what a guest driver does; SeaBIOS
leaves it off), while the VM runs and all through pre-copy, it writes pages of
guest RAM (IOVA = guest physical address) that QEMU has mapped for it. The
destination is started with ``-S`` and never continued, so its device never
DMAs.

What we check comes from QEMU: its own RAM migration, fed by the dirty bitmap
the device reports, must carry every DMA-written page, so the destination's
guest RAM (QMP ``pmemsave``) equals the source's final RAM byte for byte. With
the fault rule ``dirty lose 100`` the device reports nothing: the same
comparison shows the loss (the check can fail). QEMU's log must hold no
warning about dirty tracking or error recovery.

The device learns QEMU's ``IOMMU_IOAS_MAP`` of guest RAM from the supervisor,
which pushes every mapping into the ``dma`` file (``map IOVA LEN PID VADDR
PERM``); the test checks the device has them before the VM runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Qmp
from tests.conftest import MountFactory, MountHandle

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]

GUEST_MB = 64
FLAGS = "STOP_COPY+P2P+PRE_COPY"
# DMA into guest RAM 16M..48M, away from SeaBIOS's low memory and its tables at the top,
# and only once Bus Master Enable is set: SeaBIOS expects power-on RAM untouched (random
# bytes written before it runs make it reset the machine in a loop).
SRC = (
    f"gpu0=ram:size=1M,flags={FLAGS},seed=7,dma_rate=8M,dma_window=16M:32M,dma_bus_master=required"
)
DST = f"gpu0=ram:size=1M,flags={FLAGS}"
WARNING = re.compile(r"warning:.*(dirty|error recovery|migrat)", re.IGNORECASE)


class Vm:
    """One QEMU under ``fakevfio run``: its QMP and its log."""

    def __init__(self, qmp: Qmp, log: Path) -> None:
        self.qmp = qmp
        self.log = log
        #: a failed migration: QEMU may exit non-zero (the destination does)
        self.failed = False


@contextlib.contextmanager
def qemu_vm(
    qemu: str, mount: MountHandle, tmp: Path, tag: str, device_opts: str, *extra: str
) -> Iterator[Vm]:
    qmp_path, log = tmp / f"{tag}.qmp", tmp / f"{tag}.log"
    script = 'exec 3<>/dev/vfio/devices/vfio0 4<>/dev/iommu && exec "$@"'
    cmd = [qemu, "-accel", "tcg", "-machine", "q35", "-nodefaults"]
    cmd += ["-display", "none", "-S", "-m", f"{GUEST_MB}M"]
    cmd += ["-object", "iommufd,id=iommufd0,fd=4"]
    cmd += ["-device", f"vfio-pci,id=gpu0,iommufd=iommufd0,fd=3,rombar=0{device_opts}"]
    cmd += ["-trace", "vfio_pci_reset*", "-trace", "vfio_reset_handler"]  # in the log
    # SeaBIOS's debug output (port 0x402): enable_bus_master waits for the end of its POST
    cmd += ["-chardev", f"file,id=bios,path={tmp / tag}.bios"]
    cmd += ["-device", "isa-debugcon,iobase=0x402,chardev=bios"]
    cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off", *extra]
    argv = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount.path), "--"]
    argv += ["sh", "-c", script, "sh", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    qmp: Qmp | None = None
    try:
        qmp = Qmp.connect(qmp_path, proc, log)
        vm = Vm(qmp, log)
        yield vm
        with contextlib.suppress(OSError, RuntimeError):
            qmp.cmd("quit")
        code = proc.wait(timeout=30)
        assert vm.failed or code == 0, log.read_text()
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_migration(qmp: Qmp, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.05)


def guest_ram_mappings(mount: MountHandle) -> list[tuple[int, int, str]]:
    """The device's mappings (IOVA, length, PERM) from its ``dma`` file."""
    out = []
    for line in mount.read("gpu0", "dma").splitlines():
        words = line.split()
        if words[0] == "map":
            out.append((int(words[1], 16), int(words[2], 16), words[5]))
    return out


def enable_bus_master(mount: MountHandle, bios: Path) -> None:
    """What a guest driver does: set Bus Master Enable, once SeaBIOS has finished.

    SeaBIOS enables memory decoding halfway through its POST, while it still uses
    RAM it expects untouched; DMA then can make it reset the machine (seen with QEMU
    11.1's SeaBIOS 1.16.3), and a reset during pre-copy ends the device's session.
    So this waits for the end of the POST: "enter handle_19" (INT 19h, the boot).
    """
    config = mount.device("gpu0") / "config"
    deadline = time.monotonic() + 30
    while b"enter handle_19:" not in (bios.read_bytes() if bios.exists() else b""):
        assert time.monotonic() < deadline, f"SeaBIOS did not finish: {bios.read_text()}"
        time.sleep(0.05)
    assert config.read_bytes()[4] & 0x02, "SeaBIOS did not enable memory decoding"
    with open(config, "r+b", buffering=0) as f:
        f.seek(4)
        f.write(bytes([config.read_bytes()[4] | 0x04]))


def migrate_with_dma(
    qemu: str, src: MountHandle, dst: MountHandle, tmp: Path, device_opts: str
) -> tuple[bytes, bytes, dict[str, Any], str]:
    """Migrate a DMA-ing VM; (source RAM, destination RAM, query-migrate, both QEMU logs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caps = [{"capability": c, "state": True} for c in ("return-path", "switchover-ack")]
    with (
        qemu_vm(qemu, src, tmp, "src", device_opts) as sv,
        qemu_vm(qemu, dst, tmp, "dst", device_opts, "-incoming", "defer") as dv,
    ):
        sq, dq = sv.qmp, dv.qmp
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
        # slow enough for several pre-copy iterations while the device writes 8 MiB/s
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20, "downtime-limit": 100})
        # QEMU's IOMMU_IOAS_MAP of guest RAM reached the device (the supervisor's push)
        maps = guest_ram_mappings(src)
        assert any(iova == 0 and perm == "rw" for iova, _n, perm in maps), maps
        assert sum(n for _i, n, _p in maps) >= GUEST_MB << 20 >> 1, maps
        sq.cmd("cont")
        enable_bus_master(src, tmp / "src.bios")
        time.sleep(0.5)  # the device DMAs into the running VM before migration
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        try:
            sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        except RuntimeError as exc:  # a migration blocker
            sv.failed = dv.failed = True
            return b"", b"", {"status": "refused", "error-desc": str(exc)}, sv.log.read_text()
        info = wait_migration(sq)
        if info["status"] != "completed":
            sv.failed = dv.failed = True
            (tmp / "src.events").write_text(json.dumps(sq.events))
            arcs = src.read("gpu0", "migration/log")
            return b"", b"", info, sv.log.read_text() + dv.log.read_text() + arcs
        assert wait_migration(dq)["status"] == "completed"
        # A guest reset would clear Bus Master Enable and end the device's DMA (and its
        # session, if during pre-copy): the DMA ran through the whole migration.
        resets = [event for event in sq.events if event["event"] == "RESET"]
        assert not resets, (resets, (tmp / "src.bios").read_text())
        assert sq.cmd("query-status")["status"] == "postmigrate"
        assert dq.cmd("query-status")["status"] != "running"  # -S: never continued
        src_ram, dst_ram = tmp / "src.ram", tmp / "dst.ram"
        for q, path in ((sq, src_ram), (dq, dst_ram)):
            q.cmd("pmemsave", val=0, size=GUEST_MB << 20, filename=str(path))
        assert dst.info("gpu0")["dma"]["bytes_written"] == 0  # the destination never DMAs
        logs = sv.log.read_text() + dv.log.read_text()
        return src_ram.read_bytes(), dst_ram.read_bytes(), info, logs
    raise AssertionError("unreachable")


def differing_pages(a: bytes, b: bytes) -> int:
    assert len(a) == len(b) == GUEST_MB << 20
    return sum(1 for off in range(0, len(a), 4096) if a[off : off + 4096] != b[off : off + 4096])


@pytest.mark.parametrize(
    "tracking", ["device", "iommu"], ids=["device-dma-logging", "iommufd-dirty-tracking"]
)
def test_qemu_migrates_a_dma_ing_device_with_enable_migration_auto(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str, tracking: str
) -> None:
    opts = "" if tracking == "device" else ",x-device-dirty-page-tracking=off"
    with fakevfio_mount([SRC]) as src, fakevfio_mount([DST]) as dst:
        src_ram, dst_ram, info, logs = migrate_with_dma(qemu, src, dst, tmp_path, opts)
        assert info["status"] == "completed", (info, logs)
        dma = src.info("gpu0")["dma"]
        assert dma["bytes_written"] > 0
        assert dma["faults"] == 0
        assert info["ram"]["dirty-sync-count"] >= 3, info  # several pre-copy iterations
        assert differing_pages(src_ram, dst_ram) == 0
        assert not [line for line in logs.splitlines() if WARNING.search(line)], logs
        if tracking == "device":
            # QEMU started the device's logging; it stops it only when a VM runs again
            assert dma["log"] is not None
        assert dma["pages_lost"] == 0


@pytest.mark.parametrize(
    "tracking", ["device", "iommu"], ids=["device-dma-logging", "iommufd-dirty-tracking"]
)
def test_qemu_migration_shows_the_pages_a_dirty_lose_100_device_did_not_report(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str, tracking: str
) -> None:
    opts = "" if tracking == "device" else ",x-device-dirty-page-tracking=off"
    with fakevfio_mount([SRC]) as src, fakevfio_mount([DST]) as dst:
        assert src.write("gpu0", "faults", "dirty lose 100\n") is None
        src_ram, dst_ram, info, logs = migrate_with_dma(qemu, src, dst, tmp_path, opts)
        assert info["status"] == "completed", (info, logs)
        assert src.info("gpu0")["dma"]["pages_lost"] > 0
        # the pages written after QEMU had sent them and never reported: they differ
        assert differing_pages(src_ram, dst_ram) > 0
