"""One emulated VFIO device: the migration FSM driver loop, sessions, log and faults.

Theory of operation
-------------------
:class:`Device` is what the kernel's VFIO core plus a variant driver's
``migration_set_state`` loop are for a real device. It is synchronous and
thread-safe: every public method takes the device lock, so the FUSE adapter and
the ioctl supervisor may call it from worker threads.

Rule 1: ``set_state`` runs :func:`vfio_uapi.fsm.path` and calls the driver once
        per arc. A failed arc stops the loop; the device stays in the last state
        it reached and the errno is raised. Illegal requests change nothing and
        are logged as ``REFUSED FROM TO``.
Rule 2: a :class:`Session` is created only by the four new-session arcs and
        ended by the end-session arcs, ``reset``, ERROR and removal. A handle
        bound to an ended session gets ENODEV.
Rule 3: every executed arc, failed arc, refusal and reset is appended to the
        log (last 4096 lines).
Rule 4: fault rules are checked before the driver is called, so an injected
        arc failure never half-runs a driver arc.

The core never reads a clock: emulated bandwidth and injected delays are
returned to the caller as seconds after the request's arrival (the ``now`` it
passes) at which the reply is due; the caller waits until then, so the
processing time is part of the wait, not added to it (see :class:`Bandwidth`).
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol

import attrs

from fakevfio._dma import Dma
from fakevfio._faults import FaultRules
from fakevfio._host import HostServices
from fakevfio._irq import Irqs
from fakevfio._pci import COMMAND, COMMAND_INTX_DISABLE, bar_index, pci_space
from fakevfio.driver import IRQ_MSI, ArcDriver, LoadStream, PrecopyInfo, SaveStream
from fakevfio.errors import ConfigError, DeviceError, IllegalTransition, errno_name
from vfio_uapi import errors as uapi_errors
from vfio_uapi.fsm import (
    PRECOPY_STATES,
    RUNNING_STATES,
    MigFlags,
    SessionChange,
    State,
    arcs_session_change,
    flags_text,
    path,
)

LOG_LINES = 4096
_session_ids = itertools.count(1)


@attrs.define(eq=False)
class Session:
    """One live migration session (one kernel data_fd)."""

    id: int
    saving: bool
    stream: SaveStream | LoadStream
    alive: bool = True
    position: int = 0


@attrs.frozen(kw_only=True)
class SetStateResult:
    """What one state write did."""

    arcs: tuple[tuple[State, State], ...]
    session: Session | None  # the new session, when the final arc created one
    delay_s: float


#: How far behind its schedule a paced stream may fall and still keep it: the gap
#: between one reply and the next request (a FUSE round trip, a network send) is
#: made up instead of pushing every later byte back. A longer gap is idleness.
PACE_SLACK_S = 0.25


class Bandwidth:
    """Deadline pacing of one direction of a device's data stream (pure: caller passes time).

    Rule 1: byte ``k`` of a stream that is read back to back is due at ``t0 + k / rate``,
            ``t0`` being the first request's arrival; :meth:`delay` returns how long after
            ``now`` (the request's arrival) the reply is due, so the caller waits out the
            deadline *including* its processing time, not processing plus a delay.
    Rule 2: a request arriving within :data:`PACE_SLACK_S` after the previous deadline
            keeps the schedule (the round-trip gap is made up); one arriving later starts
            a new schedule at ``now``: idleness earns no credit, so no burst follows it.
    Rule 3: each device has its own two instances, so devices are paced independently.
    """

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._next = float("-inf")

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds after ``now`` at which the reply carrying ``nbytes`` is due (>= 0)."""
        if not self.rate:
            return 0.0
        start = self._next if now <= self._next + PACE_SLACK_S else now
        self._next = start + nbytes / self.rate
        return max(0.0, self._next - now)


class DriverHost(Protocol):
    """What a driver's ``raise_irq``/``set_intx``/``dma_read``/``dma_write`` reach."""

    def raise_irq(self, index: int, vector: int) -> None: ...

    def set_intx(self, asserted: bool) -> None: ...

    def irq_enabled(self, index: int) -> bool: ...

    def dma_read(self, iova: int, length: int) -> bytes: ...

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None: ...


def default_pci_address(number: int) -> str:
    """The PCI address of device ``number`` unless its spec names one (bus 0xf0 upwards)."""
    return f"0000:{0xF0 + number // 32:02x}:{number % 32:02x}.0"


class Device:
    """An emulated VFIO device with migration support."""

    def __init__(
        self,
        name: str,
        driver_name: str,
        driver: ArcDriver,
        number: int,
        *,
        host: HostServices | None = None,
        pci_address: str | None = None,
    ) -> None:
        flags = driver.migration_flags
        if not flags & MigFlags.STOP_COPY:
            raise ValueError(f"driver of {name} lacks STOP_COPY in its migration flags")
        self.name = name
        self.driver_name = driver_name
        self.driver = driver
        self.number = number
        self.flags = MigFlags(flags)
        #: path() per (current, target): the flags never change, so neither do the
        #: arcs (the FSM walk costs more than the rest of a cheap state change).
        self._paths: dict[tuple[State, State], tuple[tuple[State, State], ...]] = {}
        self.lock = threading.RLock()
        self._state = State.RUNNING
        self._session: Session | None = None
        self._config = bytearray(driver.initial_config())
        if len(self._config) not in (256, 4096):
            raise ValueError(f"driver of {name} returned {len(self._config)} config bytes")
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        #: Sizes of the read() requests on saving streams (what the migrator asks).
        self._read_sizes: collections.Counter[int] = collections.Counter()
        self.faults = FaultRules()
        self.read_bw = Bandwidth(driver.read_bandwidth)
        self.write_bw = Bandwidth(driver.write_bandwidth)
        #: The OS services behind DMA and eventfds (None: neither works).
        self.host = host
        self.pci_address = pci_address or default_pci_address(number)
        self.irqs = Irqs(self)
        self.dma = Dma(self)
        driver._host = self
        try:
            pci_space(self)  # a driver's bad PCI declarations fail here, at creation
        except ValueError as exc:
            raise ConfigError(f"device {name}: {exc}") from None

    # -- what the driver does to the VM (DriverHost) -------------------------
    def raise_irq(self, index: int, vector: int) -> None:
        with self.lock:
            self.irqs.raise_irq(index, vector)

    def set_intx(self, asserted: bool) -> None:
        with self.lock:
            self.irqs.set_intx(asserted)

    def irq_enabled(self, index: int) -> bool:
        with self.lock:
            return self.irqs.active == index

    def dma_read(self, iova: int, length: int) -> bytes:
        with self.lock:
            return self.dma.read(iova, length)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.dma.write(iova, data)

    # -- queries ----------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def session(self) -> Session | None:
        return self._session

    @property
    def cdev(self) -> str:
        return f"vfio{self.number}"

    @property
    def iommu_group(self) -> int:
        return 100 + self.number

    def _err(self, err: int, msg: str) -> DeviceError:
        return DeviceError(err, msg, device=self.name)

    def log_text(self) -> str:
        with self.lock:
            return "".join(line + "\n" for line in self._log)

    def info(self, *, with_digest: bool = True) -> dict[str, object]:
        """The ``info`` file's content (digest hashing can take a while)."""
        return _info(self, with_digest=with_digest)

    # -- the FSM ----------------------------------------------------------
    def set_state(self, target: State) -> SetStateResult:
        """Execute one SET MIG_DEVICE_STATE (INTERFACES section 2)."""
        with self.lock:
            current = self._state
            if target == current:
                return SetStateResult(arcs=(), session=None, delay_s=0.0)
            arcs = self._paths.get((current, target))
            if arcs is None:
                try:
                    arcs = tuple(path(current, target, self.flags))
                except uapi_errors.IllegalTransition as exc:
                    self._log.append(f"REFUSED {current.name} {target.name}")
                    raise IllegalTransition(
                        exc.current, exc.requested, exc.reason, device=self.name
                    ) from None
                self._paths[(current, target)] = arcs
            done: list[tuple[State, State]] = []
            new_session: Session | None = None
            delay = self.faults.delay_ms("arc") / 1000.0
            session = self._session
            if current is State.RESUMING and session is not None and not session.alive:
                # The resuming stream was rejected: never load what is left of it.
                self._log.append(f"{current.name} {arcs[0][1].name} EINVAL")
                raise self._err(errno.EINVAL, "the resuming stream was rejected; reset the device")
            for cur, nxt in arcs:
                stream = _step(self, cur, nxt)
                self._log.append(f"{cur.name} {nxt.name}")
                self._state = nxt
                done.append((cur, nxt))
                change = _arc_change(cur, nxt)
                if change.opens:
                    if stream is None:
                        self._enter_error()
                        raise self._err(
                            errno.EIO, f"driver opened no stream on {cur.name} -> {nxt.name}"
                        )
                    self._end_session()
                    new_session = Session(
                        id=next(_session_ids), saving=isinstance(stream, SaveStream), stream=stream
                    )
                    self._session = new_session
                elif stream is not None:
                    raise self._err(
                        errno.EINVAL, f"driver returned a stream on {cur.name} -> {nxt.name}"
                    )
                elif change.ends:
                    self._end_session()
            return SetStateResult(
                arcs=tuple(done),
                session=new_session if done and _arc_change(*done[-1]).opens else None,
                delay_s=delay * len(done),
            )

    def fail_to_error(self) -> None:
        """Move to ERROR (a driver that cannot reach any valid state)."""
        with self.lock:
            self._enter_error()

    def _enter_error(self) -> None:
        self._state = State.ERROR
        self._end_session()

    def _end_session(self) -> None:
        if self._session is not None:
            self._session.alive = False
            self._session = None
            self.driver.session_ended()

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: state RUNNING, session ended, driver hook."""
        with self.lock:
            self._end_session()
            self._state = State.RUNNING
            self.irqs.reset()  # eventfds stay configured, as vfio-pci keeps them
            self.dma.reset()
            pci_space(self).reset_msix()  # a reset masks every MSI-X vector
            self.driver.reset()
            self._log.append("RESET")

    # -- sessions ---------------------------------------------------------
    def open_session(self, *, read: bool, write: bool) -> Session:
        """Bind a new handle of ``migration/data`` to the live session."""
        with self.lock:
            session = self._session
            if session is None:
                raise self._err(
                    errno.ENODEV, f"no live migration session (state {self._state.name})"
                )
            if session.saving and (write or not read):
                raise self._err(errno.EACCES, "a saving session opens read-only")
            if not session.saving and (read or not write):
                raise self._err(errno.EACCES, "a resuming session opens write-only")
            return session

    def _live(self, session: Session) -> None:
        if not session.alive:
            raise self._err(errno.ENODEV, "the migration session has ended")

    def read(
        self, session: Session, size: int, now: float = 0.0
    ) -> tuple[bytes | bytearray | memoryview, float]:
        """Read the saving stream; returns (data, seconds the caller should wait).

        ``data`` is a view only from a stream with ``stable_views`` (a stopped
        device's state, :mod:`fakevfio._stream` Rule 6) and only when the reply
        leaves at once: a paced or delayed reply, or one with a corruption
        fault, is a copy made under the device lock.
        """
        with self.lock:
            self._live(session)
            if not session.saving:
                raise self._err(errno.EBADF, "a resuming session is write-only")
            sizes = self._read_sizes
            if size in sizes or len(sizes) < 64:
                sizes[size] += 1
            faults = self.faults
            if faults.rules:
                return self._read_faulty(session, size, now)
            stream = session.stream
            assert isinstance(stream, SaveStream)
            data = stream.read(size, self._state)
            session.position += len(data)
            bandwidth = self.read_bw
            if not bandwidth.rate:
                if type(data) is memoryview and not stream.stable_views:
                    data = data.tobytes()
                return data, 0.0
            if type(data) is memoryview:
                data = data.tobytes()
            return data, bandwidth.delay(len(data), now)

    def _read_faulty(
        self, session: Session, size: int, now: float
    ) -> tuple[bytes | bytearray, float]:
        """:meth:`read` with fault rules set (lock held): a read error, corruption, a delay."""
        fault = self.faults.io_fault("read")
        if fault is not None:
            if session.position >= fault.after:
                raise self._err(
                    fault.errno, f"read failed at byte {session.position} (injected fault)"
                )
            size = min(size, fault.after - session.position)
        stream = session.stream
        assert isinstance(stream, SaveStream)
        data = stream.read(size, self._state)
        if isinstance(data, memoryview):
            data = bytes(data)
        start = session.position
        session.position += len(data)
        data = _corrupt(data, start, session.position, self.faults.corrupt_offsets())
        delay = self.read_bw.delay(len(data), now) + self.faults.delay_ms("read") / 1000.0
        return data, delay

    def write(self, session: Session, data: memoryview, now: float = 0.0) -> tuple[int, float]:
        """Write to the resuming stream; returns (bytes accepted, seconds to wait)."""
        with self.lock:
            self._live(session)
            if session.saving:
                raise self._err(errno.EBADF, "a saving session is read-only")
            faults = self.faults
            if faults.rules:
                fault = faults.io_fault("write")
                if fault is not None and session.position + len(data) > fault.after:
                    raise self._err(
                        fault.errno, f"write failed at byte {session.position} (injected fault)"
                    )
            stream = session.stream
            assert isinstance(stream, LoadStream)
            try:
                stream.write(data)
            except DeviceError:
                # The stream is dead but the device stays in RESUMING: only a
                # reset (or a new RESUMING session after STOP) recovers.
                session.alive = False
                raise
            n = len(data)
            session.position += n
            if not self.write_bw.rate and not faults.rules:
                return n, 0.0
            return n, self.write_bw.delay(n, now) + faults.delay_ms("write") / 1000.0

    def precopy_info(self, *, v2: bool = False) -> PrecopyInfo:
        """``VFIO_MIG_GET_PRECOPY_INFO``: EINVAL outside PRE_COPY*.

        ``v2``: the query of a caller that opted in to PRECOPY_INFOv2, the only
        one whose answer may carry REINIT (a v1 answer never does).
        """
        with self.lock:
            if self._state not in PRECOPY_STATES:
                raise self._err(
                    errno.EINVAL,
                    f"pre-copy info needs PRE_COPY or PRE_COPY_P2P (state {self._state.name})",
                )
            session = self._session
            if session is None or not isinstance(session.stream, SaveStream):
                raise self._err(errno.ENODEV, "no live saving session")
            if v2:
                return session.stream.precopy_info_v2()
            info = session.stream.precopy_info()
            return attrs.evolve(info, reinit=False) if info.reinit else info

    def data_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`` (any state)."""
        with self.lock:
            return self.driver.data_size(self._session.stream if self._session else None)

    # -- config space and regions -------------------------------------------
    # The PCI surface (fakevfio/_pci.py): config writes follow vfio-pci's
    # virtualisation, a BAR region is its BAR's size, past its backing zeros.
    def config_read(self, offset: int, size: int) -> bytes:
        with self.lock:
            return pci_space(self).read(offset, size)

    def config_write(self, offset: int, data: memoryview) -> int:
        with self.lock:
            space = pci_space(self)
            if offset < 0 or offset + len(data) > len(self._config):
                raise self._err(
                    errno.EINVAL,
                    f"config write of {len(data)} bytes at {offset} is past the end "
                    f"({len(self._config)} bytes)",
                )
            # the MSI enable bit sticks only while SET_IRQS has MSI on (vfio_msi_config_write)
            space.msi_active = self.irqs.active == IRQ_MSI
            space.write(offset, data)
            if offset <= COMMAND + 1 and offset + len(data) > COMMAND:
                # vfio_basic_config_write: INTx disable is emulated
                self.irqs.command_intx_disable(bool(space.command() & COMMAND_INTX_DISABLE))
            return len(data)

    def config_bytes(self) -> bytes:
        with self.lock:
            return pci_space(self).snapshot()

    def regions(self) -> Mapping[str, int]:
        """The driver's regions (name -> backing bytes); BAR sizes are in ``info["bars"]``."""
        return self.driver.regions()

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        """Read a region; a BAR region reads zeros past its backing, EOF past the BAR."""
        with self.lock:
            total = self._region_size(region)
            size = max(0, min(size, total - offset))
            if size == 0:
                return b""
            index = bar_index(region)
            space = pci_space(self)
            if index is None or index not in space.layout.bars:
                return bytes(self.driver.region_read(region, offset, size))
            msix = space.layout.msix
            if msix is not None and msix.bar == index:
                return space.msix_read(offset, size)
            inner = max(0, min(size, space.layout.backing.get(index, 0) - offset))
            data = bytes(self.driver.region_read(region, offset, inner)) if inner else b""
            return data + bytes(size - len(data))

    def region_write(self, region: str, offset: int, data: memoryview) -> int:
        """Write a region; a BAR region drops what lies past its backing (EINVAL past the BAR)."""
        with self.lock:
            total = self._region_size(region)
            if offset < 0 or offset + len(data) > total:
                raise self._err(
                    errno.EINVAL,
                    f"region {region}: write of {len(data)} bytes at {offset} is past the end "
                    f"({total} bytes)",
                )
            index = bar_index(region)
            space = pci_space(self)
            if index is None or index not in space.layout.bars:
                self.driver.region_write(region, offset, data)
                return len(data)
            msix = space.layout.msix
            if msix is not None and msix.bar == index:
                space.msix_write(offset, data)
                return len(data)
            inner = max(0, min(len(data), space.layout.backing.get(index, 0) - offset))
            if inner:
                self.driver.region_write(region, offset, data[:inner])
            return len(data)

    def _region_size(self, region: str) -> int:
        index = bar_index(region)
        if index is not None:
            bar = pci_space(self).layout.bars.get(index)
            if bar is not None:
                return bar.size
        size = self.driver.regions().get(region)
        if size is None:
            raise self._err(errno.ENOENT, f"no region {region}")
        return size

    # -- workload and lifetime -------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Run the workload for ``seconds`` if the device is running.

        In RUNNING_P2P and PRE_COPY_P2P a device still masters DMA (it is only
        quiesced towards its peers), so only the driver's DMA workload runs there.
        """
        with self.lock:
            if self._state in RUNNING_STATES:
                self.driver.advance(seconds)
            elif self._state in (State.RUNNING_P2P, State.PRE_COPY_P2P):
                self.driver.advance_dma(seconds)

    def check_removable(self) -> None:
        with self.lock:
            if self._session is not None and self._session.alive:
                raise self._err(errno.EBUSY, "a migration session is live")

    def close(self) -> None:
        with self.lock:
            self._end_session()
            self.irqs.close()
            self.dma.close()
            self.driver.close()


def _info(device: Device, *, with_digest: bool) -> dict[str, object]:
    """The body of :meth:`Device.info`."""
    with device.lock:
        out: dict[str, object] = {
            "name": device.name,
            "driver": device.driver_name,
            "migration_flags": flags_text(device.flags).split(),
            "state": device._state.name,
            "config_size": len(device._config),
            "regions": dict(device.driver.regions()),
            "bars": pci_space(device).layout.bars_info(),
            "cdev": device.cdev,
            "iommu_group": device.iommu_group,
            "pci_address": device.pci_address,
            "irqs": device.irqs.info(),
            "dma": device.dma.info(),
            "session": device._session.id if device._session else None,
            "read_sizes": {str(k): v for k, v in sorted(device._read_sizes.items())},
        }
        out.update(device.driver.info())
        if with_digest:
            out["state_digest"] = device.driver.digest()
        return out


@functools.cache
def _arc_change(cur: State, nxt: State) -> SessionChange:
    """The session effect of one arc (a pure function of the arc: cached)."""
    return arcs_session_change([(cur, nxt)])


def _step(device: Device, cur: State, nxt: State) -> SaveStream | LoadStream | None:
    """Run one arc: injected faults first (Rule 4), then the driver; failures are logged."""
    injected = device.faults.arc_errno(cur, nxt)
    if injected is not None:
        device._log.append(f"{cur.name} {nxt.name} {errno_name(injected)}")
        raise device._err(injected, f"arc {cur.name} -> {nxt.name} failed (injected fault)")
    stream_now = device._session.stream if device._session else None
    try:
        stream = device.driver.step(cur, nxt, stream_now)
    except DeviceError as exc:
        device._log.append(f"{cur.name} {nxt.name} {errno_name(exc.errno)}")
        if exc.enter_error:
            device._enter_error()
        raise
    return stream


def _corrupt(
    data: bytes | bytearray, start: int, end: int, offsets: Iterable[int]
) -> bytes | bytearray:
    """Flip the low bit of each injected-corruption offset in ``[start, end)``."""
    for offset in offsets:
        if start <= offset < end:
            if not isinstance(data, bytearray):
                data = bytearray(data)
            data[offset - start] ^= 0x01
    return data
