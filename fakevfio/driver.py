"""The driver API: what a vendor driver plugin implements.

There are two levels.

* :class:`ArcDriver` gives a driver full control, like a kernel variant driver's
  ``migration_set_state``: the core calls :meth:`ArcDriver.step` once per arc the
  kernel's FSM hands out, and the driver returns a :class:`SaveStream` or
  :class:`LoadStream` on the four arcs that open a new data_fd.
* :class:`StateDriver` is the simple level: the driver only describes its state
  as a byte array of ``state_size`` bytes (``save_range``/``load_range``), a
  versioned header it validates, and which pages its workload dirtied. The core
  turns that into sessions, chunking, pre-copy accounting and a validated
  stream (see :mod:`fakevfio.stream`).

Drivers are synchronous and do no I/O; the core serialises every call on a
device with one lock, so a driver needs no locking of its own. Errors a driver
wants userspace to see are raised as :class:`~fakevfio.errors.DeviceError` with
the errno the kernel would return.
"""

from __future__ import annotations

import abc
import errno
import hashlib
from collections.abc import Mapping
from typing import ClassVar

import attrs

from fakevfio.errors import ConfigError, DeviceError
from fakevfio.fsm import MigFlags, State
from fakevfio.options import parse_size

PCI_CONFIG_SIZES = (256, 4096)


@attrs.frozen(kw_only=True)
class OptionSpec:
    """One driver option, as listed by ``fakevfio drivers``.

    ``kind`` is ``size`` (K/M/G suffixes), ``int``, ``flags`` or ``str``.
    """

    kind: str
    default: str | None
    help: str


@attrs.frozen(kw_only=True)
class PrecopyInfo:
    """``struct vfio_precopy_info`` output."""

    initial_bytes: int
    dirty_bytes: int


class SaveStream(abc.ABC):
    """The saving side of one migration session (arc-level drivers)."""

    @abc.abstractmethod
    def read(self, size: int, state: State) -> bytes | bytearray | memoryview:
        """Return up to ``size`` bytes of the stream.

        In STOP_COPY an empty result means the end of the stream. In PRE_COPY*
        raise ``DeviceError(ENOMSG)`` at the temporary end.
        """

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """Current pre-copy estimates (only called in PRE_COPY*)."""

    @abc.abstractmethod
    def remaining(self) -> int:
        """Estimated bytes still to come if the device stopped now."""


class LoadStream(abc.ABC):
    """The resuming side of one migration session (arc-level drivers)."""

    @abc.abstractmethod
    def write(self, data: memoryview) -> None:
        """Accept the next bytes of the stream (any segmentation).

        Raise ``DeviceError`` on bad data; the core then kills the session.
        """


class ArcDriver(abc.ABC):
    """Full-control driver interface.

    Subclasses set the class attributes, accept their options in ``__init__``
    (parse with the helpers below) and implement the abstract methods.
    """

    #: One line shown by ``fakevfio drivers``.
    description: ClassVar[str] = ""
    #: Options the driver accepts, listed by ``fakevfio drivers``.
    options: ClassVar[Mapping[str, OptionSpec]] = {}

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"device {name}: unknown option(s) {', '.join(unknown)} (allowed: {allowed})"
            )
        self.name = name
        self._raw_options = dict(options)

    # -- option helpers -------------------------------------------------
    def option(self, key: str) -> str | None:
        """The option's value, or its declared default."""
        if key in self._raw_options:
            return self._raw_options[key]
        return self.options[key].default

    def size_option(self, key: str) -> int | None:
        value = self.option(key)
        return None if value is None else parse_size(value, what=f"{key} option")

    def int_option(self, key: str) -> int | None:
        value = self.option(key)
        if value is None:
            return None
        try:
            return int(value, 0)
        except ValueError:
            raise ConfigError(
                f"device {self.name}: option {key}={value!r} is not an integer"
            ) from None

    # -- description ----------------------------------------------------
    @property
    @abc.abstractmethod
    def migration_flags(self) -> MigFlags:
        """One of the four defined flag words."""

    config_size: int = 256
    #: Dirty pages are counted in units of this size (bytes).
    page_size: int = 4096
    #: Emulated device speed on the data stream, bytes per second (None: unlimited).
    read_bandwidth: int | None = None
    write_bandwidth: int | None = None

    def initial_config(self) -> bytes:
        """The PCI config space at creation (``config_size`` bytes)."""
        cfg = bytearray(self.config_size)
        cfg[0:2] = (0x1AF4).to_bytes(2, "little")  # vendor: Red Hat / virtio range
        cfg[2:4] = (0x10F0).to_bytes(2, "little")
        cfg[0x0E] = 0  # header type 0
        return bytes(cfg)

    def regions(self) -> Mapping[str, int]:
        """Region name -> size in bytes."""
        return {}

    def region_read(self, region: str, offset: int, size: int) -> bytes | memoryview:
        raise DeviceError(errno.EINVAL, f"region {region} is not readable", device=self.name)

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        raise DeviceError(errno.EINVAL, f"region {region} is not writable", device=self.name)

    # -- migration ------------------------------------------------------
    @abc.abstractmethod
    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        """Execute one arc. Return a new stream exactly on the four new-session arcs.

        ``stream`` is the live session's stream (None without a session). On
        RESUMING -> STOP validate it and raise DeviceError if it is incomplete.
        """

    @abc.abstractmethod
    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes still to come in STOP_COPY."""

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` hook; the core already moved the state to RUNNING."""

    @abc.abstractmethod
    def digest(self) -> str:
        """Hex SHA-256 over the complete migratable internal state."""

    def advance(self, seconds: float) -> None:
        """Run the device's workload for ``seconds`` (only called while running)."""

    def session_ended(self) -> None:
        """The live migration session ended (any reason: arc, reset, ERROR, removal)."""

    def has_workload(self) -> bool:
        """Whether :meth:`advance` does anything (saves needless ticks)."""
        return False

    def info(self) -> Mapping[str, object]:
        """Driver-specific extra fields for the ``info`` file."""
        return {}

    def close(self) -> None:
        """The device is being removed."""


class StateDriver(ArcDriver):
    """Simple-level driver: describe the state; the core does sessions and streams.

    The state is ``state_size()`` bytes addressed by offset. A workload marks what
    it changes with :meth:`mark_dirty`; the core re-sends dirty pages in pre-copy
    and stop-copy. ``header()`` is stored in the stream after the core's own
    header and given back to ``check_header()`` on the destination before any state
    is loaded; ``validate()`` runs once all data arrived (RESUMING -> STOP).
    """

    #: Driver stream format version, stored in the default header.
    stream_version: ClassVar[int] = 1

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        self._dirty: bytearray | None = None
        self._dirty_count = 0

    @abc.abstractmethod
    def state_size(self) -> int:
        """Bytes of migratable state (constant for the device's lifetime)."""

    @abc.abstractmethod
    def save_range(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Serialize ``length`` bytes of state at ``offset``."""

    @abc.abstractmethod
    def load_range(self, offset: int, data: memoryview) -> None:
        """Deserialize ``data`` at ``offset``."""

    def header(self) -> bytes:
        """Driver header carried in the stream; must identify format and compatibility."""
        return f"{type(self).__name__} v{self.stream_version}".encode()

    def check_header(self, header: bytes) -> None:
        """Reject a stream this device cannot load (raise DeviceError)."""
        if header != self.header():
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"incompatible stream: driver header {header[:64]!r}, expected {self.header()!r}",
                device=self.name,
            )

    def validate(self) -> None:
        """Final consistency check after all data was loaded (raise DeviceError)."""

    def digest(self) -> str:
        h = hashlib.sha256()
        size = self.state_size()
        chunk = 1 << 20
        for off in range(0, size, chunk):
            h.update(self.save_range(off, min(chunk, size - off)))
        return h.hexdigest()

    # -- dirty tracking (used by the core) ------------------------------
    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` changed (no-op if not tracking)."""
        bitmap = self._dirty
        if bitmap is None or length <= 0:
            return
        first = offset // self.page_size
        last = (offset + length - 1) // self.page_size
        for page in range(first, last + 1):
            if not bitmap[page]:
                bitmap[page] = 1
                self._dirty_count += 1

    def start_dirty_tracking(self) -> None:
        self._dirty = bytearray(-(-self.state_size() // self.page_size))
        self._dirty_count = 0

    def stop_dirty_tracking(self) -> None:
        self._dirty = None
        self._dirty_count = 0

    def session_ended(self) -> None:
        self.stop_dirty_tracking()

    def dirty_pages(self) -> int:
        return self._dirty_count

    def take_dirty_run(self, max_pages: int) -> tuple[int, int] | None:
        """Clear and return the first run of dirty pages as (first page, count)."""
        bitmap = self._dirty
        if bitmap is None or not self._dirty_count:
            return None
        first = bitmap.find(1)
        end = bitmap.find(0, first, first + max_pages)
        if end < 0:
            end = min(len(bitmap), first + max_pages)
        count = end - first
        bitmap[first:end] = bytes(count)
        self._dirty_count -= count
        return first, count

    # -- ArcDriver plumbing ----------------------------------------------
    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        # Imported here: fakevfio.stream builds on this module.
        from fakevfio import stream as _stream

        return _stream.state_driver_step(self, current, nxt, stream)

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        from fakevfio import stream as _stream

        return _stream.state_driver_data_size(self, stream)
