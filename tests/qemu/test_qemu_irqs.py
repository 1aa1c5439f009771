"""Each QEMU of the matrix sets up a fakevfio device's interrupts and receives its INTx.

QEMU runs under ``fakevfio run`` with the device as ``-device vfio-pci`` on
the iommufd cdev path (fds opened inside the private namespace, as in
tests/test_qemu.py) and QEMU's own trace events written to a file
(``-trace vfio_intx_*,file=...``, and ``vfio_pci_intx_*``). What we check
comes from QEMU, not from us:

* realize: QEMU's ``vfio_intx_enable`` asks GET_IRQ_INFO and installs an INTx
  trigger eventfd through SET_IRQS; the ``irqs`` file shows it enabled with
  the caller's ``PID:FD`` and QEMU's trace shows ``vfio_intx_enable``. It also
  registers the REQ notifier (``vfio_register_req_notifier``).
* delivery (TCG, QEMU's userspace INTx path): ``raise intx`` on the ``irqs``
  file signals the trigger; QEMU's handler traces ``vfio_intx_interrupt`` and
  asserts the pin; the line is automasked, so a second raise is only pending.
* the unmask path QEMU uses without KVM: a guest access to a BAR makes QEMU
  call its INTx EOI (trace ``vfio_intx_eoi`` in QEMU 10.0, renamed
  ``vfio_pci_intx_eoi`` by 11.1) and SET_IRQS UNMASK with DATA_NONE; the
  device re-sends the pending interrupt (a second ``vfio_intx_interrupt``).
  The BAR access is HMP ``xp`` at the address SeaBIOS assigned to BAR0
  (HMP ``info pci``).

With ``-accel kvm`` QEMU would install a resample eventfd instead (UNMASK with
DATA_EVENTFD, signalled by KVM's irqfd resampler; tests/fakevfio/run covers that
path with a C program), but its realize fails first: KVM's kvm-vfio device
refuses a cdev that is not a kernel VFIO file (KVM_DEV_VFIO_FILE_ADD: EINVAL).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Qmp
from tests.conftest import MountFactory, MountHandle
from tests.test_qemu import qemu_session

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]


@contextlib.contextmanager
def run_qemu(qemu: str, mount: MountHandle, tmp: Path, accel: str, *extra: str) -> Iterator[Qmp]:
    """QEMU under ``fakevfio run`` (fd 3: the cdev, fd 4: /dev/iommu), trace to tmp/trace."""
    qmp_path, log, trace = tmp / "qmp", tmp / "qemu.log", tmp / "trace"
    script = 'exec 3<>/dev/vfio/devices/vfio0 4<>/dev/iommu && exec "$@"'
    cmd = [qemu, "-accel", accel, "-machine", "q35", "-nodefaults", "-display", "none"]
    cmd += ["-m", "64M", "-object", "iommufd,id=iommufd0,fd=4"]
    cmd += ["-device", "vfio-pci,id=gpu0,iommufd=iommufd0,fd=3,rombar=0"]
    cmd += ["-S", "-trace", f"vfio_intx_*,file={trace}", "-trace", f"vfio_pci_intx_*,file={trace}"]
    cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off", *extra]
    argv = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount.path), "--"]
    argv += ["sh", "-c", script, "sh", *cmd]
    with qemu_session(argv, qmp_path, log) as qmp:
        yield qmp


def irqs(mount: MountHandle) -> dict[str, dict[str, str]]:
    """The ``irqs`` file: index (or ``index vector``) -> its key/value pairs."""
    lines = mount.read("gpu0", "irqs").splitlines()
    out: dict[str, dict[str, str]] = {"active": {"index": lines[0].split()[1]}}
    for line in lines[1:]:
        words = line.split()
        if words[1].isdigit():  # "msix 0 trigger ...": a vector
            key, rest = " ".join(words[:2]), words[2:]
        else:
            key, rest = words[0], words[1:]
        out[key] = dict(zip(rest[::2], rest[1::2], strict=True))
    return out


#: QEMU's INTx EOI trace event: QEMU 10.0's name, QEMU 11.1's.
EOI = ("vfio_intx_eoi", "vfio_pci_intx_eoi")


def trace_lines(path: Path, *events: str) -> list[str]:
    """The trace lines of any of ``events`` (a line starts with the event's name)."""
    lines = path.read_text().splitlines()
    return [line for line in lines if line.split(" ", 1)[0] in events]


def wait_for(check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[MountHandle]:
    with fakevfio_mount(["gpu0=ram:size=64K"]) as m:
        yield m


def test_qemu_realize_sets_up_intx_and_receives_it(
    mount: MountHandle, tmp_path: Path, qemu: str
) -> None:
    trace = tmp_path / "trace"
    with run_qemu(qemu, mount, tmp_path, "tcg") as qmp:
        state = irqs(mount)
        assert state["active"]["index"] == "intx", state
        assert state["intx"]["enabled"] == "1", state
        assert re.fullmatch(r"\d+:\d+", state["intx 0"]["trigger"]), state
        assert state["intx"]["resample"] == "-"  # TCG: QEMU unmasks by ioctl
        assert re.fullmatch(r"\d+:\d+", state["req 0"]["trigger"]), state  # REQ notifier
        assert trace_lines(trace, "vfio_intx_enable")

        # the BIOS assigns BAR0; then the first raise reaches QEMU's INTx handler
        qmp.cmd("cont")
        bar0 = wait_for(
            lambda: re.search(r"BAR0: 32 bit memory at (0x[0-9a-f]+)", qmp.hmp("info pci"))
        )
        assert bar0, qmp.hmp("info pci")
        address = int(bar0.group(1), 16)
        assert address
        # The firmware goes on running and may touch BAR0, which is an EOI in QEMU (the
        # unmask this test checks below, by its own access): paused vCPUs make none.
        qmp.cmd("stop")
        assert mount.write("gpu0", "irqs", "raise intx\n") is None
        assert wait_for(lambda: trace_lines(trace, "vfio_intx_interrupt")), trace.read_text()
        assert irqs(mount)["intx"]["masked"] == "1"
        assert mount.write("gpu0", "irqs", "raise intx\n") is None  # automasked: pending, not sent
        time.sleep(0.3)
        assert len(trace_lines(trace, "vfio_intx_interrupt")) == 1
        assert irqs(mount)["intx"]["pending"] == "1"

        # a BAR access: QEMU's EOI unmasks (SET_IRQS UNMASK DATA_NONE), the pending one is re-sent
        qmp.hmp(f"xp /1wx 0x{address:x}")
        assert wait_for(lambda: trace_lines(trace, *EOI)), trace.read_text()
        assert wait_for(lambda: len(trace_lines(trace, "vfio_intx_interrupt")) == 2)
        state = irqs(mount)
        assert int(state["intx"]["unmasks"]) >= 1
        assert state["intx 0"]["signalled"] == "2"
