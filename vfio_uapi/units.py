"""Sizes with the suffixes every fakevfio and migrator option takes (K, M, G, T).

The suffixes are powers of 1024 (INTERFACES section 5). Both command lines and
the driver options parse sizes here, so ``256M`` means the same everywhere.
"""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``256M`` / ``4096`` / ``1G`` into bytes.

    Raises:
        ValueError: not a number with an optional K, M, G or T suffix; the
            message names ``what`` was being parsed.
    """
    m = re.fullmatch(r"\s*(\d{1,19})\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", text)
    if not m:
        raise ValueError(f"invalid {what} {text!r} (expected a number with optional K, M or G)")
    return int(m.group(1)) * _SUFFIXES[m.group(2).upper()]
