"""The input buffer both stream decoders share: a bytearray with a read offset."""

from __future__ import annotations

from typing import Final

# When to move the unconsumed tail of the buffer to its front: only once the
# consumed part dominates, so each byte is moved O(1) times on average.
_COMPACT_MIN_BYTES: Final = 1 << 16


class _Buffer:
    """A bytearray with a read offset: cheap consumption, amortised compaction."""

    __slots__ = ("data", "eof", "pos")

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.eof = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.pos >= len(self.data):
            self.data.clear()
            self.pos = 0
        elif self.pos >= _COMPACT_MIN_BYTES and self.pos * 2 >= len(self.data):
            del self.data[: self.pos]
            self.pos = 0
        self.data += chunk

    def receive(self, chunk: bytes | bytearray | memoryview) -> None:
        """The decoders' ``receive_data``: bytes, or ``b""`` for EOF (data after EOF is misuse)."""
        if self.eof:
            if chunk:
                raise ValueError("receive_data() called with data after EOF")
            return
        if chunk:
            self.feed(chunk)
        else:
            self.eof = True

    def available(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        with memoryview(self.data) as view:
            out = bytes(view[self.pos : self.pos + n])
        self.pos += n
        return out
