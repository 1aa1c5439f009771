"""Interrupts through the real ioctl path: ``tests/c/irq_drive.c`` under ``fakevfio run``.

The C program uses the system ``<linux/vfio.h>`` (structs, flags, ioctl
numbers) and real eventfds; it fires interrupts through the device's ``irqs``
file (``raise INDEX VECTOR``) and reads its eventfds. The expected values are
vfio-pci's: ``vfio_pci_ioctl_get_irq_info`` (counts and flags),
``vfio_set_irqs_validate_and_prepare`` (drivers/vfio/vfio_main.c: EINVAL
rules), ``vfio_pci_set_irqs_ioctl`` (ENOTTY without a handler),
``vfio_intx_handler``/``vfio_pci_intx_unmask_handler`` (automask, re-signal of
a pending interrupt), ``vfio_virqfd_enable`` (EBUSY) and
``vfio_pci_set_msi_trigger`` (mutual exclusion, de-assign with -1, loopback).
The ram device has INTA, 1 MSI vector, 4 MSI-X vectors and is not PCIe.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory

pytestmark = pytest.mark.fuse

SOURCE = Path(__file__).resolve().parents[2] / "c" / "irq_drive.c"
EINVAL, ENOTTY, EBADF, EBUSY, EFAULT = (
    str(errno.EINVAL),
    str(errno.ENOTTY),
    str(errno.EBADF),
    str(errno.EBUSY),
    str(errno.EFAULT),
)


def _missing() -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "fakevfio run needs Linux on x86-64"
    if os.geteuid() != 0:
        return "fakevfio run needs root (mount namespace, pidfd_getfd)"
    if shutil.which("gcc") is None:
        return "gcc is missing"
    if not Path("/usr/include/linux/vfio.h").exists():
        return "the kernel headers (<linux/vfio.h>) are missing"
    return None


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("c") / "irq_drive"
    subprocess.run(["gcc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(SOURCE)], check=True)
    return exe


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[Path]:
    with fakevfio_mount(["gpu0=ram:size=64K"]) as m:
        yield m.path


def run(drive: Path, mount: Path, mode: str, *extra: str) -> list[list[str]]:
    irqs = mount / "devices" / "gpu0" / "irqs"
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount), "--"]
    cmd += [str(drive), mode, "/dev/vfio/devices/vfio0", str(irqs), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def pairs(lines: list[list[str]]) -> dict[str, str]:
    return {words[0]: words[1] for words in lines if len(words) >= 2}


def test_get_irq_info_counts_and_flags(drive: Path, mount: Path) -> None:
    r = {w[0]: w[1:] for w in run(drive, mount, "info")}
    # flags: EVENTFD 1, MASKABLE 2, AUTOMASKED 4, NORESIZE 8 (include/uapi/linux/vfio.h)
    assert r["info0"] == ["0", "flags0", "7", "count0", "1"]  # INTA: maskable, automasked
    assert r["info1"] == ["0", "flags1", "9", "count1", "1"]  # MSI: noresize
    assert r["info2"] == ["0", "flags2", "1", "count2", "4"]  # MSI-X: dynamic, no NORESIZE
    assert r["info3"][0] == EINVAL  # ERR: only on PCI Express devices
    assert r["info4"] == ["0", "flags4", "9", "count4", "1"]  # REQ
    assert r["info5"][0] == EINVAL  # index >= VFIO_PCI_NUM_IRQS
    assert r["info_argsz15"] == [EINVAL]
    assert r["info_argsz20"] == ["0", "canary", "abcdef"]  # only minsz is written back


def test_intx_automask_unmask_and_resample_eventfd(drive: Path, mount: Path) -> None:
    lines = run(drive, mount, "intx")
    r = pairs(lines)
    assert r["enable"] == "0"
    assert (r["first"], r["while_masked"]) == ("1", "0")  # automasked after the first
    assert (r["unmask"], r["after_unmask_pending"]) == ("0", "1")  # pending: sent again
    assert (r["unmask_bool"], r["after_unmask_idle"]) == ("0", "0")
    assert r["after_unmask_raise"] == "1"
    assert (r["mask"], r["resample"], r["resample_again"]) == ("0", "0", EBUSY)
    assert r["masked_raise"] == "0"
    assert r["after_resample"] == "1"  # the resample eventfd unmasked: pending re-sent
    assert r["after_resample_idle_raise"] == "1"
    state = next(w for w in lines if w[0] == "state")
    info = dict(zip(state[2::2], state[3::2], strict=False))
    assert (info["enabled"], info["masked"], info["unmasks"]) == ("1", "1", "4")
    assert re.fullmatch(r"\d+:\d+", info["resample"]), info  # the caller's PID:FD
    assert (r["resample_off"], r["loopback"], r["after_loopback"]) == ("0", "0", "1")
    assert (r["disable"], r["after_disable"]) == ("0", "0")
    final = next(w for w in lines if w[0] == "final")
    info = dict(zip(final[2::2], final[3::2], strict=False))
    assert (info["enabled"], info["resample"], info["masked"]) == ("0", "-", "0")
    text = (mount / "devices" / "gpu0" / "irqs").read_text()
    assert "intx 0 trigger - signalled 6 dropped 1" in text  # the raise after disable


def test_a_caller_that_exits_with_msix_on_releases_its_eventfds(drive: Path, mount: Path) -> None:
    """Closing the last device fd (here: the caller exits) disables every index, as
    vfio_pci_core_disable does, so the mount holds no copies of gone eventfds."""
    assert pairs(run(drive, mount, "leave"))["leave_enable"] == "0"
    text = (mount / "devices" / "gpu0" / "irqs").read_text()
    assert text.startswith("active -\n"), text
    assert not re.search(r"trigger \d+:\d+", text), text


def test_msix_and_msi_vectors_reach_the_right_eventfds(drive: Path, mount: Path) -> None:
    lines = run(drive, mount, "msi")
    r = pairs(lines)
    assert r["msix_enable"] == "0"
    assert [r[f"msix_e{i}"] for i in range(4)] == ["1", "0", "1", "0"]  # 1: fd -1, 3: none
    assert (r["msix_add1"], r["msix_add3"], r["msix_off0"]) == ("0", "0", "0")
    assert [r[f"msix2_e{i}"] for i in range(4)] == ["0", "1", "1", "1"]  # 0 de-assigned
    assert r["msix_loop"] == "0"
    assert [r[f"msix3_e{i}"] for i in range(4)] == ["0", "0", "1", "0"]  # BOOL 1,0,1,0
    assert (r["msi_while_msix"], r["intx_while_msix"]) == (EINVAL, EINVAL)
    assert (r["msix_disable"], r["msix_after_disable"]) == ("0", "0")
    assert (r["msi_enable"], r["msi_e1"], r["msi_disable"]) == ("0", "1", "0")
    text = (mount / "devices" / "gpu0" / "irqs").read_text()
    assert text.startswith("active -\n")
    assert "msi 0 trigger - signalled 1 dropped 0" in text


def test_every_set_irqs_rule_has_the_kernels_errno_and_changes_nothing(
    drive: Path, mount: Path
) -> None:
    lines = run(drive, mount, "bad")
    r = {w[0]: w[1:] for w in lines}
    assert r["setup"] == ["0"]
    assert r["setup_resample"] == ["0"]
    expected = {
        "argsz19": EINVAL,
        "index5": EINVAL,
        "err_not_pcie": EINVAL,
        "start_past": EINVAL,
        "count_past": EINVAL,
        "count_wraps": EINVAL,
        "intx_count2": EINVAL,
        "unknown_flag": EINVAL,
        "two_data_types": EINVAL,
        "no_data_type": EINVAL,
        "short_array": EINVAL,
        "no_action": ENOTTY,
        "two_actions": ENOTTY,
        "msi_mask": ENOTTY,
        "req_unmask": ENOTTY,
        "intx_mask_eventfd": ENOTTY,
        "msi_while_intx": EINVAL,
        "msix_while_intx": EINVAL,
        "msix_loopback_not_enabled": EINVAL,
        "resample_busy": EBUSY,
        "bad_fd": EBADF,
        "not_eventfd": EINVAL,
        "req_none_unset": EINVAL,
        "req_eventfd_count0": EINVAL,
        "data_efault": EFAULT,
        "hdr_efault": EFAULT,
    }
    got = {name: r[name][0] for name in expected}
    assert got == expected
    changed = [name for name in expected if r[name][1] != "1"]
    assert changed == [], "these bad requests changed the irqs file"
    assert r["disable"] == ["0"]
    assert r["disable_again"] == [EINVAL]  # INTx is no longer enabled
    text = (mount / "devices" / "gpu0" / "irqs").read_text()
    assert "intx count 1 enabled 0" in text


def test_delivery_latency_is_bounded(drive: Path, mount: Path) -> None:
    """Every interrupt arrives; one SET_IRQS loopback and one raise take well under 50 ms."""
    r = pairs(run(drive, mount, "bench", "200"))
    assert r["delivered"] == "400"
    assert float(r["loopback_us"]) < 50_000
    assert float(r["raise_us"]) < 50_000
