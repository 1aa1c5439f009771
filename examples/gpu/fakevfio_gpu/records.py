"""The gpu example's migration stream: a preamble, then mlx5-style tagged records.

Theory of operation
-------------------
All integers are little-endian.

Preamble (16 bytes)::

    0  8  magic b"FVGPUSTM"
    8  4  stream version (1)
    12 4  flags (0)

Record header (16 bytes), then ``length`` payload bytes::

    0  4  tag
    4  4  flags: bit 0 MANDATORY, every other bit reserved (0)
    8  8  length

Tags of version 1:

=========  ====  =========  =====================================================
name       tag   mandatory  payload
=========  ====  =========  =====================================================
DEVINFO    1     yes        u64 memory size, u32 page size, u32 0 (16 bytes)
MEM        2     yes        u64 offset (page aligned), then 1 B .. 1 MiB of memory
CONTEXT    3     yes        the engine context (4096 bytes: BAR0, region ``bar0``)
STATS      4     no         u64 pages sent, u64 pages re-sent (information only)
END        5     yes        u64 MEM data bytes in the stream, u32 CRC-32 of every
                            stream byte before the END record, u32 0
=========  ====  =========  =====================================================

Rule 1: the first record is DEVINFO; the loader compares it with its own device
        before it touches memory (another size or page size: EOPNOTSUPP).
Rule 2: a record with an unknown tag is skipped if it is optional and refused
        with EOPNOTSUPP if it is MANDATORY; so a newer source can add optional
        information without breaking older destinations, and a mandatory
        feature an older destination lacks fails loudly instead of silently.
Rule 3: another stream version gives EOPNOTSUPP; bad magic, reserved bits,
        a wrong length for a known tag or a CRC mismatch give EINVAL; bytes
        after END give ENOMEM. Any error kills the stream.
Rule 4: RESUMING -> STOP needs END, every page loaded at least once and a
        CONTEXT record; otherwise EINVAL and the device stays in RESUMING. A
        stream that merely stops short stays usable (write the rest, retry).
"""

from __future__ import annotations

import struct

MAGIC = b"FVGPUSTM"
STREAM_VERSION = 1
PREAMBLE = struct.Struct("<8sII")
RECORD = struct.Struct("<IIQ")
FLAG_MANDATORY = 0x1

TAG_DEVINFO = 1
TAG_MEM = 2
TAG_CONTEXT = 3
TAG_STATS = 4
TAG_END = 5
TAG_NAMES = {
    TAG_DEVINFO: "DEVINFO",
    TAG_MEM: "MEM",
    TAG_CONTEXT: "CONTEXT",
    TAG_STATS: "STATS",
    TAG_END: "END",
}

DEVINFO = struct.Struct("<QI4x")
MEM_OFFSET = struct.Struct("<Q")
STATS = struct.Struct("<QQ")
END = struct.Struct("<QI4x")
CONTEXT_BYTES = 4096
MAX_MEM_RECORD_BYTES = 1 << 20
#: Unknown optional records are skipped without buffering, but not without bound.
MAX_SKIP_BYTES = 64 << 20


def encode_record(tag: int, payload: bytes | memoryview, *, mandatory: bool = True) -> bytes:
    """One record: header and payload."""
    flags = FLAG_MANDATORY if mandatory else 0
    return RECORD.pack(tag, flags, len(payload)) + bytes(payload)


def encode_preamble(version: int = STREAM_VERSION, flags: int = 0) -> bytes:
    return PREAMBLE.pack(MAGIC, version, flags)


def mem_records_bytes(length: int, run: int) -> int:
    """Bytes of MEM records covering ``length`` memory bytes in runs of ``run``."""
    records = -(-length // run)
    return length + records * (RECORD.size + MEM_OFFSET.size)


#: Bytes of the records written after the memory in STOP_COPY.
TAIL_BYTES = (RECORD.size + CONTEXT_BYTES) + (RECORD.size + STATS.size) + (RECORD.size + END.size)
