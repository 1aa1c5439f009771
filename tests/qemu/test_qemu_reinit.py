"""A device that re-initialises during pre-copy (``ram:reinit_after``), under each QEMU.

Linux 7.1's ``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`` (feature 12) lets a
caller opt in to ``VFIO_PRECOPY_INFO_REINIT``: a device may then raise
``initial_bytes`` again (here once, after ``reinit_after`` bytes were read) and
says so in PRECOPY_INFO's flags. QEMU 11.1 opts in at realize (its trace
``vfio_migration_init ... precopy_info_v2_used 1``), sees the flag
(``vfio_query_precopy_size ... reinit 1``) and sends the re-initialised state,
so the device's whole state travels again after the first ``reinit_after``
bytes. QEMU 10.0 does not know feature 12, never opts in, and the device never
re-initialises for it (a caller that did not opt in never sees REINIT). Either
way the destination device must end with the source's state digest and both
sides must take the arcs of an ordinary migration.

What we check comes from QEMU: its own trace lines and its ``query-migrate``
count of VFIO bytes. The one rule of ours: the version that opts in is the one
whose trace says so (11.1 must).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import DEST_ARCS, SOURCE_ARCS, digest
from tests.test_qemu import arcs, qemu_under_run, version_of, wait_migration

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]

FLAGS = "STOP_COPY+P2P+PRE_COPY"
SIZE = 16 << 20
REINIT_AFTER = 4 << 20


def _trace(tmp: Path, tag: str) -> list[str]:
    """QEMU's trace options: the two events this test reads, to ``tmp/tag.trace``."""
    path = tmp / f"{tag}.trace"
    return [
        *("-trace", f"vfio_migration_init*,file={path}"),
        *("-trace", f"vfio_query_precopy*,file={path}"),
    ]


def _migrate(qemu: str, src: MountHandle, dst: MountHandle, tmp: Path) -> int:
    """Migrate gpu0 (no multifd, return-path + switchover-ack); QEMU's VFIO byte count."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caps = [{"capability": c, "state": True} for c in ("return-path", "switchover-ack")]
    with (
        qemu_under_run(src, tmp, "src", "off", *_trace(tmp, "src"), qemu=qemu) as sq,
        qemu_under_run(dst, tmp, "dst", "off", "-incoming", "defer", qemu=qemu) as dq,
    ):
        for q in (sq, dq):
            q.cmd("migrate-set-capabilities", capabilities=caps)
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 1000})
        sq.cmd("cont")
        dst_start = len(arcs(dst))
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src_start = len(arcs(src))
        sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = wait_migration(sq)
        assert info["status"] == "completed", (info, (tmp / "src.log").read_text())
        assert wait_migration(dq)["status"] == "completed"
        src_digest = digest(src, "gpu0")
        dq.cmd("cont")
        dst_end = len(arcs(dst))
        dq.cmd("stop")
        assert digest(dst, "gpu0") == src_digest
        assert arcs(src)[src_start:] == SOURCE_ARCS[FLAGS]
        assert arcs(dst)[dst_start:dst_end] == DEST_ARCS[True]
        transferred: int = info["vfio"]["transferred"]
    return transferred


def test_qemu_migrates_a_device_that_reinitialises_in_pre_copy(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str
) -> None:
    size = f"size={SIZE >> 20}M,flags={FLAGS}"
    spec = f"gpu0=ram:{size},seed=5,reinit_after={REINIT_AFTER}"
    with fakevfio_mount([spec]) as src, fakevfio_mount([f"gpu0=ram:{size}"]) as dst:
        transferred = _migrate(qemu, src, dst, tmp_path)
        v2_query = (src.device("gpu0") / "migration" / "precopy_info_v2").exists()
    trace = (tmp_path / "src.trace").read_text().splitlines()
    opted_in = any("precopy_info_v2_used 1" in line for line in trace)
    reinits = [line for line in trace if "vfio_query_precopy_size" in line and "reinit 1" in line]
    version = version_of(qemu)
    assert version is not None
    if tuple(int(n) for n in version.split(".")) >= (11, 1):
        assert opted_in, trace
    # The supervisor answers REINIT from the device's migration/precopy_info_v2
    # (fakevfio/_run/_device_ioctls.py); a mount without it never re-initialises.
    assert v2_query
    if opted_in:
        # REINIT seen once; the whole state went again after the first REINIT_AFTER bytes
        assert len(reinits) == 1, trace
        assert transferred >= REINIT_AFTER + SIZE, transferred
    else:
        assert not reinits, trace
        assert SIZE <= transferred < REINIT_AFTER + SIZE, transferred
