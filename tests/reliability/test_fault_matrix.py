"""The fault matrix: one injected device fault per migration phase, both transfer modes.

Each cell creates a fresh 4 MiB ``ram`` pair (no dirtying workload, so the
source's ``state_digest`` before and after is comparable), injects one rule
through ``devices/NAME/faults`` and runs two real ``migrator`` processes.
What must hold in every cell (README "Exit status", INTERFACES section 6):

* both migrators exit non-zero within a bounded time;
* each prints exactly one ``migrator: error:`` line that names a phase; the
  side whose device failed names the phase, the device and the errno;
* source devices are RUNNING with their pre-migration ``state_digest``;
* destination devices are reset (RUNNING, log ends with ``RESET``);
* the mounts keep serving: with the rule removed, a migration between the
  same two devices succeeds.

Cells the fault language cannot express:

* ``config`` (reading or writing PCI config space fails): there is no
  config/region fault rule (INTERFACES section 4 has arc, read, write, delay,
  corrupt), so that phase has no cell here.
* a stop-copy read error on a PRE_COPY device: ``read ERRNO after N`` fails
  every read past N, including the pre-copy reads that continue until the
  switchover, so the error would land in pre-copy; the stop-copy read cell uses
  a STOP_COPY+P2P device instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import attrs
import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import digest, migrate
from tests.reliability import assert_reset, error_line, phase_of

# Every cell runs two migrations (3-5 s on an idle machine).
pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.deadline(90)]
Mounts = tuple[MountHandle, MountHandle]
_names = itertools.count()

PRECOPY = "STOP_COPY+P2P+PRE_COPY"
P2P = "STOP_COPY+P2P"
#: Both migrators must be done within this many seconds of the source's start.
BOUND_S = 20.0
MODES = {
    "single": ("--multifd-transfer", "off"),
    "multifd": ("--multifd-transfer", "on", "--multifd-channels", "2"),
}


@attrs.frozen
class Cell:
    side: str  # which mount gets the rule: "source" or "destination"
    flags: str
    rule: str
    phase: str  # the phase the failing side reports
    cause: str  # the errno name in its error line
    #: The side whose device operation fails (a corrupted source stream fails
    #: at the destination's driver).
    fails: str = ""

    @property
    def failing_side(self) -> str:
        return self.fails or self.side


CELLS = {
    "setup: RUNNING->PRE_COPY fails": Cell(
        "source", PRECOPY, "arc RUNNING PRE_COPY EIO", "setup", "EIO"
    ),
    "pre-copy: read fails inside the initial bytes": Cell(
        "source", PRECOPY, "read EIO after 1048576", "pre-copy", "EIO"
    ),
    "stop: PRE_COPY->PRE_COPY_P2P fails": Cell(
        "source", PRECOPY, "arc PRE_COPY PRE_COPY_P2P EIO", "stop", "EIO"
    ),
    "stop: RUNNING->RUNNING_P2P fails": Cell(
        "source", P2P, "arc RUNNING RUNNING_P2P EIO", "stop", "EIO"
    ),
    "stop: RUNNING_P2P->STOP fails": Cell("source", P2P, "arc RUNNING_P2P STOP EIO", "stop", "EIO"),
    # QEMU requests STOP_COPY of a pre-copy device when the VM stops (vmstate change).
    "stop: PRE_COPY_P2P->STOP_COPY fails": Cell(
        "source", PRECOPY, "arc PRE_COPY_P2P STOP_COPY ENOSPC", "stop", "ENOSPC"
    ),
    "stop-copy: read fails after 1 MiB": Cell(
        "source", P2P, "read EIO after 1048576", "stop-copy", "EIO"
    ),
    "load: write fails after 1 MiB": Cell(
        "destination", PRECOPY, "write EIO after 1048576", "load", "EIO"
    ),
    "load: destination rejects a corrupt stream header": Cell(
        # The source flips a bit in the stream's magic; the destination driver refuses it.
        "source",
        P2P,
        "corrupt after 3",
        "load",
        "EINVAL",
        fails="destination",
    ),
    "start: RESUMING->STOP fails": Cell(
        "destination", P2P, "arc RESUMING STOP EIO", "start", "EIO"
    ),
    "start: STOP->RUNNING_P2P fails": Cell(
        "destination", PRECOPY, "arc STOP RUNNING_P2P EIO", "start", "EIO"
    ),
}


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[Mounts]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


@pytest.fixture
def pair(mounts: Mounts, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh source/destination device pair with the cell's flags, removed afterwards."""
    src, dst = mounts
    flags: str = request.param
    name = f"f{next(_names)}"
    assert src.create(name, "ram", f"size=4M flags={flags} seed={7 + len(name)}") is None
    assert dst.create(name, "ram", f"size=4M flags={flags}") is None
    yield name
    for mount in (src, dst):
        mount.write(name, "faults", "\n")
        mount.reset(name)
        assert mount.remove(name) is None


def _cases() -> Iterator[object]:
    for mode in MODES:
        for label, cell in CELLS.items():
            yield pytest.param(cell, mode, cell.flags, id=f"{mode}-{label}")


@pytest.mark.parametrize(("cell", "mode", "pair"), list(_cases()), indirect=["pair"])
def test_fault_fails_cleanly_and_the_mounts_keep_serving(
    mounts: Mounts, pair: str, cell: Cell, mode: str
) -> None:
    src, dst = mounts
    name = pair
    before = digest(src, name)
    faulted = src if cell.side == "source" else dst
    failing = src if cell.failing_side == "source" else dst
    assert faulted.write(name, "faults", cell.rule + "\n") is None

    started = time.monotonic()
    source, dest = migrate(
        "tcp:127.0.0.1:0",
        [str(src.device(name))],
        [str(dst.device(name))],
        *MODES[mode],
        timeout=BOUND_S,
    )
    assert time.monotonic() - started < BOUND_S
    assert source.returncode != 0, source.stderr
    assert dest.returncode != 0, dest.stderr
    src_line, dst_line = error_line(source.stderr), error_line(dest.stderr)
    mine = src_line if cell.failing_side == "source" else dst_line
    assert phase_of(mine) == cell.phase, mine
    assert f"device {failing.device(name)}" in mine, mine
    assert cell.cause in mine, mine
    if cell.failing_side == "destination":
        # The source learns of a failed load from the destination.
        assert phase_of(src_line) in ("load", "stop-copy", "config", "complete"), src_line
    else:
        # The destination sees the source hang up.
        assert phase_of(dst_line) == "load", dst_line

    assert src.state(name) == "RUNNING"
    assert digest(src, name) == before
    assert_reset(dst, name)
    assert cell.rule in faulted.read(name, "faults")  # the rule is still there: nothing reset it

    # The mounts keep serving: without the rule the same pair migrates.
    assert faulted.write(name, "faults", "\n") is None
    source, dest = migrate(
        "tcp:127.0.0.1:0",
        [str(src.device(name))],
        [str(dst.device(name))],
        *MODES[mode],
        timeout=BOUND_S,
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    assert src.state(name) == "STOP"
    assert dst.state(name) == "RUNNING"
    assert digest(dst, name) == digest(src, name) == before
