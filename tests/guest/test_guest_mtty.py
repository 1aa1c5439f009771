"""A Linux guest drives the mtty example through its own 8250_pci driver, across a migration.

The guest is the guest kit's (:mod:`fakevfio.guest`): Debian's kernel and busybox
under QEMU, the mount's ``mtty:nr_ports=2`` device passed as ``-device
vfio-pci``. What is checked is what the guest kernel does with the device, not
what we wrote: the kernel's ``8250_pci`` driver (WCH CH352 entry, a 16550A per
I/O BAR) binds it and registers two ports with the device's irq; 4 KiB written
to each port comes back byte for byte through the loop-back FIFO, and the
device's line in ``/proc/interrupts`` counts the interrupts that moved them.
Then a guest loop writes numbered lines through a port and reads each back
(lock-step, so a lost or corrupt byte stops it) while QEMU live-migrates the
guest to a second mount's device, once with multifd device-state transfer on:
the loop goes on on the destination with no gap and no corrupt line, the
source device ends in STOP and the destination's RUNNING.

Guest output lines start with ``MTTY``; the host parses them. Every failure
message carries the guest's console tail (the kit's ``GuestError``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Guest, GuestSession
from tests.conftest import MountFactory, MountHandle

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]

QEMU = os.environ.get("FAKEVFIO_QEMU", "qemu-system-x86_64")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mtty"
DRIVER_ARGS = ["--driver", "mtty=fakevfio_mtty:MttyDriver"]
SPEC = "ser0=mtty:nr_ports=2"
LOOP_BYTES = 4096
#: The migration loop prints a progress line every this many verified lines.
EVERY = 10
ML = re.MULTILINE


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    if shutil.which(QEMU):
        return
    reason = f"{QEMU} is not installed (apt-get install -t bookworm-backports qemu-system-x86)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"QEMU tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _mtty_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mounts load the example plugin from the checkout (as test_examples_migrate does)."""
    path = os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path.rstrip(os.pathsep))


# The device's ports: the ttyS lines of /proc/tty/driver/serial whose I/O port is
# the start of BAR0 / BAR1 in the device's sysfs resource file.
FIND_PORTS = r"""
A=
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor):$(cat $d/device)" = "0x4348:0x3253" ] && A=$(basename $d)
done
[ -n "$A" ] || { echo "MTTY BAD no 4348:3253 device"; exit 1; }
D=/sys/bus/pci/devices/$A
IRQ=$(cat $D/irq)
echo "MTTY device $A driver=$(basename "$(readlink $D/driver)") irq=$IRQ"
TTYS=
for bar in 1 2; do
  start=$(sed -n "${bar}p" $D/resource | cut -d' ' -f1)
  port=$(printf '%08X' $((start)))
  line=$(grep -i "port:$port " /proc/tty/driver/serial)
  echo "MTTY bar$((bar - 1)) start=$start serial: $line"
  TTYS="$TTYS ttyS${line%%:*}"
done
"""

LOOPBACK = (
    FIND_PORTS
    + r"""
head -c __BYTES__ /dev/urandom > /tmp/in
echo "MTTY in $(md5sum < /tmp/in)"
for t in $TTYS; do stty -F /dev/$t raw -echo; done
# Hold each port open for the whole count: 8250 requests its irq at the first open and
# frees it at the last close, and a freed irq has no /proc/interrupts line (Linux 6.12).
holders=
for t in $TTYS; do
  sleep 600 < /dev/$t &
  holders="$holders $!"
done
sleep 0.2
before=$(awk -v irq="$IRQ:" '$1 == irq {print $2}' /proc/interrupts)
readers=
for t in $TTYS; do
  : > /tmp/out.$t
  cat /dev/$t > /tmp/out.$t &
  readers="$readers $!"
done
for t in $TTYS; do dd if=/tmp/in of=/dev/$t bs=__BYTES__ 2>/dev/null & done
for t in $TTYS; do
  n=0
  while [ "$(wc -c < /tmp/out.$t)" -lt __BYTES__ ] && [ $n -lt 600 ]; do
    sleep 0.1
    n=$((n + 1))
  done
done
kill $readers
wait $readers
after=$(awk -v irq="$IRQ:" '$1 == irq {print $2}' /proc/interrupts)
for t in $TTYS; do
  echo "MTTY $t bytes=$(wc -c < /tmp/out.$t) md5=$(md5sum < /tmp/out.$t) irqs=$before..$after"
done
grep -i "port:" /proc/tty/driver/serial | sed 's/^/MTTY serial /'
grep "^ *$IRQ:" /proc/interrupts | sed 's/^/MTTY interrupts /'
kill $holders
wait $holders 2>/dev/null
true
"""
).replace("__BYTES__", str(LOOP_BYTES))

# Lock-step: each numbered line is written, read back and compared before the
# next, so a byte lost or changed anywhere (FIFO, interrupt, migration) ends the
# loop with MTTY BAD (or a read timeout), never a silent gap.
LINES = (
    FIND_PORTS
    + r"""
t=${TTYS# }
t=${t%% *}
stty -F /dev/$t raw -echo
exec 5<>/dev/$t
echo "MTTY lines on $t"
n=0
while :; do
  n=$((n + 1))
  l="line-$n-abcdefghijklmnopqrstuvwxyz-0123456789"
  echo "$l" >&5
  IFS= read -t 20 -r got <&5 || { echo "MTTY BAD no line $n within 20 s"; exit 1; }
  [ "$got" = "$l" ] || { echo "MTTY BAD line $n came back as [$got]"; exit 1; }
  [ $((n % __EVERY__)) -eq 0 ] && echo "MTTY seq $n"
done
"""
).replace("__EVERY__", str(EVERY))


def mtty_lines(guest: Guest) -> list[str]:
    return [line for line in guest.console_lines() if line.startswith("MTTY")]


def device_info(mount: MountHandle) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(mount.read("ser0", "info"))
    return info


def no_bad_line(guest: Guest) -> None:
    bad = [line for line in mtty_lines(guest) if line.startswith("MTTY BAD")]
    if bad:
        guest.fail(f"the guest saw {bad[0]!r}")


def test_guest_8250_binds_mtty_and_both_ports_loop_back_with_interrupts(
    fakevfio_mount: MountFactory, vfio_guest: GuestSession
) -> None:
    with fakevfio_mount([SPEC], extra_args=DRIVER_ARGS) as mount:
        guest = vfio_guest.boot(LOOPBACK, mount, ["ser0"], name="mtty")
        guest.expect_success(timeout=150)
        no_bad_line(guest)
        out = "\n".join(mtty_lines(guest))
        device = re.search(r"^MTTY device (\S+) driver=(\S*) irq=(\d+)$", out, ML)
        assert device, out
        irq = int(device.group(3))
        assert device.group(2) == "serial", out  # the kernel's 8250_pci driver bound it
        assert irq > 0, out
        serial = re.findall(r"^MTTY bar(\d) start=(\S+) serial: (\d+): (.*)$", out, ML)
        assert [bar for bar, *_ in serial] == ["0", "1"], out
        for _, start, _, line in serial:
            assert int(start, 16) != 0, out  # an I/O BAR the guest assigned
            assert re.search(rf"uart:16550A port:{int(start, 16):08X} irq:{irq} ", line), out
        sent = re.search(r"^MTTY in (\w+)", out, ML)
        assert sent, out
        port_line = r"^MTTY (ttyS\d+) bytes=(\d+) md5=(\w+)\s*-? irqs=(\d+)\.\.(\d+)$"
        ports = re.findall(port_line, out, ML)
        assert len(ports) == 2, out
        for tty, size, md5, before, after in ports:
            assert (int(size), md5) == (LOOP_BYTES, sent.group(1)), f"{tty}: {out}"
            assert int(after) > int(before), f"{tty}: no interrupt counted\n{out}"
        counter_line = r"^MTTY serial \d+: uart:16550A port:\S+ irq:\d+ tx:(\d+) rx:(\d+)"
        counters = re.findall(counter_line, out, ML)
        assert (str(LOOP_BYTES), str(LOOP_BYTES)) in counters, out
        # The device side agrees: INTx is the active index and it was signalled.
        intx = device_info(mount)["irqs"]["intx"]
        assert intx["enabled"], intx
        assert intx["vectors"]["0"]["signalled"] > 0, intx


@pytest.mark.parametrize(
    ("multifd", "intx"),
    [(False, "edge"), (True, "level")],
    ids=["multifd-off-intx-edge", "multifd-on-intx-level"],
)
def test_guest_mtty_lines_go_on_across_live_migration(
    fakevfio_mount: MountFactory, vfio_guest: GuestSession, multifd: bool, intx: str
) -> None:
    """Both INTx models of the driver, each across one migration (the loop-back test
    above runs the default, edge)."""
    transfer = "on" if multifd else "off"
    vfio_options = f"rombar=0,x-migration-multifd-transfer={transfer}"
    spec = f"{SPEC},intx={intx}"
    with (
        fakevfio_mount([spec], extra_args=DRIVER_ARGS) as src_mount,
        fakevfio_mount([spec], extra_args=DRIVER_ARGS) as dst_mount,
    ):
        image = vfio_guest.build(LINES)
        src = vfio_guest.boot(image, src_mount, ["ser0"], name="src", vfio_options=vfio_options)
        src.wait_for_line(rf"^MTTY seq {3 * EVERY}$", timeout=90)
        dst = vfio_guest.boot(
            image, dst_mount, ["ser0"], name="dst", incoming=True, vfio_options=vfio_options
        )
        stats = vfio_guest.migrate(src, dst, multifd=multifd)
        assert stats.status == "completed"
        assert stats.vfio_transferred > 0, stats.raw  # the device's state went over
        seen = [int(m) for m in re.findall(r"^MTTY seq (\d+)$", src.console(), ML)]
        last = seen[-1]
        dst.wait_for_line(rf"^MTTY seq {last + 3 * EVERY}$", timeout=90)
        no_bad_line(src)
        no_bad_line(dst)
        after = [int(m) for m in re.findall(r"^MTTY seq (\d+)$", dst.console(), ML)]
        # The destination continues the source's count: the first complete progress
        # line is the next one (or the one after, when the switchover split a line).
        assert after[0] in (last + EVERY, last + 2 * EVERY), (last, after[:3])
        assert after == list(range(after[0], after[-1] + 1, EVERY)), after
        assert src_mount.read("ser0", "migration/state").strip() == "STOP"
        assert dst_mount.read("ser0", "migration/state").strip() == "RUNNING"
        assert device_info(dst_mount)["irqs"]["intx"]["vectors"]["0"]["signalled"] > 0
