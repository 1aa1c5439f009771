"""An unmodified QEMU migrates a fakevfio device as ``-device vfio-pci``.

Two QEMUs (source; destination with ``-incoming defer``), each under ``fakevfio
run`` on its own mount, get the device through the iommufd cdev path with fds
passed on the command line (``-object iommufd,fd=`` / ``-device vfio-pci,fd=``;
the fds are opened inside the private namespace, so QEMU needs no sysfs). They
are driven over QMP (the ``qemu.qmp`` library) with the multifd, return-path and switchover-ack
capabilities, and migrate over TCP loopback. The device's state, the arc logs
(QEMU's requests as the device executed them) and the migrator's arcs for the
same set-up are compared.

Every test runs once per QEMU of the matrix (the ``qemu`` fixture, ids
``qemu10.0`` and ``qemu11.1``): the system's ``qemu-system-x86_64`` (QEMU 10:
Debian 13's own, Debian 12's bookworm-backports; ``.ci/setup-qemu``) and QEMU 11.1
from Debian 13's trixie-backports in a cached root filesystem
(``.ci/setup-qemu-11``; docs/qemu-versions.md). ``$FAKEVFIO_QEMU`` replaces the
matrix with that one build. A version that is not set up skips with the reason,
except under ``CI=true`` where it fails. Tests that take no ``qemu`` (other files'
helpers) run on the default QEMU only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from fakevfio.guest import Qmp  # the one QMP client (on qemu.qmp), shared with the guest kit
from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import DEST_ARCS, SOURCE_ARCS, digest, migrate

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]

#: Your own QEMU build: FAKEVFIO_QEMU=/path/to/build/qemu-system-x86_64 pytest -m qemu
#: (then the matrix is that one build). Also the default for helpers not given a binary.
QEMU = os.environ.get("FAKEVFIO_QEMU", "qemu-system-x86_64")
FLAGS = "STOP_COPY+P2P+PRE_COPY"
SIZE = "64M"
#: Where .ci/setup-qemu-11 puts QEMU 11.1 (a root filesystem and a wrapper that behaves
#: like the binary).
QEMU_CACHE = Path(os.environ.get("FAKEVFIO_QEMU_CACHE", "/var/cache/fakevfio-qemu"))
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)")


@attrs.frozen
class QemuBuild:
    """One QEMU of the test matrix: the binary to run and what it must report."""

    binary: str
    #: the major.minor its ``--version`` must report ("11.1"); None: any from 10 on
    expected: str | None
    #: how to get it, for the skip or failure message
    setup: str
    #: the id while the binary is absent
    absent_id: str

    @property
    def id(self) -> str:
        """The test id, from what the binary reports: ``qemu10.0``, ``qemu11.1``."""
        found = version_of(self.binary) if shutil.which(self.binary) else None
        return f"qemu{found}" if found else self.absent_id

    def problem(self) -> str | None:
        """Why this build cannot run the tests here, or None."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} is not installed ({self.setup})"
        found = version_of(self.binary)
        if found is None:
            return f"{self.binary} --version does not say 'QEMU emulator version X.Y'"
        if self.expected is not None and found != self.expected:
            return f"{self.binary} is QEMU {found}, not {self.expected} ({self.setup})"
        if int(found.split(".")[0]) < 10:
            return f"{self.binary} is QEMU {found}; these tests need QEMU >= 10 ({self.setup})"
        return None


@functools.cache
def version_of(binary: str) -> str | None:
    """``major.minor`` from ``BINARY --version``, or None when it does not run or say so."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _VERSION.search(out)
    return f"{found[1]}.{found[2]}" if found else None


def matrix() -> list[QemuBuild]:
    """The QEMUs every QEMU test runs against.

    ``$FAKEVFIO_QEMU`` set: that build only. Otherwise the system's
    ``qemu-system-x86_64`` (QEMU 10.0: Debian 13, Debian 12's bookworm-backports) and
    QEMU 11.1 from Debian 13's trixie-backports in its own root filesystem.
    """
    if "FAKEVFIO_QEMU" in os.environ:
        return [QemuBuild(os.environ["FAKEVFIO_QEMU"], None, "FAKEVFIO_QEMU names it", "qemu")]
    return [
        QemuBuild("qemu-system-x86_64", None, "sudo bash .ci/setup-qemu", "qemu10.0"),
        QemuBuild(
            str(QEMU_CACHE / "trixie-11.1" / "qemu-system-x86_64"),
            "11.1",
            "sudo bash .ci/setup-qemu-11",
            "qemu11.1",
        ),
    ]


def require(build: QemuBuild) -> str:
    """The binary of ``build``; skips the test when it cannot run (fails under CI=true)."""
    reason = build.problem()
    if reason is None:
        return build.binary
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"QEMU tests must run in CI on {build.id}, but {reason}", pytrace=False)
    pytest.skip(reason)


_MATRIX = matrix()


@pytest.fixture(params=_MATRIX, ids=[build.id for build in _MATRIX])
def qemu(request: pytest.FixtureRequest) -> str:
    """The QEMU binary of this run of the test: every matrix entry in turn."""
    build: QemuBuild = request.param
    return require(build)


@pytest.fixture(autouse=True)
def _need_qemu(request: pytest.FixtureRequest) -> None:
    """For tests that do not take ``qemu``: the default QEMU (``QEMU``) must be there."""
    if "qemu" not in request.fixturenames:
        require(_MATRIX[0])


def qemu_command(
    qmp: Path, multifd: str, *extra: str, qemu: str = QEMU, machine: str = "q35"
) -> list[str]:
    """QEMU's command line inside ``fakevfio run`` (fd 3: the cdev, fd 4: /dev/iommu)."""
    return [
        qemu,
        "-accel",
        "tcg",
        "-machine",
        machine,
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-m",
        "64M",
        "-object",
        "iommufd,id=iommufd0,fd=4",
        "-device",
        "vfio-pci,id=gpu0,iommufd=iommufd0,fd=3,rombar=0,"  # QEMU's default enable-migration=auto
        f"x-migration-multifd-transfer={multifd}",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        *extra,
    ]


@contextlib.contextmanager
def qemu_under_run(
    mount: MountHandle,
    tmp: Path,
    tag: str,
    multifd: str,
    *extra: str,
    qemu: str = QEMU,
    machine: str = "q35",
) -> Iterator[Qmp]:
    qmp_path = tmp / f"{tag}.qmp"
    log = tmp / f"{tag}.log"
    script = 'exec 3<>/dev/vfio/devices/vfio0 4<>/dev/iommu && exec "$@"'
    argv = [
        sys.executable,
        "-m",
        "fakevfio",
        "run",
        "--mount",
        str(mount.path),
        "--",
        "sh",
        "-c",
        script,
        "sh",
        *qemu_command(qmp_path, multifd, *extra, qemu=qemu, machine=machine),
    ]
    with qemu_session(argv, qmp_path, log) as qmp:
        yield qmp


@contextlib.contextmanager
def qemu_session(argv: list[str], qmp_path: Path, log: Path) -> Iterator[Qmp]:
    """Start ``argv`` (QEMU, under ``fakevfio run``; output to ``log``) and yield its QMP.

    Leaving normally quits QEMU, which must then exit 0; any way out kills what is
    left of its process group.
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    qmp: Qmp | None = None
    try:
        qmp = Qmp.connect(qmp_path, proc, log)
        yield qmp
        with contextlib.suppress(OSError, RuntimeError):
            qmp.cmd("quit")
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _requested_read_size(histogram: dict[str, int]) -> int:
    """The read() size a program asked for, from the FUSE request sizes the device saw.

    A direct-I/O read whose buffer does not start on a page boundary spans one
    page more than its size, and the kernel splits it at the 256-page FUSE
    limit: 1 MiB then arrives as (1 MiB - x) + x. QEMU's g_malloc'd buffer is
    aligned or not depending on its heap; the migrator's is always aligned.
    """
    sizes = sorted(int(size) for size in histogram)
    assert sizes, "no reads at all"
    return sizes[-1] if sizes[-1] == 1 << 20 else sizes[-1] + sizes[0]


def arcs(mount: MountHandle) -> list[str]:
    return mount.read("gpu0", "migration/log").splitlines()


def wait_migration(qmp: Qmp, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.1)


def qemu_migrate(
    src: MountHandle,
    dst: MountHandle,
    tmp: Path,
    multifd: str,
    qemu: str = QEMU,
    *,
    dest_qemu: str | None = None,
    machine: str = "q35",
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Migrate gpu0 from ``src`` to ``dst`` with two QEMUs; returns both migration arc lists.

    ``dest_qemu``: another binary for the destination (a migration across versions,
    with a ``machine`` type both know).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caps = [{"capability": c, "state": True} for c in ("multifd", "return-path", "switchover-ack")]
    with (
        qemu_under_run(src, tmp, "src", multifd, qemu=qemu, machine=machine) as sq,
        qemu_under_run(
            dst, tmp, "dst", multifd, "-incoming", "defer", qemu=dest_qemu or qemu, machine=machine
        ) as dq,
    ):
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **{"multifd-channels": 2})
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 1000})
        sq.cmd("cont")  # the device goes RUNNING -> RUNNING_P2P -> RUNNING with the VM
        dst_start = len(arcs(dst))
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src_start = len(arcs(src))
        sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = wait_migration(sq)
        assert info["status"] == "completed", info
        assert wait_migration(dq)["status"] == "completed"
        assert sq.cmd("query-status")["status"] == "postmigrate"
        src_digest = digest(src, "gpu0")  # the source device is in STOP now
        dq.cmd("cont")  # RESUMING -> STOP validates the stream, then RUNNING
        dst_end = len(arcs(dst))
        dq.cmd("stop")
        assert src.info("gpu0")["state"] == "STOP"
        assert dst.info("gpu0")["state"] == "STOP"
        assert digest(dst, "gpu0") == src_digest
    return arcs(src)[src_start:], arcs(dst)[dst_start:dst_end], info


# Each value of each factor once (pairwise): multifd with a dirtying device, the main
# channel with an idle one. The other two pairs cost a QEMU migration each per version.
@pytest.mark.parametrize(("multifd", "dirty"), [("on", "4M"), ("off", "0")])
def test_qemu_migrates_a_fakevfio_device(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str, multifd: str, dirty: str
) -> None:
    with (
        fakevfio_mount([f"gpu0=ram:size={SIZE},flags={FLAGS},seed=7,dirty_rate={dirty}"]) as src,
        fakevfio_mount([f"gpu0=ram:size={SIZE},flags={FLAGS}"]) as dst,
    ):
        src_arcs, dst_arcs, info = qemu_migrate(src, dst, tmp_path, multifd, qemu)
        assert src_arcs == SOURCE_ARCS[FLAGS]
        assert dst_arcs == DEST_ARCS[True]
        assert info["vfio"]["transferred"] >= 64 << 20
        if dirty != "0":
            assert src.info("gpu0")["pages_dirtied"] > 0


@pytest.mark.parametrize("multifd", ["on", "off"])
def test_migrator_requests_the_same_arcs_as_qemu(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str, multifd: str
) -> None:
    spec = f"gpu0=ram:size=16M,flags={FLAGS},seed=3"
    with fakevfio_mount([spec]) as src, fakevfio_mount(["gpu0=ram:size=16M"]) as dst:
        qemu_src, qemu_dst, _ = qemu_migrate(src, dst, tmp_path, multifd, qemu)
        qemu_reads = src.info("gpu0")["read_sizes"]
    with fakevfio_mount([spec]) as src, fakevfio_mount(["gpu0=ram:size=16M"]) as dst:
        source, dest = migrate(
            "tcp:127.0.0.1:0",
            [str(src.device("gpu0"))],
            [str(dst.device("gpu0"))],
            "--multifd-transfer",
            multifd,
            "--multifd-channels",
            "2",
        )
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest.stderr
        assert arcs(src) == qemu_src
        assert arcs(dst) == qemu_dst
        # The same read size: min(1 MiB, stop-copy size) on every data_fd read.
        ours = src.info("gpu0")["read_sizes"]
        assert _requested_read_size(ours) == _requested_read_size(qemu_reads) == 1 << 20


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_qemu_migrates_a_fakevfio_device_between_versions(
    fakevfio_mount: MountFactory, tmp_path: Path, direction: str
) -> None:
    """QEMU 10.0 -> 11.1 (forward, what QEMU supports) and 11.1 -> 10.0 (backward).

    Both run the machine type the older one knows (``pc-q35-10.0``), as a
    cross-version migration must; multifd device-state transfer is on.
    """
    if len(_MATRIX) < 2:
        pytest.skip("FAKEVFIO_QEMU names one build: no second version to migrate to")
    old, new = (require(build) for build in _MATRIX[:2])
    source, dest = (old, new) if direction == "forward" else (new, old)
    machine = f"pc-q35-{version_of(old)}"
    with (
        fakevfio_mount([f"gpu0=ram:size=16M,flags={FLAGS},seed=9,dirty_rate=1M"]) as src,
        fakevfio_mount([f"gpu0=ram:size=16M,flags={FLAGS}"]) as dst,
    ):
        src_arcs, dst_arcs, info = qemu_migrate(
            src, dst, tmp_path, "on", source, dest_qemu=dest, machine=machine
        )
        assert src_arcs == SOURCE_ARCS[FLAGS]
        assert dst_arcs == DEST_ARCS[True]
        assert info["vfio"]["transferred"] >= 16 << 20
