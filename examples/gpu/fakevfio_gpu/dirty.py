"""A page-granular dirty bitmap (what a device's DMA dirty tracking would keep)."""

from __future__ import annotations


class DirtyBitmap:
    """One byte per page; ``count`` is the number of dirty pages."""

    def __init__(self, pages: int) -> None:
        self._bits = bytearray(pages)
        self.count = 0

    def mark(self, first: int, last: int) -> None:
        """Mark pages ``first..last`` (inclusive) dirty."""
        bits = self._bits
        for page in range(first, last + 1):
            if not bits[page]:
                bits[page] = 1
                self.count += 1

    def clear(self, first: int, count: int) -> None:
        """Forget pages ``first .. first+count-1`` (their current content is being sent)."""
        if self.count:
            self.count -= self._bits.count(1, first, first + count)
            self._bits[first : first + count] = bytes(count)

    def take_run(self, max_pages: int) -> tuple[int, int] | None:
        """Clear and return the first run of dirty pages as (first page, count)."""
        if not self.count:
            return None
        first = self._bits.find(1)
        end = self._bits.find(0, first, first + max_pages)
        if end < 0:
            end = min(len(self._bits), first + max_pages)
        self.clear(first, end - first)
        return first, end - first
