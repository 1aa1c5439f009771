"""QEMU's own view of a migration of fake devices, next to the migrator's (same mounts).

Two QEMUs (TCG, 64 MiB of RAM, ``-S``) each run under ``fakevfio run`` with one
``vfio-pci`` device on the mount's cdev, and migrate over tcp loopback with
multifd, return-path and switchover-ack on; ``query-migrate`` reports QEMU's
downtime, total time and throughput. The migrator then migrates the same devices
between the same mounts. QEMU is optional: without ``qemu-system-x86_64`` (QEMU
>= 10) the scenario reports ``skipped``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchError
from fakevfio.testing import Mount

QEMU = os.environ.get("FAKEVFIO_QEMU", "qemu-system-x86_64")


def qemu_missing() -> str | None:
    """Why the QEMU comparison cannot run here (None: it can)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian 12: bookworm-backports' qemu-system-x86)"
    if os.geteuid() != 0:
        return "fakevfio run needs root"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp package is missing (pip install -e '.[test]')"
    return None


class _Qmp:
    """The guest kit's QMP client with its errors as :class:`BenchError`."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        from fakevfio.guest import GuestError, Qmp

        try:
            self.qmp = Qmp.connect(path, proc, log, timeout=60, reply_timeout=120)
        except GuestError as exc:
            raise BenchError(str(exc)) from None

    def cmd(self, name: str, **arguments: Any) -> Any:
        from fakevfio.guest import GuestError

        try:
            return self.qmp.cmd(name, **arguments)
        except GuestError as exc:
            raise BenchError(str(exc)) from None

    def close(self) -> None:
        self.qmp.close()


@contextlib.contextmanager
def _qemu(mount: Mount, base: Path, tag: str, *extra: str) -> Iterator[_Qmp]:
    qmp_path, log = base / f"{tag}.qmp", base / f"{tag}.log"
    qemu = [
        QEMU, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none", "-S",
        "-m", "64M", "-object", "iommufd,id=iommufd0,fd=4",
        "-device", "vfio-pci,id=dev0,iommufd=iommufd0,fd=3,rombar=0,"
        "x-migration-multifd-transfer=on",
        "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra,
    ]  # fmt: skip
    script = 'exec 3<>/dev/vfio/devices/vfio0 4<>/dev/iommu && exec "$@"'
    argv = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount.path), "--"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "sh", "-c", script, "sh", *qemu],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    qmp: _Qmp | None = None
    try:
        qmp = _Qmp(qmp_path, proc, log)
        yield qmp
        with contextlib.suppress(BenchError):
            qmp.cmd("quit")
        proc.wait(timeout=30)
    finally:
        if qmp is not None:
            qmp.close()  # after quit: QEMU's hang-up, which close() accepts
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(qmp: _Qmp, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise BenchError(f"QEMU's migration did not finish in {timeout:.0f} s: {info}")
        time.sleep(0.05)


def qemu_migration(src: Mount, dst: Mount, base: Path, *, timeout: float = 300) -> dict[str, Any]:
    """One QEMU-to-QEMU migration of the mounts' device vfio0; ``query-migrate``'s answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caps = [{"capability": c, "state": True} for c in ("multifd", "return-path", "switchover-ack")]
    with (
        _qemu(src, base, "qemu-src") as sq,
        _qemu(dst, base, "qemu-dst", "-incoming", "defer") as dq,
    ):
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **{"multifd-channels": 2})
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 60000})
        sq.cmd("cont")
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = _wait(sq, timeout)
        if info["status"] != "completed":
            raise BenchError(f"QEMU's migration ended {info['status']}: {info}")
        _wait(dq, timeout)
        dq.cmd("cont")  # RESUMING -> STOP validates the stream
        dq.cmd("stop")
    return info
