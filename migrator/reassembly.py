"""In-order reassembly of one device's multifd device-state packets.

QEMU's source numbers a device's stop-copy packets 0, 1, 2, ... and sends the
config packet last with idx = number of data packets; multifd spreads them
over all channels, so they arrive in any order (reference sections 3.4-4.3).
The destination must write the data to the device strictly in idx order and
load the config only after every data buffer before it.

Theory of operation
-------------------

Rule 1: each idx is accepted once. An idx already queued, already popped, or
        equal to 0xffffffff is an error, as in QEMU ("already filled").
Rule 2: there is exactly one config packet, and it has the highest idx: data
        at or after it, a second config, or a config before a data idx already
        seen are errors (QEMU would trip an assertion or hang; we refuse).
Rule 3: the payload bytes queued and not yet popped (the config included, as
        QEMU counts it) never exceed ``max_queued_bytes``; the check comes
        before anything is stored. The number of queued buffers is bounded too
        (``max_queued_buffers``), since empty data buffers cost no bytes.
Rule 4: ``pop_ready()`` releases the in-order run from ``next_idx`` up to the
        first gap or the config idx; empty buffers are dropped there (QEMU
        skips writing them). ``config`` appears once all data before it was
        popped; then ``done`` is True.

Backpressure: an adapter may ask ``can_accept(n)`` and hold a packet back
instead of failing, but it must always offer the packet at ``waiting_for``,
otherwise it waits for itself. The destination's shared budget over all
devices (and the per-device bound it sets here) is
:class:`migrator._protocol.multifd.MultifdIntake`.
"""

from __future__ import annotations

from migrator.errors import ReassemblyError
from migrator.multifd_wire import IDX_INVALID

#: A packet's data: bytes, or a view into the buffer it was received in (no copy).
Buffer = bytes | bytearray | memoryview


class Reassembler:
    """Pure reassembly state of one device (see the module docstring)."""

    def __init__(
        self, idstr: str, *, max_queued_bytes: int, max_queued_buffers: int = 1 << 16
    ) -> None:
        if max_queued_bytes < 0 or max_queued_buffers <= 0:
            raise ValueError("queue bounds must be positive")
        self.idstr = idstr
        self._max_bytes = max_queued_bytes
        self._max_buffers = max_queued_buffers
        self._bufs: dict[int, Buffer] = {}
        self._next = 0
        self._queued = 0
        self._max_data_idx = -1  # highest data idx seen so far
        self._config_idx: int | None = None
        self._config: Buffer | None = None

    @property
    def next_idx(self) -> int:
        """The idx ``pop_ready()`` releases next."""
        return self._next

    @property
    def waiting_for(self) -> int:
        """The idx needed to make progress (the config idx once data is all in)."""
        return self._next

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def queued_buffers(self) -> int:
        return len(self._bufs) + (self._config is not None)

    @property
    def config_idx(self) -> int | None:
        return self._config_idx

    @property
    def config(self) -> Buffer | None:
        """The config packet's data, once every data buffer before it was popped."""
        if self._config_idx is not None and self._next == self._config_idx:
            return self._config
        return None

    @property
    def done(self) -> bool:
        return self.config is not None

    def can_accept(self, nbytes: int) -> bool:
        """Whether a packet of ``nbytes`` data bytes fits within the bounds now."""
        return self._queued + nbytes <= self._max_bytes and self.queued_buffers < self._max_buffers

    def push(self, idx: int, is_config: bool, data: Buffer) -> None:
        """Queue one packet's data; raises ReassemblyError (nothing stored then)."""
        if idx == IDX_INVALID:
            raise ReassemblyError("packet index is invalid", device=self.idstr)
        if idx < 0 or idx > IDX_INVALID:
            raise ValueError(f"idx {idx} is not a u32")
        if idx < self._next or idx in self._bufs or idx == self._config_idx:
            raise ReassemblyError(f"state buffer {idx} already filled", device=self.idstr)
        if is_config:
            if self._config_idx is not None:
                raise ReassemblyError(
                    f"second config packet (idx {idx}; the config was idx {self._config_idx})",
                    device=self.idstr,
                )
            if idx < self._max_data_idx:
                raise ReassemblyError(
                    f"config packet idx {idx} is before data packet idx {self._max_data_idx}",
                    device=self.idstr,
                )
        elif self._config_idx is not None and idx >= self._config_idx:
            raise ReassemblyError(
                f"data packet idx {idx} is at or after the config packet idx {self._config_idx}",
                device=self.idstr,
            )
        if self._queued + len(data) > self._max_bytes:
            raise ReassemblyError(
                f"queuing state buffer {idx} would exceed the size max of {self._max_bytes}",
                device=self.idstr,
            )
        if self.queued_buffers >= self._max_buffers:
            raise ReassemblyError(
                f"queuing state buffer {idx} would exceed the count max of {self._max_buffers}",
                device=self.idstr,
            )
        self._queued += len(data)
        if is_config:
            self._config_idx = idx
            self._config = data
        else:
            self._bufs[idx] = data
            self._max_data_idx = max(self._max_data_idx, idx)

    @property
    def has_ready(self) -> bool:
        """Whether ``pop_ready()`` or ``config`` would give something now."""
        return self._next in self._bufs or self.config is not None

    def pop_ready(self, max_bytes: int | None = None) -> list[Buffer]:
        """The data buffers now ready, in idx order (empty ones left out).

        With ``max_bytes``, stop once that many bytes were taken (at least one
        buffer is taken when one is ready), so a caller can write in batches.
        """
        out: list[Buffer] = []
        bufs = self._bufs
        taken = 0
        while self._next in bufs and (max_bytes is None or taken < max_bytes):
            data = bufs.pop(self._next)
            self._queued -= len(data)
            self._next += 1
            taken += len(data)
            if data:
                out.append(data)
        return out
