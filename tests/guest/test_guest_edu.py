"""The edu example driver driven by an unmodified Linux guest, from userspace, across a live
migration (QEMU 10, TCG or KVM, under ``fakevfio run``).

What we did not write checks each result: the guest kernel enumerates the device
and assigns BAR0 (its sysfs ``resource``), busybox ``devmem`` makes the MMIO
accesses through the kernel's ``/dev/mem`` and QEMU's vfio-pci region path, the
kernel's ``memmap=64K$0x8000000`` reserves the guest-physical page the DMA
engine reads and writes (``dd`` on ``/dev/mem`` fills and checks it), QEMU maps
guest RAM into the iommufd IOAS the device DMAs through, and QEMU migrates the
guest. The expected register values are QEMU's edu (docs/specs/edu.rst): the
identification 0x010000ed, the inverted liveness value, 10! = 0x375f00, the
interrupt status bits 0x001 (factorial) and 0x100 (DMA).

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

from fakevfio.guest import GuestSession
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
#: What QEMU logs when its SET_IRQS for MSI fails (see the xfail below).
SET_IRQS_FROM_A_THREAD_FAILS = "Failed to setup MSI fds"

#: The guest's part: each check prints one ``EDU ...`` line or fails with ``EDU FAIL``.
SCRIPT = textwrap.dedent(
    f"""\
    fail() {{ echo "EDU FAIL: $*"; exit 1; }}
    set -- $(grep -l 0x11e8 /sys/bus/pci/devices/*/device)
    [ $# -eq 2 ] || fail "expected two 1234:11e8 devices in /sys/bus/pci/devices, found $#"
    D=${{1%/device}}; D1=${{2%/device}}
    grep -q 0x1234 $D/vendor || fail "device $D is not vendor 0x1234"
    BAR=$(( $(cut -d' ' -f1 $D/resource | head -1) ))
    BAR1=$(( $(cut -d' ' -f1 $D1/resource | head -1) ))
    [ $BAR -ne 0 ] && [ $BAR1 -ne 0 ] || fail "BAR0 of $D or $D1 is not assigned"
    B=$BAR
    r() {{ devmem $((B + $1)) 32; }}
    w() {{ devmem $((B + $1)) 32 $2; }}
    w64() {{ devmem $((B + $1)) 64 $2; }}
    expect() {{ V=$(r $1); [ "$V" = "$2" ] || fail "register $1 is $V, expected $2 ($3)"; }}
    wait_clear() {{
        n=0
        while [ $(( $(r $1) & $2 )) -ne 0 ]; do
            n=$((n + 1)); [ $n -lt 3000 ] || fail "register $1 bit $2 never cleared"
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

    echo "EDU device ${{D##*/}} BAR0 $(printf %x $BAR)"
    expect 0x00 0x010000ED identification; echo "EDU id $V"
    w 0x04 0x12345678; expect 0x04 0xEDCBA987 liveness; echo "EDU liveness $V"
    w 0x20 0x80; w 0x08 10; wait_clear 0x20 1
    expect 0x08 0x00375F00 "factorial of 10"; echo "EDU factorial 10 = $((V))"
    expect 0x24 0x00000001 "factorial interrupt"; echo "EDU irq after factorial $V"
    w 0x64 1; expect 0x24 0x00000000 "acknowledged"; w 0x20 0
    w 0x60 0x00010000; expect 0x24 0x00010000 "raised"; echo "EDU irq raised $V"
    w 0x64 0x00010000; expect 0x24 0x00000000 "acknowledged"
    dd if=/dev/urandom of=/tmp/pattern bs=4096 count=1 2>/dev/null
    SUM=$(sha256sum /tmp/pattern | cut -d' ' -f1)
    mem_fill /tmp/pattern $P
    [ "$(mem_sum $P)" = "$SUM" ] || fail "guest memory at $P lost the pattern"
    dma $P 0x40000 4096 5
    expect 0x24 0x00000100 "DMA interrupt"; w 0x64 0x100
    mem_fill /dev/zero $P; [ "$(mem_sum $P)" = "$ZERO" ] || fail "zeroing $P failed"
    dma 0x40000 $P 4096 7
    expect 0x24 0x00000100 "DMA interrupt"; w 0x64 0x100
    [ "$(mem_sum $P)" = "$SUM" ] || fail "the DMA round trip gave other bytes"
    echo "EDU dma round trip $SUM"
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
    cfg8() {{ echo $(( $(od -An -tu1 -j $(($1)) -N 1 $D/config) )); }}
    cfg_write() {{  # OFFSET BYTE...
        off=$1; shift; bytes=""
        for b in "$@"; do bytes="$bytes$(printf '\\%03o' $b)"; done
        printf "$bytes" | dd of=$D/config bs=1 seek=$((off)) 2>/dev/null || fail "config at $off"
    }}
    cap=$(cfg8 0x34)
    while [ $cap -ne 0 ] && [ $(cfg8 $cap) -ne 5 ]; do cap=$(cfg8 $((cap + 1))); done
    [ $cap -ne 0 ] || fail "edu0 has no MSI capability in its config space"
    ctrl=$(cfg8 $((cap + 2)))
    data=$((cap + 8)); [ $((ctrl & 0x80)) -eq 0 ] || data=$((cap + 12))
    cfg_write 4 $(( $(cfg8 4) | 4 )) $(cfg8 5)  # bus master: QEMU sends MSIs only then
    cfg_write $((cap + 4)) 0x00 0x00 0xe0 0xfe  # address 0xfee00000: CPU 0
    cfg_write $data {MSI_VECTOR:#x} 0x00  # data: the vector, fixed delivery, edge
    cfg_write $((cap + 2)) $((ctrl | 1))  # MSI enable
    echo "EDU msi enabled at capability $cap"
    w 0x60 0x1
    expect 0x24 0x00000001 "raised with MSI"
    sleep 1
    w 0x64 0x1
    echo "EDU msi raised"
    """
)


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
    ):
        image = session.build(SCRIPT)
        names = ["edu0", "edu1"]
        src = session.boot(image, src_mnt, names, name="src", cmdline=CMDLINE)
        dst = session.boot(image, dst_mnt, names, name="dst", cmdline=CMDLINE, incoming=True)
        src.wait_for_line(r"^EDU id 0x010000ED$", timeout=30)
        src.wait_for_line(r"^EDU liveness 0xEDCBA987$", timeout=30)
        src.wait_for_line(r"^EDU factorial 10 = 3628800$", timeout=30)
        src.wait_for_line(r"^EDU irq after factorial 0x00000001$", timeout=30)
        src.wait_for_line(r"^EDU irq raised 0x00010000$", timeout=30)
        pattern = src.wait_for_line(r"^EDU dma round trip ([0-9a-f]{64})$", timeout=60).group(1)
        src.wait_for_line(r"^EDU slow dma started$", timeout=30)
        src.wait_for_line(r"^EDU ready for migration$", timeout=30)
        slow = src_mnt.info("edu1")
        assert slow["pending"]["dma"] is True
        assert slow["counters"]["dma_transfers"] == 0

        before = src_mnt.info("edu0")
        assert before["counters"]["dma_transfers"] == 2
        assert before["counters"]["dma_bytes_to_device"] == 4096
        assert before["counters"]["dma_bytes_to_ram"] == 4096
        assert before["counters"]["dma_faults"] == before["counters"]["dma_range_errors"] == 0
        assert before["counters"]["irqs_raised"] == 4  # factorial, raise, two DMAs
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
        if SET_IRQS_FROM_A_THREAD_FAILS in dst.log_path.read_text(errors="replace"):
            pytest.xfail(
                "QEMU's MSI enable (SET_IRQS from its vCPU thread) fails under fakevfio run: "
                "fakevfio/_run/_irq_ioctls.py names the eventfds with the caller's thread id "
                "(call.pid) instead of its thread group (call.tgid), so pidfd_open fails"
            )
        kernel = [line for line in dst.console_lines() if "No irq handler for vector" in line]
        assert len(kernel) == 1, kernel
        assert f".{MSI_VECTOR} No irq handler" in kernel[0]
        irqs = dst_mnt.info("edu0")["irqs"]
        assert irqs["active"] == "msi"
        assert irqs["msi"]["vectors"]["0"]["signalled"] == 1
        assert dst_mnt.info("edu0")["irq_undelivered"] == 0
