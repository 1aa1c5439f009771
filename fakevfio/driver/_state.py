"""The simple-level driver API, :class:`StateDriver` (see :mod:`fakevfio.driver`)."""

from __future__ import annotations

import abc
import errno
import hashlib
from collections.abc import Mapping
from typing import ClassVar

from fakevfio import _stream
from fakevfio.driver._base import ArcDriver, LoadStream, SaveStream
from fakevfio.errors import DeviceError
from vfio_uapi.fsm import State


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
    #: True if ``save_range`` returns views of the state's own memory that change only
    #: through the driver's methods (never a scratch buffer it reuses): then a read of
    #: a stopped device (STOP_COPY) may reply with such a view instead of a copy
    #: (:mod:`fakevfio._stream` Rule 6).
    stable_ranges: ClassVar[bool] = False

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

    def checksum(self, offset: int, length: int) -> int:
        """CRC-32C of the ``length`` state bytes at ``offset`` (a stopped device's).

        A stop-copy session asks for each whole ``CHECKSUM_CHUNK`` (the last one
        may be shorter) as it sends it (:mod:`fakevfio._stream` Rule 7). The
        default computes it from ``save_range``; a driver may keep the values of
        chunks it has not written since (it must drop one on any change).
        """
        return _stream.stream_checksum(self.save_range(offset, length))

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
        return _stream.state_driver_step(self, current, nxt, stream)

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return _stream.state_driver_data_size(self, stream)
