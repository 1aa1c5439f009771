"""QEMU's vfio-pci config blob (``vmstate_vfio_pci_config``) and its restore plan.

What QEMU's ``vfio_pci_save_config`` writes after DEV_CONFIG_STATE, in both
modes (hw/vfio/pci.c, hw/pci/pci.c ``vmstate_pci_device``, hw/pci/msix.c
``msix_save``), with no vmstate header of its own:

* be32 ``version_id`` of the PCIDevice vmstate (2);
* the config space: 4096 bytes when the device is PCI Express (it keeps a PCI
  Express capability and has a 4096-byte config space), else 256;
* ``irq_state``: four be32, one per INTx pin (0: not asserted);
* when the device has MSI-X: the MSI-X table (16 bytes a vector) and the PBA
  (a bit a vector, rounded up to bytes).

Rules:

1. The layout (config size, MSI-X vectors) comes from the device's own config
   space, as QEMU's destination takes it from its own device: the blob carries
   no lengths.
2. The source has no guest: it writes the config space as the device holds it,
   no INTx asserted, and the MSI-X table as QEMU's ``msix_init`` leaves it for a
   guest that never programmed it (every vector masked, address and data 0, no
   bit pending).
3. A destination checks what QEMU's ``get_pci_config_device`` refuses to load
   (identity registers that differ) and then writes into the device only what
   QEMU's ``vfio_pci_load_config`` makes reach it: PCI_COMMAND, the six BARs,
   and the MSI / MSI-X enable bits (the rest of each message-control word is
   the device's own). Nothing else of the saved config space is written.
4. Outside input is bounded: a blob is parsed against the local layout, and a
   blob of another size is a FramingError naming both sizes. A local config
   space shorter than 256 bytes is a LocalProtocolError.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from migrator.errors import FramingError, LocalProtocolError

PCI_CONFIG_SPACE_SIZE: Final = 256
PCIE_CONFIG_SPACE_SIZE: Final = 4096
#: vmstate_pci_device.version_id, written as the blob's first be32.
PCI_DEVICE_VMSTATE_VERSION: Final = 2
PCI_NUM_PINS: Final = 4
MSIX_ENTRY_SIZE: Final = 16
MSIX_ENTRY_VECTOR_CTRL: Final = 12
MSIX_ENTRY_CTRL_MASKBIT: Final = 1

PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_STATUS_CAP_LIST: Final = 0x10
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_NUM_BARS: Final = 6
PCI_CAPABILITY_LIST: Final = 0x34
PCI_CAP_ID_MSI: Final = 0x05
PCI_CAP_ID_EXP: Final = 0x10
PCI_CAP_ID_MSIX: Final = 0x11
PCI_MSI_FLAGS_ENABLE: Final = 0x0001
PCI_MSIX_FLAGS_QSIZE: Final = 0x07FF
PCI_MSIX_FLAGS_MASKALL: Final = 0x4000
PCI_MSIX_FLAGS_ENABLE: Final = 0x8000
#: Registers whose difference QEMU's get_pci_config_device refuses (read-only
#: bits): vendor and device id, revision and class, header type.
_IDENTITY: Final = (
    (0x00, 4, "vendor/device id"),
    (0x08, 4, "revision/class"),
    (0x0E, 1, "header type"),
)

_BE32 = struct.Struct(">I")
_LE16 = struct.Struct("<H")
_MAX_CAPS: Final = 48  # (256 - 64) / 4: a longer list loops


def find_capability(config: bytes, cap_id: int) -> int | None:
    """Offset of the first standard capability ``cap_id``, or None (a looping list stops)."""
    if len(config) < 0x40 or not _LE16.unpack_from(config, PCI_STATUS)[0] & PCI_STATUS_CAP_LIST:
        return None
    pos = config[PCI_CAPABILITY_LIST] & ~3
    end = min(len(config), PCI_CONFIG_SPACE_SIZE)
    for _ in range(_MAX_CAPS):
        if pos < 0x40 or pos + 4 > end:
            return None
        if config[pos] == cap_id:
            return pos
        pos = config[pos + 1] & ~3
    return None


@attrs.frozen
class ConfigLayout:
    """What a blob's size depends on (Rule 1)."""

    config_size: int
    msix_vectors: int

    @classmethod
    def of(cls, config: bytes) -> ConfigLayout:
        """The layout QEMU uses for a device whose config space is ``config``."""
        express = find_capability(config, PCI_CAP_ID_EXP) is not None
        size = PCIE_CONFIG_SPACE_SIZE if express and len(config) >= 4096 else PCI_CONFIG_SPACE_SIZE
        if len(config) < size:
            raise LocalProtocolError(
                f"a config space of {len(config)} bytes is shorter than PCI's 256; "
                "expected the device's whole config region"
            )
        msix = find_capability(config, PCI_CAP_ID_MSIX)
        vectors = 0 if msix is None else (_LE16.unpack_from(config, msix + 2)[0] & 0x7FF) + 1
        return cls(size, vectors)

    @property
    def msix_bytes(self) -> int:
        n = self.msix_vectors
        return n * MSIX_ENTRY_SIZE + (n + 7) // 8

    @property
    def blob_size(self) -> int:
        return 4 + self.config_size + 4 * PCI_NUM_PINS + self.msix_bytes


@attrs.frozen
class QemuConfig:
    """A parsed ``vmstate_vfio_pci_config`` blob."""

    version_id: int
    config: bytes
    irq_state: tuple[int, ...]
    msix_table: bytes
    msix_pba: bytes


def encode_qemu_config(config: bytes) -> bytes:
    """QEMU's blob for a device whose config space is ``config`` (Rule 2)."""
    layout = ConfigLayout.of(config)
    out = bytearray(_BE32.pack(PCI_DEVICE_VMSTATE_VERSION))
    out += config[: layout.config_size]
    out += bytes(4 * PCI_NUM_PINS)
    if layout.msix_vectors:
        entry = bytearray(MSIX_ENTRY_SIZE)
        entry[MSIX_ENTRY_VECTOR_CTRL] = MSIX_ENTRY_CTRL_MASKBIT
        out += bytes(entry) * layout.msix_vectors
        out += bytes((layout.msix_vectors + 7) // 8)
    return bytes(out)


def decode_qemu_config(blob: bytes | memoryview, layout: ConfigLayout) -> QemuConfig:
    """Parse a blob against the local device's layout (Rule 4).

    Raises:
        FramingError: the size is not the layout's, or version_id is not 1 or 2.
    """
    if len(blob) != layout.blob_size:
        raise FramingError(
            f"config blob of {len(blob)} bytes, expected {layout.blob_size} for a device with "
            f"{layout.config_size} bytes of config space and {layout.msix_vectors} MSI-X vectors "
            "(QEMU's vmstate_vfio_pci_config); is the destination device the same model?"
        )
    data = bytes(blob)
    version = _BE32.unpack_from(data)[0]
    if version not in (1, PCI_DEVICE_VMSTATE_VERSION):
        raise FramingError(f"config blob: PCIDevice version_id {version}, expected 1 or 2")
    end = 4 + layout.config_size
    irq = struct.unpack_from(f">{PCI_NUM_PINS}i", data, end)
    table_end = end + 4 * PCI_NUM_PINS + layout.msix_vectors * MSIX_ENTRY_SIZE
    return QemuConfig(
        version, data[4:end], irq, data[end + 4 * PCI_NUM_PINS : table_end], data[table_end:]
    )


def restore_writes(current: bytes, saved: bytes) -> list[tuple[int, bytes]]:
    """The config writes that restore ``saved`` into a device now at ``current`` (Rule 3).

    Raises:
        FramingError: an identity register differs (QEMU: "Bad config data").
    """
    for off, n, what in _IDENTITY:
        if current[off : off + n] != saved[off : off + n]:
            raise FramingError(
                f"config blob is for another device: {what} at 0x{off:02x} is "
                f"{saved[off : off + n].hex()}, the destination device has "
                f"{current[off : off + n].hex()}"
            )
    writes = [(PCI_COMMAND, saved[PCI_COMMAND : PCI_COMMAND + 2])]
    bars = PCI_BASE_ADDRESS_0
    writes.append((bars, saved[bars : bars + 4 * PCI_NUM_BARS]))
    for cap_id, bits in (
        (PCI_CAP_ID_MSI, PCI_MSI_FLAGS_ENABLE),
        (PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL),
    ):
        pos = find_capability(current, cap_id)
        if pos is None:
            continue
        mine = _LE16.unpack_from(current, pos + 2)[0]
        theirs = _LE16.unpack_from(saved, pos + 2)[0]
        value = (mine & ~bits) | (theirs & bits)
        if value != mine:
            writes.append((pos + 2, _LE16.pack(value)))
    return writes
