"""The edu example driver driven by an unmodified Linux guest, from userspace, across a live
migration (QEMU 10, TCG or KVM, under ``fakevfio run``).

What we did not write checks each result: the guest kernel enumerates the device
and assigns BAR0 (its sysfs ``resource``), busybox ``devmem`` makes the MMIO
accesses through the kernel's ``/dev/mem`` and QEMU's vfio-pci region path, the
kernel's ``memmap=64K$0x8000000`` reserves the guest-physical page the DMA
engine reads and writes (``dd`` on ``/dev/mem`` fills and checks it), QEMU maps
guest RAM into the iommufd IOAS the device DMAs through, and QEMU migrates the
guest. The expected register values are QEMU's edu's: the same probe script runs
in a third guest on QEMU's own ``-device edu`` (no fakevfio), whose answers must
be :data:`EXPECTED_PROBES` (identification 0x010000ed, the inverted liveness
value, access sizes, 32-bit factorials, interrupt status bits 0x001 and 0x100,
a DMA round trip), and ours must answer the same.

The guest script fills a page of its memory with random bytes, DMAs it into the
device's buffer and back (checking the bytes by SHA-256), zeroes the page, and
waits; the test migrates the guest with the bytes living only in the device's
buffer, then rings a doorbell on the *destination* device (it raises interrupt
status bit 0x20000 through the destination mount's BAR file), and the guest,
now on the destination, DMAs the buffer back and finds the same bytes.

A second edu, whose DMAs take a minute, has a DMA in flight when the migration
starts (its empty buffer to a second page, which holds the pattern): the
driver finishes it on the source before its STOP, so on the destination the
guest finds the command done, its interrupt pending and the page zeroed, which
also shows that QEMU migrated the guest RAM the device wrote during stop-copy.

Last, the guest enables MSI in edu0's capability (address 0xfee00000, a vector
with no handler) through sysfs ``config``; QEMU enables MSI over SET_IRQS, an
edu interrupt becomes an MSI message, and the guest kernel reports the vector
("No irq handler for vector"). Interrupts are checked from both sides: the edu
interrupt status register in the guest and the ``irqs`` counts of the device.
"""

from __future__ import annotations

import os
import re
import struct
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakevfio.guest import Guest, GuestSession
from fakevfio.pytest_plugin import guest_missing_reason
from tests.conftest import MountFactory, MountHandle

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(180)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "edu"
DRIVER_ARGS = ["--driver", "edu=fakevfio_edu:EduDriver"]
#: edu0 as QEMU's edu; edu1 takes a minute per DMA, so its DMA is in flight at the migration.
DEVICES = ["edu0=edu", "edu1=edu:dma_delay_ms=60000"]
#: The guest-physical page the DMAs use (the kernel's memmap= keeps it out of its RAM).
PAGE = 0x8000000
CMDLINE = f"memmap=64K${PAGE:#x}"
#: Interrupt status bit the test raises on the destination to tell the guest it moved.
DOORBELL = 0x00020000
#: ... and this one to let it go on to the MSI part.
MSI_DOORBELL = 0x00040000
MMIO_IRQ_RAISE = 0x60
#: The vector the guest programs into edu0's MSI data (no handler: the kernel says so).
MSI_VECTOR = 0xD0
#: What QEMU logs when its SET_IRQS for MSI fails.
SET_IRQS_FROM_A_THREAD_FAILS = "Failed to setup MSI fds"

#: The guest's helpers: the 1234:11e8 devices ($D, $BAR; a second one as $D1, $BAR1), bus
#: mastering on (a real driver's pci_set_master: QEMU's own edu DMAs only then), MMIO
#: through busybox devmem on $B (the device in use), the reserved pages through dd.
SETUP = textwrap.dedent(
    f"""\
    fail() {{ echo "EDU FAIL: $*"; exit 1; }}
    set -- $(grep -l 0x11e8 /sys/bus/pci/devices/*/device)
    [ $# -ge 1 ] || fail "no 1234:11e8 device in /sys/bus/pci/devices"
    D=${{1%/device}}; D1=${{2%/device}}
    cfg8() {{ echo $(( $(od -An -tu1 -j $(($2)) -N 1 $1/config) )); }}
    cfg_write() {{  # DEVICE OFFSET BYTE...
        dev=$1; off=$2; shift 2; bytes=""
        for b in "$@"; do bytes="$bytes$(printf '\\%03o' $b)"; done
        printf "$bytes" | dd of=$dev/config bs=1 seek=$((off)) 2>/dev/null || fail "config $off"
    }}
    for d in $D $D1; do
        grep -q 0x1234 $d/vendor || fail "device $d is not vendor 0x1234"
        cfg_write $d 4 $(( $(cfg8 $d 4) | 6 )) $(cfg8 $d 5)  # memory space, bus master
    done
    BAR=$(( $(cut -d' ' -f1 $D/resource | head -1) ))
    [ $BAR -ne 0 ] || fail "BAR0 of $D is not assigned"
    [ -z "$D1" ] || BAR1=$(( $(cut -d' ' -f1 $D1/resource | head -1) ))
    B=$BAR
    r() {{ devmem $((B + $1)) 32; }}
    w() {{ devmem $((B + $1)) 32 $2; }}
    w64() {{ devmem $((B + $1)) 64 $2; }}
    expect() {{ V=$(r $1); [ "$V" = "$2" ] || fail "register $1 is $V, expected $2 ($3)"; }}
    wait_clear() {{
        polls=0
        while [ $(( $(r $1) & $2 )) -ne 0 ]; do
            polls=$((polls + 1)); [ $polls -lt 3000 ] || fail "register $1 bit $2 never cleared"
        done
    }}
    P={PAGE:#x}
    P2=$((P + 4096))
    dma() {{ w64 0x80 $1; w64 0x88 $2; w64 0x90 $3; w64 0x98 $4; wait_clear 0x98 1; }}
    mem_sum() {{
        dd if=/dev/mem bs=4096 skip=$(($1 / 4096)) count=1 2>/dev/null | sha256sum | cut -d' ' -f1
    }}
    mem_fill() {{
        dd if=$1 of=/dev/mem bs=4096 seek=$(($2 / 4096)) count=1 2>/dev/null || fail "write $2"
    }}
    ZERO=$(dd if=/dev/zero bs=4096 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
    """
)

#: What the guest checks on the first device; each ``EDU probe`` line is a value the guest
#: read, and the same script on QEMU's own edu (``-device edu``) must print the same lines.
PROBES = textwrap.dedent(
    """\
    echo "EDU probe id $(r 0x00)"
    w 0x04 0x12345678; echo "EDU probe liveness $(r 0x04)"
    devmem $((B + 4)) 16 0x1234; echo "EDU probe liveness after a 16-bit write $(r 0x04)"
    echo "EDU probe 16@0 $(devmem $B 16) 8@0 $(devmem $B 8) 64@0 $(devmem $B 64)"
    echo "EDU probe 32@2 $(devmem $((B + 2)) 32)"
    echo "EDU probe unlisted $(r 0x84) $(r 0x60) $(r 0x64) $(r 0x100) $(r 0x40000)"
    w64 0x80 0x123456789; A=$(devmem $((B + 0x80)) 64)
    w 0x80 0x1000; A="$A $(devmem $((B + 0x80)) 64)"
    w 0x84 0x5; echo "EDU probe dma source $A $(devmem $((B + 0x80)) 64)"
    w 0x20 0xff; echo "EDU probe status $(r 0x20)"; w 0x20 0
    w 0x98 0x6; echo "EDU probe command without start $(r 0x98)"
    for k in 10 13 40 0; do
        w 0x08 $k; wait_clear 0x20 1; echo "EDU probe factorial $k = $(r 0x08)"
    done
    w 0x20 0x80; w 0x08 10; wait_clear 0x20 1
    echo "EDU probe irq after factorial $(r 0x24)"
    w 0x64 1; echo "EDU probe irq acknowledged $(r 0x24)"; w 0x20 0
    w 0x60 0x00010000; echo "EDU probe irq raised $(r 0x24)"
    w 0x60 0x00000300; echo "EDU probe irq raised again $(r 0x24)"
    w 0x64 0x00010100; echo "EDU probe irq acknowledged $(r 0x24)"
    w 0x64 0xffffffff
    dd if=/dev/urandom of=/tmp/pattern bs=4096 count=1 2>/dev/null
    SUM=$(sha256sum /tmp/pattern | cut -d' ' -f1)
    mem_fill /tmp/pattern $P
    [ "$(mem_sum $P)" = "$SUM" ] || fail "guest memory at $P lost the pattern"
    dma $P 0x40000 4096 5
    echo "EDU probe irq after a DMA $(r 0x24)"; w 0x64 0x100
    mem_fill /dev/zero $P; [ "$(mem_sum $P)" = "$ZERO" ] || fail "zeroing $P failed"
    dma 0x40000 $P 4096 7
    echo "EDU probe irq after a DMA $(r 0x24)"; w 0x64 0x100
    [ "$(mem_sum $P)" = "$SUM" ] || fail "the DMA round trip gave other bytes"
    echo "EDU probe dma round trip ok"
    echo "EDU pattern $SUM"
    """
)

#: The probes as QEMU's own edu answers them (``-device edu``, QEMU 10).
EXPECTED_PROBES = [
    "EDU probe id 0x010000ED",
    "EDU probe liveness 0xEDCBA987",
    "EDU probe liveness after a 16-bit write 0xEDCBA987",
    "EDU probe 16@0 0x0000 8@0 0x00 64@0 0xFFFFFFFFFFFFFFFF",
    "EDU probe 32@2 0x00000000",
    "EDU probe unlisted 0xFFFFFFFF 0xFFFFFFFF 0xFFFFFFFF 0xFFFFFFFF 0xFFFFFFFF",
    "EDU probe dma source 0x0000000123456789 0x0000000000001000 0x0000000000001000",
    "EDU probe status 0x00000080",
    "EDU probe command without start 0x00000000",
    "EDU probe factorial 10 = 0x00375F00",
    "EDU probe factorial 13 = 0x7328CC00",
    "EDU probe factorial 40 = 0x00000000",
    "EDU probe factorial 0 = 0x00000001",
    "EDU probe irq after factorial 0x00000001",
    "EDU probe irq acknowledged 0x00000000",
    "EDU probe irq raised 0x00010000",
    "EDU probe irq raised again 0x00010300",
    "EDU probe irq acknowledged 0x00000200",
    "EDU probe irq after a DMA 0x00000100",
    "EDU probe irq after a DMA 0x00000100",
    "EDU probe dma round trip ok",
]

#: The rest, on the fake devices: the migration with the bytes only in edu0's buffer and a
#: DMA in flight on edu1, the doorbells, the DMA back on the destination, MSI.
MIGRATION = textwrap.dedent(
    f"""\
    mem_fill /dev/zero $P
    mem_fill /tmp/pattern $P2
    B=$BAR1  # the slow device (a DMA takes a minute): its zero buffer goes to $P2
    expect 0x00 0x010000ED "the second device's identification"
    w64 0x80 0x40000; w64 0x88 $P2; w64 0x90 4096; w64 0x98 7
    expect 0x98 0x00000007 "a DMA in flight"; echo "EDU slow dma started"
    B=$BAR
    echo "EDU ready for migration"
    while [ $(( $(r 0x24) & {DOORBELL:#x} )) -eq 0 ]; do usleep 20000; done
    w 0x64 {DOORBELL:#x}; expect 0x24 0x00000000 "doorbell acknowledged"
    expect 0x04 0xEDCBA987 "liveness after migration"
    expect 0x08 0x00375F00 "factorial after migration"
    echo "EDU doorbell on the destination"
    [ "$(mem_sum $P)" = "$ZERO" ] || fail "the page was not zero before the DMA"
    dma 0x40000 $P 4096 7
    expect 0x24 0x00000100 "DMA interrupt after migration"; w 0x64 0x100
    echo "EDU dma after migration $(mem_sum $P)"
    B=$BAR1
    expect 0x98 0x00000006 "the in-flight DMA completed"
    expect 0x24 0x00000100 "the in-flight DMA's interrupt"; w 0x64 0x100
    [ "$(mem_sum $P2)" = "$ZERO" ] || fail "$P2 does not hold what the in-flight DMA wrote"
    echo "EDU in-flight dma landed"
    B=$BAR
    while [ $(( $(r 0x24) & {MSI_DOORBELL:#x} )) -eq 0 ]; do usleep 20000; done
    w 0x64 {MSI_DOORBELL:#x}
    cap=$(cfg8 $D 0x34)
    while [ $cap -ne 0 ] && [ $(cfg8 $D $cap) -ne 5 ]; do cap=$(cfg8 $D $((cap + 1))); done
    [ $cap -ne 0 ] || fail "edu0 has no MSI capability in its config space"
    ctrl=$(cfg8 $D $((cap + 2)))
    data=$((cap + 8)); [ $((ctrl & 0x80)) -eq 0 ] || data=$((cap + 12))
    cfg_write $D $((cap + 4)) 0x00 0x00 0xe0 0xfe  # address 0xfee00000: CPU 0
    cfg_write $D $data {MSI_VECTOR:#x} 0x00  # data: the vector, fixed delivery, edge
    cfg_write $D $((cap + 2)) $((ctrl | 1))  # MSI enable
    echo "EDU msi enabled at capability $cap"
    w 0x60 0x1
    expect 0x24 0x00000001 "raised with MSI"
    sleep 1
    w 0x64 0x1
    echo "EDU msi raised"
    """
)
SCRIPT = SETUP + PROBES + MIGRATION
REFERENCE_SCRIPT = SETUP + PROBES


@pytest.fixture
def _need_guest() -> None:
    reason = guest_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"guest tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def session(_need_guest: None, tmp_path: Path) -> Iterator[GuestSession]:
    with GuestSession(workdir=tmp_path / "guests") as s:
        yield s


@pytest.fixture
def _edu_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mounts' processes import the example from its source tree."""
    path = os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path.rstrip(os.pathsep))


def _raise_on(mnt: MountHandle, device: str, bits: int) -> None:
    """Write the interrupt raise register through the mount's BAR file (4 bytes, as MMIO)."""
    fd = os.open(mnt.file(device, "regions/bar0"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, struct.pack("<I", bits), MMIO_IRQ_RAISE) == 4
    finally:
        os.close(fd)


def _probes(guest: Guest) -> list[str]:
    return [line for line in guest.console_lines() if line.startswith("EDU probe ")]


def _intx_signalled(mnt: MountHandle, device: str) -> int:
    intx = mnt.info(device)["irqs"]["intx"]
    return int(intx["vectors"]["0"]["signalled"])


@pytest.mark.usefixtures("_edu_on_path")
def test_guest_drives_edu_and_its_dma_buffer_survives_a_live_migration(
    session: GuestSession, fakevfio_mount: MountFactory
) -> None:
    with (
        fakevfio_mount(DEVICES, extra_args=DRIVER_ARGS) as src_mnt,
        fakevfio_mount(DEVICES, extra_args=DRIVER_ARGS) as dst_mnt,
        session,  # the guests end before their mounts do, even when the test fails
    ):
        # QEMU's own edu runs the same probes beside ours: what it answers is expected.
        reference = session.boot(
            session.build(REFERENCE_SCRIPT),
            name="qemu-edu",
            cmdline=CMDLINE,
            extra_args=["-device", "edu"],
            wait_ready=False,
        )
        image = session.build(SCRIPT)
        names = ["edu0", "edu1"]
        src = session.boot(image, src_mnt, names, name="src", cmdline=CMDLINE)
        dst = session.boot(image, dst_mnt, names, name="dst", cmdline=CMDLINE, incoming=True)
        src.wait_for_line(r"^EDU probe dma round trip ok$", timeout=90)
        pattern = src.wait_for_line(r"^EDU pattern ([0-9a-f]{64})$", timeout=30).group(1)
        src.wait_for_line(r"^EDU slow dma started$", timeout=30)
        src.wait_for_line(r"^EDU ready for migration$", timeout=30)
        reference.expect_success(timeout=90)
        assert _probes(reference) == EXPECTED_PROBES  # QEMU's edu, as we expect it
        assert _probes(src) == _probes(reference)  # ours answers the same
        slow = src_mnt.info("edu1")
        assert slow["pending"]["dma"] is True
        assert slow["counters"]["dma_transfers"] == 0

        before = src_mnt.info("edu0")
        assert before["counters"]["dma_transfers"] == 2
        assert before["counters"]["dma_bytes_to_device"] == 4096
        assert before["counters"]["dma_bytes_to_ram"] == 4096
        assert before["counters"]["dma_faults"] == before["counters"]["dma_range_errors"] == 0
        assert before["counters"]["irqs_raised"] == 5  # factorial, two raises, two DMAs
        assert before["dma"]["bytes_read"] >= 4096
        assert before["irqs"]["active"] == "intx"  # QEMU's realize set up INTx
        assert _intx_signalled(src_mnt, "edu0") >= 4  # each interrupt reached QEMU
        assert before["intx_asserted"] is False  # all acknowledged

        stats = session.migrate(src, dst)
        assert stats.status == "completed"
        assert stats.vfio_transferred >= 2 * 8192  # two devices' registers and buffers
        assert src.status() == "postmigrate"
        for name in names:
            assert src_mnt.info(name)["state"] == "STOP"
            after = dst_mnt.info(name)
            assert after["state"] == "RUNNING"
            assert after["state_digest"] == src_mnt.info(name)["state_digest"]
            assert after["counters"] == src_mnt.info(name)["counters"]
        # The slow DMA finished on the source, before its STOP (it wrote guest RAM there).
        slow = src_mnt.info("edu1")
        assert slow["pending"]["dma"] is False
        assert slow["counters"]["dma_transfers"] == 1
        assert slow["counters"]["dma_bytes_to_ram"] == 4096
        assert dst_mnt.info("edu1")["pending"]["dma"] is False

        signalled = _intx_signalled(dst_mnt, "edu0")
        _raise_on(dst_mnt, "edu0", DOORBELL)
        dst.wait_for_line(r"^EDU doorbell on the destination$", timeout=30)
        found = dst.wait_for_line(r"^EDU dma after migration ([0-9a-f]{64})$", timeout=60)
        assert found.group(1) == pattern
        dst.wait_for_line(r"^EDU in-flight dma landed$", timeout=30)
        final = dst_mnt.info("edu0")
        assert final["counters"]["dma_transfers"] == 3
        assert final["counters"]["dma_bytes_to_ram"] == 2 * 4096
        assert _intx_signalled(dst_mnt, "edu0") > signalled  # doorbell and DMA interrupts
        # Nothing happened on the source after the migration.
        assert src_mnt.info("edu0")["counters"]["dma_transfers"] == 2
        assert dst_mnt.info("edu1")["counters"]["dma_transfers"] == 1
        assert not any(re.match("EDU FAIL", line) for line in dst.console_lines())
        # MSI: the guest programs edu0's capability; QEMU enables MSI over SET_IRQS and
        # the guest kernel receives the message on a vector it has no handler for.
        _raise_on(dst_mnt, "edu0", MSI_DOORBELL)
        dst.wait_for_line(r"^EDU msi enabled at capability \d+$", timeout=30)
        dst.wait_for_line(r"^EDU msi raised$", timeout=30)
        dst.expect_success(timeout=30)
        # QEMU enables MSI with SET_IRQS from a vCPU thread: the eventfds are named by
        # the caller's thread group, or pidfd_open of the thread id fails.
        assert SET_IRQS_FROM_A_THREAD_FAILS not in dst.log_path.read_text(errors="replace")
        kernel = [line for line in dst.console_lines() if "No irq handler for vector" in line]
        if image.kernel_package.name.startswith("linux-image-6.1."):
            # Debian 12's guest kernel says so (x86 common_interrupt); Debian 13's 6.12
            # was seen printing nothing here, so there only the device side is checked.
            assert len(kernel) == 1, kernel
            assert f".{MSI_VECTOR} No irq handler" in kernel[0]
        else:
            assert len(kernel) <= 1, kernel
        irqs = dst_mnt.info("edu0")["irqs"]
        assert irqs["active"] == "msi"
        assert irqs["msi"]["vectors"]["0"]["signalled"] == 1
        assert dst_mnt.info("edu0")["irq_undelivered"] == 0
