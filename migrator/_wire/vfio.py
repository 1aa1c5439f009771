"""The VFIO payload inside each savevm section: be64 markers, DATA headers, config blobs.

Reference ``qemu-vfio-multifd.md`` section 1.2: a section's VFIO payload is a
run of ``VFIO_MIG_FLAG_*`` markers (be64), a DEV_DATA_STATE marker carries a be64
size and that many bytes, and DEV_CONFIG_STATE is followed by QEMU's own config
blob (:mod:`.pci_config`; no length: the destination sizes it from its device).
Pure encoders only; decoding is the main decoder's.
"""

from __future__ import annotations

import enum
import struct
from typing import Final


class Marker(enum.IntEnum):
    """VFIO_MIG_FLAG_* markers, written as be64 (reference 1.2)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


_BE64 = struct.Struct(">Q")
_MARKER_AND_SIZE = struct.Struct(">QQ")

MARKER_VALUES: Final = frozenset(int(m) for m in Marker)


def encode_marker(m: Marker) -> bytes:
    """One VFIO marker as be64."""
    return _BE64.pack(m)


def encode_data_header(size: int) -> bytes:
    """DEV_DATA_STATE + be64 size; the caller sends the ``size`` bytes itself."""
    return _MARKER_AND_SIZE.pack(Marker.DEV_DATA_STATE, size)


def encode_config_blob(blob: bytes) -> bytes:
    """A config blob on the wire: QEMU's ``vmstate_vfio_pci_config`` as it is (no length)."""
    return bytes(blob)
