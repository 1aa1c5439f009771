"""One device's interrupts: INTx, MSI, MSI-X, ERR and REQ as vfio-pci keeps them.

Theory of operation
-------------------
:class:`Irqs` is the interrupt half of ``drivers/vfio/pci/vfio_pci_intrs.c``
for one emulated device. The VMM configures it with ``VFIO_DEVICE_SET_IRQS``;
the supervisor of ``fakevfio run`` checks the ioctl's header as
``vfio_set_irqs_validate_and_prepare`` does and writes ONE command to
``devices/NAME/irqs``. The eventfds of that command are named as the caller
holds them (``PID:FD``); the core copies each with ``HostServices.take_fd``
while the caller is still blocked in its ioctl, signals its copies with
``HostServices.signal_eventfd`` and watches INTx resample (unmask) eventfds
with ``HostServices.watch_eventfd``. The driver reaches the same state through
``raise_irq``/``set_intx`` (:class:`fakevfio.driver.ArcDriver`).

The ``irqs`` file's commands (one per write; numbers decimal or 0x-hex;
INDEX is ``intx``/``msi``/``msix``/``err``/``req`` or 0..4)::

    set INDEX ACTION START COUNT none          ACTION: trigger, mask or unmask
    set INDEX ACTION START COUNT bool 0110     one 0/1 per vector
    set INDEX ACTION START COUNT eventfd E,E   E: PID:FD (the caller's eventfd) or a
                                               negative number (-1: de-assign)
    raise INDEX [VECTOR]                       what the driver's raise_irq does
    intx assert|deassert                       what the driver's set_intx does
    disable                                    every index off, every eventfd released

``set`` is the ioctl ``{flags = DATA_x | ACTION_y, index, start, count,
data}``; e.g. ``set msix trigger 0 0 none`` disables MSI-X and ``set intx
unmask 0 1 eventfd 812:14`` installs the resample eventfd. A read shows the
active index and, per index, its vector count and configuration, and per
vector the trigger and how often it was signalled or dropped; ``info()`` is
the same as JSON.

Rule 1: INTx, MSI and MSI-X are mutually exclusive: an index is enabled only
        while none of the three is (``is_irq_none``); otherwise EINVAL.
Rule 2: INTx is automasked: a raised INTx signals the trigger and masks the
        line; while masked, raises stay pending. An unmask (ioctl, BOOL 1, or
        a signal on the resample eventfd) with an interrupt pending or the
        level still asserted signals again and stays masked; otherwise it
        unmasks. ``set_intx(True)`` is a level: asserted and unmasked signals.
        While the guest's PCI_COMMAND_INTX_DISABLE is set
        (:meth:`Irqs.command_intx_disable`, vfio-pci's ``virq_disabled``) INTx
        is masked and nothing unmasks it.
Rule 3: MSI is enabled with ``start + count`` vectors and cannot grow; MSI-X
        grows up to its table size (vfio-pci with dynamic MSI-X, so GET_IRQ_INFO
        leaves NORESIZE clear). A negative fd de-assigns one vector. A raise on a
        vector without a trigger (or of an index that is not enabled) is dropped
        and counted, never queued.
Rule 4: DATA_NONE and DATA_BOOL with ACTION_TRIGGER signal the vectors that have
        a trigger (the kernel's loopback); MASK/UNMASK exist only for INTx
        (ENOTTY elsewhere; INTx MASK with an eventfd is ENOTTY as in vfio-pci).
Rule 5: a command that fails changes nothing: every fd is taken (EBADF if the
        caller has no such fd) and every vector checked before any state
        changes. (vfio-pci de-assigns the vectors of a block it already set when
        a later one fails; here the block is all or nothing.)
Rule 6: bounded: at most ``msix_vectors`` fds per command (one per vector), one
        resample fd; ``disable`` (the VMM closed the device) and device removal
        unwatch and close every fd. ``VFIO_DEVICE_RESET`` keeps the eventfds, as
        vfio-pci does, and only drops the device's INTx level and pending state.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from fakevfio.errors import DeviceError

if TYPE_CHECKING:
    from fakevfio._device import Device
    from fakevfio._host import HostServices

INTX, MSI, MSIX, ERR, REQ = range(5)
INDEX_NAMES = ("intx", "msi", "msix", "err", "req")
ACTIONS = ("mask", "unmask", "trigger")
DATA_TYPES = ("none", "bool", "eventfd")


@attrs.frozen
class SetIrqs:
    """One parsed ``set`` command: a ``VFIO_DEVICE_SET_IRQS`` request."""

    index: int
    action: str
    start: int
    count: int
    data: str  # none, bool or eventfd
    bools: tuple[bool, ...] = ()
    #: per vector: (pid, fd) of an eventfd of the caller, or a negative number
    fds: tuple[tuple[int, int] | int, ...] = ()


@attrs.define(eq=False)
class EventFd:
    """An eventfd copy this process holds, and the caller's name for it."""

    fd: int
    name: str


@attrs.define(eq=False)
class Vector:
    """One interrupt vector (INTx, an MSI/MSI-X vector, ERR or REQ)."""

    trigger: EventFd | None = None
    signalled: int = 0
    dropped: int = 0
    errors: int = 0


@attrs.define(eq=False)
class IntxLine:
    """The INTx line: vfio-pci's ``ctx[0]`` plus the emulated device's level."""

    masked: bool = False
    pending: bool = False
    asserted: bool = False
    resample: EventFd | None = None
    unmasks: int = 0
    #: The guest set PCI_COMMAND_INTX_DISABLE (vfio-pci's ``virq_disabled``).
    disabled: bool = False


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number (decimal or 0x-hex)") from None


def parse_index(text: str) -> int:
    """``intx``..``req`` or 0..4."""
    if text in INDEX_NAMES:
        return INDEX_NAMES.index(text)
    index = _number(text, "index")
    if not 0 <= index < len(INDEX_NAMES):
        raise ValueError(f"index {index} is not 0..4 ({', '.join(INDEX_NAMES)})")
    return index


def _parse_fd(text: str) -> tuple[int, int] | int:
    if ":" in text:
        pid_text, _, fd_text = text.partition(":")
        pid, fd = _number(pid_text, "pid"), _number(fd_text, "fd")
        if pid <= 0 or fd < 0:
            raise ValueError(f"eventfd {text!r}: PID > 0 and FD >= 0 expected")
        return (pid, fd)
    value = _number(text, "fd")
    if value >= 0:
        raise ValueError(f"eventfd {text!r}: PID:FD or a negative number (-1 de-assigns)")
    return value


def parse_set(words: list[str], max_count: int) -> SetIrqs:
    """``set INDEX ACTION START COUNT DATA [LIST]`` (``words`` without ``set``)."""
    if len(words) not in (5, 6):
        raise ValueError("set INDEX ACTION START COUNT none|bool BITS|eventfd LIST expected")
    index = parse_index(words[0])
    action = words[1]
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not trigger, mask or unmask")
    start, count = _number(words[2], "start"), _number(words[3], "count")
    if not 0 <= start < 1 << 32 or not 0 <= count < 1 << 32:
        raise ValueError("start and count are u32")
    if count > max_count:
        raise ValueError(f"count {count} > {max_count} (the largest index of this device)")
    data = words[4]
    rest = words[5] if len(words) == 6 else ""
    if data == "none":
        if rest:
            raise ValueError("none takes no data")
        return SetIrqs(index, action, start, count, data)
    if data == "bool":
        if len(rest) != count or rest.strip("01"):
            raise ValueError(f"bool needs {count} digits 0 or 1, got {rest!r}")
        return SetIrqs(index, action, start, count, data, bools=tuple(c == "1" for c in rest))
    if data == "eventfd":
        entries = rest.split(",") if rest else []
        if len(entries) != count:
            raise ValueError(f"eventfd needs {count} entries, got {len(entries)}")
        return SetIrqs(index, action, start, count, data, fds=tuple(map(_parse_fd, entries)))
    raise ValueError(f"data type {data!r} is not none, bool or eventfd")


class Irqs:
    """The interrupt state of one device (called with the device lock held)."""

    def __init__(self, device: Device) -> None:
        self._device = device
        driver = device.driver
        self.counts = (
            1 if driver.interrupt_pin else 0,
            driver.msi_vectors,
            driver.msix_vectors,
            1 if driver.pcie else 0,
            1,
        )
        #: INTX, MSI or MSIX while one is enabled (vfio-pci's irq_type), else None.
        self.active: int | None = None
        #: MSI/MSI-X: the vectors the index was enabled with (num_ctx).
        self.enabled_vectors = 0
        self.line = IntxLine()
        #: index -> vector -> state; INTx/ERR/REQ use vector 0.
        self.vectors: dict[int, dict[int, Vector]] = {
            i: {0: Vector()} if i in (INTX, ERR, REQ) and self.counts[i] else {} for i in range(5)
        }

    # -- errors and host ----------------------------------------------------------
    def _err(self, err: int, msg: str) -> DeviceError:
        return DeviceError(err, msg, device=self._device.name)

    def _host(self) -> HostServices:
        host = self._device.host
        if host is None:
            raise self._err(errno.ENODEV, "no host services: eventfds cannot be taken")
        return host

    def _vector(self, index: int, vector: int) -> Vector:
        return self.vectors[index].setdefault(vector, Vector())

    def _signal(self, vec: Vector) -> bool:
        if vec.trigger is None:
            vec.dropped += 1
            return False
        try:
            self._host().signal_eventfd(vec.trigger.fd)
        except (OSError, DeviceError):
            vec.errors += 1
            return False
        vec.signalled += 1
        return True

    def _release(self, efd: EventFd | None) -> None:
        if efd is not None and self._device.host is not None:
            with contextlib.suppress(OSError):
                self._device.host.close_fd(efd.fd)

    # -- what the driver does ---------------------------------------------------------
    def raise_irq(self, index: int, vector: int) -> None:
        if not 0 <= index < len(self.counts) or not 0 <= vector < self.counts[index]:
            raise self._err(
                errno.EINVAL,
                f"raise of vector {vector} of index {index}: the device declares "
                f"{list(zip(INDEX_NAMES, self.counts, strict=True))} vectors",
            )
        if index == INTX:
            self._intx_edge()
        elif index in (MSI, MSIX):
            vec = self._vector(index, vector)
            if self.active == index:
                self._signal(vec)
            else:
                vec.dropped += 1
        else:
            self._signal(self._vector(index, 0))

    def set_intx(self, asserted: bool) -> None:
        if not self.counts[INTX]:
            raise self._err(errno.EINVAL, "set_intx: the device has no interrupt pin")
        self.line.asserted = asserted
        if asserted:
            self._intx_edge()
        else:
            self.line.pending = False

    def _intx_edge(self) -> None:
        """The interrupt handler: signal and automask, or stay pending."""
        vec = self._vector(INTX, 0)
        if self.active != INTX:
            vec.dropped += 1
        elif self.line.masked or self.line.disabled:
            self.line.pending = True
        else:
            self.line.masked = True
            self.line.pending = False
            self._signal(vec)

    def _intx_unmask(self) -> None:
        """``vfio_pci_intx_unmask``: re-signal while something is pending."""
        if self.active != INTX or not self.line.masked or self.line.disabled:
            return
        self.line.unmasks += 1
        if self.line.pending or self.line.asserted:
            self.line.pending = False
            self._signal(self._vector(INTX, 0))
        else:
            self.line.masked = False

    def command_intx_disable(self, disabled: bool) -> None:
        """A config write changed PCI_COMMAND_INTX_DISABLE (``vfio_basic_config_write``).

        Setting it masks INTx (no signal until cleared); clearing it unmasks,
        and a pending or still asserted interrupt is sent then.
        """
        if disabled and not self.line.disabled:
            self.line.disabled = True
            if self.active == INTX:
                self.line.masked = True
        elif not disabled and self.line.disabled:
            self.line.disabled = False
            self._intx_unmask()

    def _resampled(self, token: EventFd) -> None:
        with self._device.lock:
            if self.line.resample is token:
                self._intx_unmask()

    # -- the irqs file ---------------------------------------------------------------
    def control(self, text: str) -> bytes | None:
        """One write to ``devices/NAME/irqs``; a reply (read back on the same handle) or None."""
        words = text.split()
        if not words:
            raise self._err(errno.EINVAL, "irqs: empty command (see the module docstring)")
        verb, args = words[0], words[1:]
        try:
            if verb == "set":
                self.set_irqs(parse_set(args, max(self.counts)))
            elif verb == "raise" and len(args) in (1, 2):
                index = parse_index(args[0])
                self.raise_irq(index, _number(args[1], "vector") if len(args) == 2 else 0)
            elif verb == "intx" and args in (["assert"], ["deassert"]):
                self.set_intx(args[0] == "assert")
            elif verb == "disable" and not args:
                self.disable()
            else:
                raise ValueError(
                    f"unknown command {text.strip()!r}: set INDEX ACTION START COUNT DATA, "
                    "raise INDEX [VECTOR], intx assert|deassert, disable"
                )
        except ValueError as exc:
            raise self._err(errno.EINVAL, f"irqs: {exc}") from None
        return None

    def set_irqs(self, req: SetIrqs) -> None:
        """``vfio_pci_set_irqs_ioctl`` after the header checks (Rules 1-5)."""
        num = self.counts[req.index]
        if req.start >= num or req.start + req.count > num:
            raise self._err(
                errno.EINVAL,
                f"{INDEX_NAMES[req.index]}: vectors {req.start}..{req.start + req.count - 1} "
                f"are outside the {num} this device has",
            )
        if req.index == INTX:
            handler: Callable[[SetIrqs], None] = {
                "mask": self._set_intx_mask,
                "unmask": self._set_intx_unmask,
                "trigger": self._set_intx_trigger,
            }[req.action]
        elif req.action != "trigger":
            raise self._err(
                errno.ENOTTY, f"{INDEX_NAMES[req.index]}: only INTx can be masked or unmasked"
            )
        elif req.index in (MSI, MSIX):
            handler = functools.partial(_set_msi_trigger, self)
        else:
            handler = functools.partial(_set_single_trigger, self)
        handler(req)

    def _assign(self, index: int, vector: int, item: EventFd | int) -> None:
        vec = self._vector(index, vector)
        self._release(vec.trigger)
        vec.trigger = item if isinstance(item, EventFd) else None

    # -- INTx ----------------------------------------------------------------------------
    def _need_intx(self, req: SetIrqs) -> None:
        if self.active != INTX or req.start != 0 or req.count != 1:
            raise self._err(
                errno.EINVAL,
                f"intx {req.action}: INTx must be enabled (active: {self._active_name()}) "
                "and start 0 count 1",
            )

    def _set_intx_mask(self, req: SetIrqs) -> None:
        self._need_intx(req)
        if req.data == "eventfd":
            raise self._err(errno.ENOTTY, "intx mask by eventfd is not supported (vfio-pci)")
        if (req.data == "none" or req.bools[0]) and not self.line.masked:
            self.line.masked = True

    def _set_intx_unmask(self, req: SetIrqs) -> None:
        self._need_intx(req)
        if req.data == "none" or (req.data == "bool" and req.bools[0]):
            self._intx_unmask()
        elif req.data == "eventfd":
            (item,) = _take(self, req, lambda _v: True)
            if not isinstance(item, EventFd):
                self._unwatch_resample()
                return
            if self.line.resample is not None:
                self._release(item)
                raise self._err(
                    errno.EBUSY,
                    f"intx unmask: resample eventfd {self.line.resample.name} is already set "
                    "(de-assign it with -1 first)",
                )
            self.line.resample = item
            self._host().watch_eventfd(item.fd, lambda: self._resampled(item))

    def _unwatch_resample(self) -> None:
        efd, self.line.resample = self.line.resample, None
        if efd is not None and self._device.host is not None:
            self._device.host.unwatch_eventfd(efd.fd)
            self._release(efd)

    def _set_intx_trigger(self, req: SetIrqs) -> None:
        if self.active == INTX and req.count == 0 and req.data == "none":
            self._disable()
            return
        if self.active not in (None, INTX) or req.start != 0 or req.count != 1:
            raise self._err(
                errno.EINVAL,
                f"intx trigger: {self._active_name()} is enabled (INTx, MSI and MSI-X "
                "exclude each other) or start/count is not 0/1",
            )
        if req.data == "eventfd":
            (item,) = _take(self, req, lambda _v: True)
            if self.active is None:
                self.active = INTX
                self.line.masked = self.line.disabled
                self.line.pending = False
            self._assign(INTX, 0, item)
            if self.line.asserted and not self.line.masked and isinstance(item, EventFd):
                self._intx_edge()
            return
        if self.active != INTX:
            raise self._err(errno.EINVAL, "intx trigger: INTx is not enabled")
        if req.data == "none" or req.bools[0]:
            vec = self._vector(INTX, 0)
            if vec.trigger is not None and not self.line.disabled:
                self._signal(vec)

    # -- lifetime ----------------------------------------------------------------------
    def _active_name(self) -> str:
        return "nothing" if self.active is None else INDEX_NAMES[self.active]

    def _disable(self) -> None:
        """``vfio_intx_disable`` / ``vfio_msi_disable`` of the active index."""
        index = self.active
        if index is None:
            return
        if index == INTX:
            self._unwatch_resample()
        for vector in list(self.vectors[index]):
            self._assign(index, vector, -1)
        self.active = None
        self.enabled_vectors = 0
        self.line.masked = self.line.pending = False

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: the device drops its INTx level and pending interrupts.

        As in vfio-pci (``vfio_pci_ioctl_reset`` only resets the function), the
        eventfd configuration stays: QEMU disables INTx/MSI itself around a
        reset, and the REQ/ERR notifiers it registered at realize must survive
        the reset of machine start. :meth:`disable` is the device-fd close.
        """
        self.line.asserted = self.line.pending = False

    def disable(self) -> None:
        """Device fd closed (``vfio_pci_core_disable``): every index off, every eventfd closed."""
        self._disable()
        for index in (ERR, REQ):
            if self.counts[index]:
                self._assign(index, 0, -1)
        self.line = IntxLine(unmasks=self.line.unmasks, disabled=self.line.disabled)

    def close(self) -> None:
        """The device is removed: release every eventfd."""
        self.disable()

    # -- views ----------------------------------------------------------------------
    def text(self) -> str:
        """What reading ``devices/NAME/irqs`` shows."""
        return render_text(self.info())

    def info(self) -> dict[str, object]:
        """The ``irqs`` object of the ``info`` file."""
        return irqs_info(self)


def _take(irqs: Irqs, req: SetIrqs, allowed: Callable[[int], bool]) -> list[EventFd | int]:
    """Every fd of ``req`` copied, or none (Rule 5); ``allowed(vector)`` checks each."""
    taken: list[EventFd | int] = []
    try:
        for i, entry in enumerate(req.fds):
            vector = req.start + i
            if isinstance(entry, int):
                taken.append(entry)
                continue
            pid, fd = entry
            try:
                copy = irqs._host().take_fd(pid, fd)
            except OSError as exc:
                raise irqs._err(
                    exc.errno or errno.EBADF,
                    f"{INDEX_NAMES[req.index]} vector {vector}: cannot take fd {fd} of "
                    f"process {pid} ({exc.strerror}); pass an open eventfd",
                ) from None
            taken.append(EventFd(copy, f"{pid}:{fd}"))
            if not allowed(vector):
                raise irqs._err(
                    errno.EINVAL,
                    f"{INDEX_NAMES[req.index]} vector {vector}: not among the "
                    f"{irqs.enabled_vectors} vectors MSI was enabled with "
                    "(MSI cannot grow: disable and enable with more)",
                )
    except DeviceError:
        for item in taken:
            if isinstance(item, EventFd):
                irqs._release(item)
        raise
    return taken


def _set_msi_trigger(irqs: Irqs, req: SetIrqs) -> None:
    index, name = req.index, INDEX_NAMES[req.index]
    if irqs.active == index and req.count == 0 and req.data == "none":
        irqs._disable()
        return
    if irqs.active not in (None, index):
        raise irqs._err(
            errno.EINVAL,
            f"{name} trigger: {irqs._active_name()} is enabled "
            "(INTx, MSI and MSI-X exclude each other; disable it first)",
        )
    if req.data == "eventfd":
        enabling = irqs.active is None
        nvec = req.start + req.count if enabling else irqs.enabled_vectors
        if enabling and nvec == 0:
            raise irqs._err(errno.ERANGE, f"{name}: enabling with 0 vectors")

        def allowed(vector: int) -> bool:
            return index == MSIX or vector < nvec

        taken = _take(irqs, req, allowed)
        if enabling:
            irqs.active, irqs.enabled_vectors = index, nvec
        for i, item in enumerate(taken):
            irqs._assign(index, req.start + i, item)
        if index == MSIX:
            irqs.enabled_vectors = max(irqs.enabled_vectors, req.start + req.count)
        return
    if irqs.active != index:
        raise irqs._err(errno.EINVAL, f"{name} trigger: {name} is not enabled")
    for i in range(req.count):
        vec = irqs.vectors[index].get(req.start + i)
        fire = req.data == "none" or req.bools[i]
        if vec is not None and vec.trigger is not None and fire:
            irqs._signal(vec)


def _set_single_trigger(irqs: Irqs, req: SetIrqs) -> None:
    """``vfio_pci_set_ctx_trigger_single``."""
    name = INDEX_NAMES[req.index]
    if req.start != 0 or req.count > 1:
        raise irqs._err(errno.EINVAL, f"{name}: start 0 and count 0 or 1 expected")
    vec = irqs._vector(req.index, 0)
    if req.data == "none" and vec.trigger is not None:
        if req.count:
            irqs._signal(vec)
        else:
            irqs._assign(req.index, 0, -1)
        return
    if req.data == "none" or req.count == 0:
        raise irqs._err(
            errno.EINVAL, f"{name}: no trigger to signal or release, or count 0 with data"
        )
    if req.data == "bool":
        if req.bools[0] and vec.trigger is not None:
            irqs._signal(vec)
        return
    entry = req.fds[0]
    if entry == -1 or isinstance(entry, tuple):
        (item,) = _take(irqs, req, lambda _v: True)
        irqs._assign(req.index, 0, item)


def irqs_info(irqs: Irqs) -> dict[str, object]:
    """The ``irqs`` object of the ``info`` file (and of the ``irqs`` file's view)."""
    out: dict[str, object] = {"active": None if irqs.active is None else irqs._active_name()}
    for index, name in enumerate(INDEX_NAMES):
        entry: dict[str, object] = {"count": irqs.counts[index]}
        if index in (MSI, MSIX):
            entry["enabled"] = irqs.active == index
            entry["enabled_vectors"] = irqs.enabled_vectors if irqs.active == index else 0
            entry["dynamic"] = index == MSIX
        if index == INTX:
            line = irqs.line
            entry.update(
                enabled=irqs.active == INTX,
                masked=line.masked,
                pending=line.pending,
                asserted=line.asserted,
                resample=line.resample.name if line.resample else None,
                unmasks=line.unmasks,
                intx_disable=line.disabled,
            )
        entry["vectors"] = {
            str(v): {
                "trigger": vec.trigger.name if vec.trigger else None,
                "signalled": vec.signalled,
                "dropped": vec.dropped,
                "errors": vec.errors,
            }
            for v, vec in sorted(irqs.vectors[index].items())
        }
        out[name] = entry
    return out


def _word(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def render_text(info: dict[str, object]) -> str:
    """The ``irqs`` file: ``active``, one line per index, one line per known vector."""
    lines = [f"active {_word(info['active'])}"]
    for name in INDEX_NAMES:
        entry = info[name]
        assert isinstance(entry, dict)
        head = " ".join(f"{k} {_word(v)}" for k, v in entry.items() if k != "vectors")
        lines.append(f"{name} {head}")
        for vector, state in entry["vectors"].items():
            lines.append(
                f"{name} {vector} " + " ".join(f"{k} {_word(v)}" for k, v in state.items())
            )
    return "\n".join(lines) + "\n"
