"""A driver under test in this process: the core's device around it, without FUSE.

:class:`LocalDevice` is what a mount's ``devices/NAME`` directory is, minus the
filesystem: the same FSM, sessions, log and fault rules (the core's device),
driven by method calls. Errors are the core's :class:`~fakevfio.errors.DeviceError`
(``IllegalTransition`` for a refused state) with the errno a file operation
would fail with.

The data handle works like the kernel's ``data_fd``: the last arc that opened
a session hands it out, reads and writes go to it, and it stays bound to that
session, so after the session ended (reset, RUNNING, ERROR) it fails with
ENODEV.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

from fakevfio._device import Device, Session
from fakevfio._faults import FaultRules
from fakevfio._process import OsServices
from fakevfio.driver import ArcDriver, PrecopyInfo
from fakevfio.errors import DeviceError
from fakevfio.testing._mount import fault_text
from vfio_uapi.fsm import State, parse_state

D = TypeVar("D", bound=ArcDriver, covariant=True)
#: ``factory(name)`` returns a new driver instance for a device called ``name``.
DriverFactory = Callable[[str], ArcDriver]

#: Read size of :meth:`LocalDevice.drain` and :meth:`LocalDevice.save` (the migrator's).
SAVE_CHUNK = 65536
#: Write size of :meth:`LocalDevice.feed` and :meth:`LocalDevice.load` (odd on purpose).
LOAD_CHUNK = 4099


class LocalDevice(Generic[D]):
    """An emulated device around ``driver``, in this process.

    Example::

        src = LocalDevice(MyDriver("src", {"seed": "1"}))
        dst = LocalDevice(MyDriver("dst", {}))
        dst.load(src.save())
        assert dst.digest() == src.digest()
    """

    def __init__(self, driver: D, *, driver_name: str = "", _device: Device | None = None) -> None:
        self._driver = driver
        self._device = _device or Device(
            driver.name, driver_name or type(driver).__name__.lower(), driver, 0, host=OsServices()
        )
        self._handle: Session | None = self._device.session

    @staticmethod
    def around(device: Device) -> LocalDevice[ArcDriver]:
        """Drive an existing core device (one a registry created, say)."""
        return LocalDevice(device.driver, _device=device)

    @property
    def driver(self) -> D:
        """The driver under test (call its own methods for driver-specific checks)."""
        return self._driver

    @property
    def name(self) -> str:
        return self._device.name

    # -- the state file -------------------------------------------------------
    def state(self) -> State:
        """The device state (a call, so type checkers re-read it after each change)."""
        return self._device.state

    def set_state(self, target: State | str) -> bool:
        """Go to ``target`` along the kernel's path; whether that opened a new session.

        Raises:
            DeviceError: an arc failed (the device is where it got to), or
                ``IllegalTransition`` (a DeviceError, EINVAL): refused.
        """
        wanted = parse_state(target) if isinstance(target, str) else target
        before = self._device.session
        try:
            self._device.set_state(wanted)
        finally:
            now = self._device.session
            opened = now is not None and now is not before
            if opened:
                self._handle = now
        return opened

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: RUNNING, the session (and so the handle) ended."""
        self._device.reset()

    def session_alive(self) -> bool:
        """Whether the data handle still reaches a live session."""
        return self._handle is not None and self._handle.alive

    # -- the data handle ----------------------------------------------------------
    def _data(self) -> Session:
        if self._handle is None:
            raise DeviceError(
                errno.ENODEV, "no migration session was ever opened", device=self.name
            )
        return self._handle

    def read(self, size: int = SAVE_CHUNK) -> bytes:
        """One ``read()`` of the saving stream: b"" at its end in STOP_COPY, ENOMSG in pre-copy."""
        return self.read_paced(size)[0]

    def read_paced(self, size: int, now: float = 0.0) -> tuple[bytes, float]:
        """:meth:`read` at time ``now``; also the seconds the device's bandwidth asks to wait."""
        data, delay = self._device.read(self._data(), size, now)
        return bytes(data), delay

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """One ``write()`` to the resuming stream."""
        self.write_paced(data)

    def write_paced(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> float:
        """:meth:`write` at time ``now``; the seconds the device's bandwidth asks to wait."""
        return self._device.write(self._data(), memoryview(data), now)[1]

    def try_read(self, size: int = SAVE_CHUNK) -> bytes | None:
        """:meth:`read`, but None at pre-copy's temporary end instead of ENOMSG."""
        try:
            return self.read(size)
        except DeviceError as exc:
            if exc.errno != errno.ENOMSG:
                raise
            return None

    def drain(self, chunk: int = SAVE_CHUNK) -> bytes:
        """Read until the end (STOP_COPY) or the temporary end (ENOMSG in pre-copy)."""
        out = bytearray()
        while data := self.try_read(chunk):
            out += data
        return bytes(out)

    def feed(self, stream: bytes, chunk: int = LOAD_CHUNK) -> None:
        """Write ``stream`` to the resuming session in ``write()`` calls of ``chunk`` bytes."""
        view = memoryview(stream)
        for offset in range(0, len(stream), chunk):
            self.write(view[offset : offset + chunk])

    # -- whole migrations -----------------------------------------------------------
    def save(self, chunk: int = SAVE_CHUNK) -> bytes:
        """STOP_COPY, read the whole stream, STOP: what a migration source sends."""
        self.set_state(State.STOP_COPY)
        data = self.drain(chunk)
        self.set_state(State.STOP)
        return data

    def start_load(self, stream: bytes, chunk: int = LOAD_CHUNK) -> None:
        """RESUMING and write ``stream``; the caller decides when to go to STOP."""
        self.set_state(State.RESUMING)
        self.feed(stream, chunk)

    def load(self, stream: bytes, chunk: int = LOAD_CHUNK) -> None:
        """RESUMING, write ``stream``, STOP (where the driver validates it)."""
        self.start_load(stream, chunk)
        self.set_state(State.STOP)

    # -- the other files ------------------------------------------------------------
    def digest(self) -> str:
        """The driver's ``state_digest`` (stable while the device is not RUNNING)."""
        return self.driver.digest()

    def info(self) -> dict[str, object]:
        return self._device.info()

    def log(self) -> list[str]:
        """``migration/log``: one ``FROM TO [ERRNO]`` line per arc, oldest first."""
        return self._device.log_text().splitlines()

    def precopy_info(self) -> PrecopyInfo:
        return self._device.precopy_info()

    def data_size(self) -> int:
        return self._device.data_size()

    def config(self) -> bytes:
        return self._device.config_bytes()

    def regions(self) -> Mapping[str, int]:
        return self._device.regions()

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        return self._device.region_read(region, offset, size)

    def region_write(self, region: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        return self._device.region_write(region, offset, memoryview(data))

    def set_faults(self, rules: str | Iterable[str]) -> None:
        """Replace the fault rules, e.g. ``"corrupt after 3"`` (the ``faults`` file's language)."""
        self._device.faults = FaultRules.parse(fault_text(rules))

    def advance(self, seconds: float) -> None:
        """Run the workload for ``seconds`` (only while running, as the mount's ticker does)."""
        self._device.advance(seconds)

    def close(self) -> None:
        """Remove the device (ends the session, calls the driver's ``close``)."""
        self._device.close()


def make_device(factory: DriverFactory, name: str = "src") -> LocalDevice[ArcDriver]:
    """A :class:`LocalDevice` around ``factory(name)``."""
    return LocalDevice(factory(name))


__all__ = ["LOAD_CHUNK", "SAVE_CHUNK", "DriverFactory", "LocalDevice", "make_device"]
