"""The interrupt core (:mod:`fakevfio._irq`) against vfio-pci's rules, with a recording host.

Each expectation cites the kernel function it comes from
(drivers/vfio/pci/vfio_pci_intrs.c, drivers/vfio/vfio_main.c); the same
rules are checked through real ioctls and eventfds in
``tests/fakevfio/run/test_irq_ioctls.py``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from fakevfio._device import Device
from fakevfio._options import DeviceSpec
from fakevfio._process import OsServices
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio.driver import IRQ_INTX, IRQ_MSI, IRQ_MSIX
from fakevfio.errors import DeviceError

PID = 4242


class FakeHost:
    """HostServices that records: the caller holds fds 10..99; copies are 1000 up."""

    def __init__(self) -> None:
        self.next_copy = 1000
        self.copies: dict[int, tuple[int, int]] = {}  # open copy -> (pid, fd)
        self.signals: dict[int, int] = {}  # caller fd -> signal count
        self.watched: dict[int, Callable[[], None]] = {}
        self.closed: list[int] = []

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        raise OSError(errno.EFAULT, "no memory")

    def write_memory(self, pid: int, addr: int, data: bytes | memoryview) -> None:
        raise OSError(errno.EFAULT, "no memory")

    def take_fd(self, pid: int, fd: int) -> int:
        if not 10 <= fd < 100:
            raise OSError(errno.EBADF, "Bad file descriptor")
        self.next_copy += 1
        self.copies[self.next_copy] = (pid, fd)
        return self.next_copy

    def close_fd(self, fd: int) -> None:
        assert fd in self.copies, f"close of {fd}, which is not open"
        assert fd not in self.watched, f"close of {fd} while it is still watched"
        del self.copies[fd]
        self.closed.append(fd)

    def signal_eventfd(self, fd: int) -> None:
        caller_fd = self.copies[fd][1]
        self.signals[caller_fd] = self.signals.get(caller_fd, 0) + 1

    def watch_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        assert fd in self.copies
        self.watched[fd] = callback

    def unwatch_eventfd(self, fd: int) -> None:
        del self.watched[fd]

    def resample(self, caller_fd: int) -> None:
        """The VMM (or KVM) signals the resample eventfd ``caller_fd``."""
        for copy, cb in list(self.watched.items()):
            if self.copies[copy][1] == caller_fd:
                cb()


class PcieRam(RamDriver):
    pcie = True
    msi_vectors = 4
    msix_vectors = 16


class NoPinRam(RamDriver):
    interrupt_pin = 0


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


def make(host: FakeHost, driver: str = "ram") -> Device:
    reg = Registry({"ram": RamDriver, "pcie": PcieRam, "nopin": NoPinRam}, host=host)
    extra = ",config_size=4096" if driver == "pcie" else ""  # PCIe: extended config space
    return reg.create(DeviceSpec.from_cli(f"d0={driver}:size=4K{extra}"))


def cmd(dev: Device, text: str) -> None:
    with dev.lock:
        dev.irqs.control(text)


def fails(dev: Device, text: str, err: int) -> str:
    """The command fails with ``err`` and changes nothing; returns the message."""
    before = dev.irqs.info()
    with pytest.raises(DeviceError) as exc:
        cmd(dev, text)
    assert exc.value.errno == err, exc.value
    assert dev.irqs.info() == before
    return str(exc.value)


def intx(dev: Device) -> dict[str, Any]:
    info = dev.irqs.info()["intx"]
    assert isinstance(info, dict)
    return info


# -- INTx (vfio_intx_handler, vfio_pci_intx_unmask_handler, Rule 2) --
def test_intx_automask_pending_and_unmask(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    dev.driver.raise_irq(IRQ_INTX)
    assert host.signals == {10: 1}
    assert intx(dev)["masked"] is True
    dev.driver.raise_irq(IRQ_INTX)  # masked: stays pending, not signalled
    assert host.signals == {10: 1}
    assert intx(dev)["pending"] is True
    cmd(dev, "set intx unmask 0 1 none")  # pending: re-sent, still masked
    assert host.signals == {10: 2}
    assert intx(dev)["masked"] is True
    cmd(dev, "set intx unmask 0 1 bool 0")  # BOOL 0: nothing
    assert intx(dev)["masked"] is True
    cmd(dev, "set intx unmask 0 1 bool 1")
    assert intx(dev)["masked"] is False
    assert host.signals == {10: 2}
    cmd(dev, "set intx mask 0 1 none")
    dev.driver.raise_irq(IRQ_INTX)
    assert host.signals == {10: 2}
    cmd(dev, "set intx unmask 0 1 none")
    assert host.signals == {10: 3}


def test_intx_level_signals_again_on_each_unmask_while_asserted(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    dev.driver.set_intx(True)
    assert host.signals == {10: 1}
    cmd(dev, "set intx unmask 0 1 none")
    assert host.signals == {10: 2}
    assert intx(dev)["masked"] is True
    dev.driver.set_intx(False)
    cmd(dev, "set intx unmask 0 1 none")
    assert host.signals == {10: 2}
    assert intx(dev)["masked"] is False
    cmd(dev, "intx assert")  # the file's form of set_intx
    assert host.signals == {10: 3}


def test_intx_resample_eventfd_unmasks_and_is_exclusive(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    cmd(dev, f"set intx unmask 0 1 eventfd {PID}:11")
    assert intx(dev)["resample"] == f"{PID}:11"
    dev.driver.raise_irq(IRQ_INTX)
    dev.driver.raise_irq(IRQ_INTX)
    host.resample(11)  # pending: re-signalled
    assert host.signals == {10: 2}
    host.resample(11)
    assert intx(dev)["masked"] is False
    # vfio_virqfd_enable: EBUSY while one is installed; the new copy is released
    fails(dev, f"set intx unmask 0 1 eventfd {PID}:12", errno.EBUSY)
    assert len(host.copies) == 2
    cmd(dev, "set intx unmask 0 1 eventfd -1")
    assert host.watched == {}
    assert intx(dev)["resample"] is None


def test_intx_trigger_loopback_replace_and_disable(host: FakeHost) -> None:
    dev = make(host)
    fails(dev, "set intx trigger 0 1 none", errno.EINVAL)  # not enabled
    fails(dev, "set intx unmask 0 1 none", errno.EINVAL)
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    cmd(dev, "set intx trigger 0 1 none")  # loopback: no automask
    cmd(dev, "set intx trigger 0 1 bool 1")
    assert host.signals == {10: 2}
    assert intx(dev)["masked"] is False
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:20")  # replace: old copy closed
    dev.driver.raise_irq(IRQ_INTX)
    assert host.signals == {10: 2, 20: 1}
    assert len(host.copies) == 1
    fails(dev, "set intx mask 0 1 eventfd 4242:30", errno.ENOTTY)
    cmd(dev, f"set intx unmask 0 1 eventfd {PID}:11")
    cmd(dev, "set intx trigger 0 0 none")  # disable: everything released
    assert host.copies == {}
    assert host.watched == {}
    assert dev.irqs.info()["active"] is None
    dev.driver.raise_irq(IRQ_INTX)  # dropped and counted
    assert intx(dev)["vectors"]["0"]["dropped"] == 1


def test_intx_without_pin(host: FakeHost) -> None:
    dev = make(host, "nopin")
    assert intx(dev)["count"] == 0
    fails(dev, f"set intx trigger 0 1 eventfd {PID}:10", errno.EINVAL)
    with pytest.raises(DeviceError) as exc:
        dev.driver.set_intx(True)
    assert exc.value.errno == errno.EINVAL


# -- MSI / MSI-X (vfio_pci_set_msi_trigger, Rules 1 and 3) --
def test_msix_vectors_reach_their_eventfds(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set msix trigger 0 3 eventfd {PID}:10,-1,{PID}:12")
    for v in range(4):
        dev.driver.raise_irq(IRQ_MSIX, v)
    assert host.signals == {10: 1, 12: 1}
    msix = dev.irqs.info()["msix"]
    assert isinstance(msix, dict)
    assert msix["vectors"]["1"]["dropped"] == 1
    assert msix["vectors"]["3"]["dropped"] == 1
    cmd(dev, f"set msix trigger 3 1 eventfd {PID}:13")  # MSI-X grows (dynamic)
    cmd(dev, "set msix trigger 0 1 eventfd -1")  # de-assign vector 0
    dev.driver.raise_irq(IRQ_MSIX, 0)
    dev.driver.raise_irq(IRQ_MSIX, 3)
    assert host.signals == {10: 1, 12: 1, 13: 1}
    cmd(dev, "set msix trigger 0 4 bool 0011")  # loopback of vectors with a trigger
    assert host.signals == {10: 1, 12: 2, 13: 2}
    cmd(dev, "set msix trigger 0 4 none")
    assert host.signals == {10: 1, 12: 3, 13: 3}
    fails(dev, "set msix mask 0 1 none", errno.ENOTTY)
    fails(dev, "set msix trigger 0 5 none", errno.EINVAL)
    cmd(dev, "set msix trigger 0 0 none")
    assert host.copies == {}
    assert dev.irqs.info()["active"] is None


def test_msi_cannot_grow_and_excludes_intx(host: FakeHost) -> None:
    dev = make(host, "pcie")
    cmd(dev, f"set msi trigger 0 2 eventfd {PID}:10,{PID}:11")
    dev.driver.raise_irq(IRQ_MSI, 1)
    assert host.signals == {11: 1}
    msg = fails(dev, f"set msi trigger 2 1 eventfd {PID}:12", errno.EINVAL)
    assert "MSI cannot grow" in msg
    assert len(host.copies) == 2  # the taken copy was released (Rule 5)
    fails(dev, f"set intx trigger 0 1 eventfd {PID}:20", errno.EINVAL)
    fails(dev, f"set msix trigger 0 1 eventfd {PID}:20", errno.EINVAL)
    cmd(dev, "set msi trigger 0 0 none")
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:20")
    fails(dev, f"set msi trigger 0 1 eventfd {PID}:21", errno.EINVAL)
    dev.driver.raise_irq(IRQ_MSI, 0)  # MSI not enabled: dropped
    assert host.signals == {11: 1}


def test_bad_fd_in_a_block_changes_nothing(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set msix trigger 0 2 eventfd {PID}:10,{PID}:11")
    msg = fails(dev, f"set msix trigger 0 2 eventfd {PID}:12,{PID}:5", errno.EBADF)
    assert "vector 1" in msg
    assert "fd 5" in msg
    assert len(host.copies) == 2  # 12's copy closed again
    dev.driver.raise_irq(IRQ_MSIX, 0)
    assert host.signals == {10: 1}


# -- ERR / REQ (vfio_pci_set_ctx_trigger_single) --
def test_err_exists_only_on_pcie_and_req_is_single(host: FakeHost) -> None:
    fails(make(host), f"set err trigger 0 1 eventfd {PID}:10", errno.EINVAL)
    dev = make(FakeHost(), "pcie")
    host = dev.host  # type: ignore[assignment]
    fails(dev, "set req trigger 0 1 none", errno.EINVAL)  # DATA_NONE without a trigger
    fails(dev, "set req trigger 0 0 eventfd", errno.EINVAL)
    fails(dev, "set req trigger 0 0 bool", errno.EINVAL)
    cmd(dev, f"set req trigger 0 1 eventfd {PID}:10")
    cmd(dev, f"set err trigger 0 1 eventfd {PID}:11")
    cmd(dev, "set req trigger 0 1 none")
    cmd(dev, "set err trigger 0 1 bool 1")
    assert host.signals == {10: 1, 11: 1}
    cmd(dev, "set req trigger 0 1 eventfd -2")  # fd < -1: no change (kernel)
    cmd(dev, "set req trigger 0 1 none")
    assert host.signals == {10: 2, 11: 1}
    cmd(dev, "set req trigger 0 0 none")  # release
    fails(dev, "set req trigger 0 1 none", errno.EINVAL)
    fails(dev, "set req unmask 0 1 none", errno.ENOTTY)


# -- the file's language, views, lifetime --
@pytest.mark.parametrize(
    "text",
    [
        "",
        "set",
        "set intx trigger 0 1",
        "set bogus trigger 0 1 none",
        "set 5 trigger 0 1 none",
        "set intx flip 0 1 none",
        "set intx trigger x 1 none",
        "set intx trigger 0 1 bool 2",
        "set intx trigger 0 1 bool 11",
        "set intx trigger 0 1 eventfd",
        "set intx trigger 0 1 eventfd 10",
        "set intx trigger 0 1 eventfd 0:10",
        "set intx trigger 0 1 none extra",
        "set intx trigger 0 1 json []",
        "set msix trigger 0 99999 none",
        "raise",
        "raise intx 0 0",
        "raise msix 4",
        "intx sideways",
        "disable now",
    ],
)
def test_bad_commands_are_einval_and_change_nothing(host: FakeHost, text: str) -> None:
    dev = make(host)
    cmd(dev, f"set msix trigger 0 1 eventfd {PID}:10")
    msg = fails(dev, text, errno.EINVAL)
    assert "d0" in msg


def test_raise_command_and_text_view(host: FakeHost) -> None:
    dev = make(host)
    cmd(dev, f"set msix trigger 0 2 eventfd {PID}:10,{PID}:0x0b")
    cmd(dev, "raise msix 1")
    cmd(dev, "raise 2 0x1")
    assert host.signals == {11: 2}
    text = dev.irqs.text()
    assert text.splitlines()[0] == "active msix"
    assert f"msix 1 trigger {PID}:11 signalled 2 dropped 0 errors 0" in text.splitlines()
    assert "intx count 1 enabled 0 masked 0" in text
    assert dev.info()["irqs"] == dev.irqs.info()


def test_disable_and_close_release_every_fd_reset_keeps_them(host: FakeHost) -> None:
    dev = make(host, "pcie")
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    cmd(dev, f"set intx unmask 0 1 eventfd {PID}:11")
    cmd(dev, f"set req trigger 0 1 eventfd {PID}:12")
    cmd(dev, f"set err trigger 0 1 eventfd {PID}:13")
    dev.driver.set_intx(True)
    dev.reset()  # vfio_pci_ioctl_reset: the function resets, the eventfds stay
    assert len(host.copies) == 4
    assert intx(dev)["asserted"] is False
    cmd(dev, "disable")  # vfio_pci_core_disable (device fd closed)
    assert host.copies == {}
    assert host.watched == {}
    cmd(dev, f"set msix trigger 0 2 eventfd {PID}:10,{PID}:11")
    cmd(dev, f"set req trigger 0 1 eventfd {PID}:12")
    dev.close()
    assert host.copies == {}
    cmd(make(host, "pcie"), "disable")  # nothing enabled: fine


def test_no_host_is_enodev() -> None:
    reg = Registry({"ram": RamDriver})
    dev = reg.create(DeviceSpec.from_cli("d0=ram:size=4K"))
    before = dev.irqs.info()
    with pytest.raises(DeviceError) as exc:
        cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    assert exc.value.errno == errno.ENODEV
    assert dev.irqs.info() == before


# -- the real host: OsServices with this process's own eventfds ---------------------------
def _read(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _until(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 5
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd of our own fds needs ptrace rights")
def test_os_services_deliver_and_resample_with_real_eventfds() -> None:
    host = OsServices()
    dev = Registry({"ram": RamDriver}, host=host).create(DeviceSpec.from_cli("d0=ram:size=4K"))
    trig = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    res = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    me = os.getpid()
    try:
        cmd(dev, f"set intx trigger 0 1 eventfd {me}:{trig}")
        cmd(dev, f"set intx unmask 0 1 eventfd {me}:{res}")
        dev.driver.raise_irq(IRQ_INTX)
        dev.driver.raise_irq(IRQ_INTX)  # pending behind the automask
        assert _read(trig) == 1
        os.eventfd_write(res, 1)  # what KVM's resampler does on EOI: the watcher unmasks
        assert _until(lambda: intx(dev)["unmasks"] == 1)
        assert _read(trig) == 1  # the pending one, re-sent
        os.eventfd_write(res, 1)
        assert _until(lambda: intx(dev)["masked"] is False)
        cmd(dev, "set intx unmask 0 1 eventfd -1")  # unwatched: a signal is no longer read
        os.eventfd_write(res, 5)
        time.sleep(0.05)
        assert _read(res) == 5
        assert intx(dev)["unmasks"] == 2
        cmd(dev, "disable")
        with pytest.raises(DeviceError) as exc:
            cmd(dev, f"set intx trigger 0 1 eventfd {me}:{2**20}")  # not open here
        assert exc.value.errno == errno.EBADF
    finally:
        dev.close()
        os.close(trig)
        os.close(res)


def test_watcher_survives_a_failing_callback() -> None:
    host = OsServices()
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    seen: list[str] = []

    def boom() -> None:
        seen.append("a")
        raise RuntimeError("a callback bug")

    try:
        host.watch_eventfd(a, boom)
        host.watch_eventfd(b, lambda: seen.append("b"))
        os.eventfd_write(a, 1)
        assert _until(lambda: host.callback_errors == 1)
        os.eventfd_write(b, 1)
        assert _until(lambda: seen == ["a", "b"])
    finally:
        host.unwatch_eventfd(a)
        host.unwatch_eventfd(b)
        os.close(a)
        os.close(b)


def test_command_intx_disable_masks_until_cleared(host: FakeHost) -> None:
    """vfio_basic_config_write: PCI_COMMAND_INTX_DISABLE masks, clearing it unmasks."""
    dev = make(host)
    cmd(dev, f"set intx trigger 0 1 eventfd {PID}:10")
    with dev.lock:
        dev.irqs.command_intx_disable(True)
    dev.driver.raise_irq(IRQ_INTX)
    cmd(dev, "set intx trigger 0 1 none")  # vfio_send_intx_eventfd: not while disabled
    cmd(dev, "set intx unmask 0 1 none")  # the ioctl cannot unmask it either
    assert host.signals == {}
    assert intx(dev)["intx_disable"] is True
    with dev.lock:
        dev.irqs.command_intx_disable(False)  # the pending one is sent now
    assert host.signals == {10: 1}
    assert intx(dev)["masked"] is True
