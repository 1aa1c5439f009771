"""An independent model of QEMU's wire formats, for cross-checking migrator's codecs.

Written only from ``/work/shared/reference/qemu-vfio-multifd.md`` (sections 1.1,
1.2, 1.5, 3.2-3.4) and on purpose shares nothing with ``migrator``: no imports
from it, a different style (a whole-buffer cursor instead of an incremental
decoder, ``int.to_bytes`` instead of ``struct``). Records are plain tuples so a
test can compare them with ``==``:

    ("header", version)
    ("configuration", machine_name)
    ("command", cmd, payload)
    ("start" | "full", section_id, idstr, instance_id, version_id)
    ("part" | "end", section_id)
    ("marker", section_id, marker_name)         # SETUP, EOS, INIT_DATA_SENT, ...
    ("data", section_id, data)                  # a whole DATA block
    ("config", section_id, blob)                # blob after DEV_CONFIG_STATE
    ("footer", section_id)
    ("eof",)

Errors are ``ReferenceError_`` (a ValueError).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Record = tuple[Any, ...]

MAGIC_QEVM = 0x5145564D
STREAM_VERSION = 3

# Section type bytes (reference 1.1).
T_EOF, T_START, T_PART, T_END, T_FULL = 0, 1, 2, 3, 4
T_SUB, T_VMDESC, T_CONFIG, T_COMMAND, T_FOOTER = 5, 6, 7, 8, 0x7E

# VFIO markers (reference 1.2): all-ones high word, 0xef10, code.
MARKERS = {
    "EOS": 0xFFFFFFFF_EF10_0001,
    "CONFIG_STATE": 0xFFFFFFFF_EF10_0002,
    "SETUP": 0xFFFFFFFF_EF10_0003,
    "DATA": 0xFFFFFFFF_EF10_0004,
    "INIT_DATA_SENT": 0xFFFFFFFF_EF10_0005,
    "CONFIG_LOAD_READY": 0xFFFFFFFF_EF10_0006,
}
MARKER_NAMES = {v: k for k, v in MARKERS.items()}

CMD_OPEN_RETURN_PATH = 1
CMD_SWITCHOVER_START = 11

MULTIFD_MAGIC = 0x11223344
DEVICE_STATE_FLAG = 32 << 1


class ReferenceError_(ValueError):
    pass


def be(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


class Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def left(self) -> int:
        return len(self.data) - self.off

    def bytes_(self, n: int) -> bytes:
        if self.left() < n:
            raise ReferenceError_(f"short read: wanted {n} at {self.off}, have {self.left()}")
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.bytes_(width), "big")


# --- main stream --------------------------------------------------------------


def pci_config_blob_size(config_size: int, msix_vectors: int) -> int:
    """Bytes of QEMU's vmstate_vfio_pci_config (hw/vfio/pci.c) for such a device.

    hw/pci/pci.c vmstate_pci_device: int32 version_id, the config space
    (config_size bytes), irq_state (PCI_NUM_PINS = 4 int32); hw/pci/msix.c
    msix_save, with MSI-X only: the table (PCI_MSIX_ENTRY_SIZE = 16 a vector),
    then the PBA (a bit a vector, whole bytes).
    """
    msix = msix_vectors * 16 + -(-msix_vectors // 8)
    return 4 + config_size + 4 * 4 + msix


def parse_pci_config_blob(blob: bytes, config_size: int, msix_vectors: int) -> dict[str, Any]:
    """Split QEMU's config blob into its vmstate fields (see pci_config_blob_size)."""
    if len(blob) != pci_config_blob_size(config_size, msix_vectors):
        raise ReferenceError_(f"config blob of {len(blob)} bytes")
    c = Cursor(blob)
    out: dict[str, Any] = {"version_id": c.uint(4), "config": c.bytes_(config_size)}
    out["irq_state"] = [c.uint(4) for _ in range(4)]
    out["msix_table"] = c.bytes_(16 * msix_vectors)
    out["msix_pba"] = c.bytes_(c.left())
    return out


def parse_stream(data: bytes, config_sizes: dict[str, int] | None = None) -> list[Record]:
    """Parse a whole main-channel stream that ends with QEMU_VM_EOF.

    QEMU's config blob has no length: ``config_sizes`` gives each idstr's
    (``pci_config_blob_size``), as QEMU's destination knows it from its device.
    """
    sizes = {} if config_sizes is None else config_sizes
    idstrs: dict[int, str] = {}
    c = Cursor(data)
    out: list[Record] = []
    if c.uint(4) != MAGIC_QEVM:
        raise ReferenceError_("bad magic")
    version = c.uint(4)
    if version != STREAM_VERSION:
        raise ReferenceError_("bad version")
    out.append(("header", version))
    while True:
        kind = c.uint(1)
        if kind == T_EOF:
            out.append(("eof",))
            break
        if kind == T_CONFIG:
            name_len = c.uint(4)
            out.append(("configuration", c.bytes_(name_len).decode()))
        elif kind == T_COMMAND:
            cmd = c.uint(2)
            length = c.uint(2)
            out.append(("command", cmd, c.bytes_(length)))
        elif kind in (T_START, T_FULL):
            sid = c.uint(4)
            idstr = c.bytes_(c.uint(1)).decode()
            instance_id = c.uint(4)
            version_id = c.uint(4)
            out.append(
                ("start" if kind == T_START else "full", sid, idstr, instance_id, version_id)
            )
            idstrs[sid] = idstr
            _parse_vfio_payload(c, sid, out, sizes.get(idstr))
        elif kind in (T_PART, T_END):
            sid = c.uint(4)
            out.append(("part" if kind == T_PART else "end", sid))
            _parse_vfio_payload(c, sid, out, sizes.get(idstrs.get(sid, "")))
        else:
            raise ReferenceError_(f"unknown section type {kind}")
    if c.left():
        raise ReferenceError_(f"{c.left()} bytes after EOF")
    return out


def _parse_vfio_payload(c: Cursor, sid: int, out: list[Record], config_size: int | None) -> None:
    # vfio_load_state: read markers until one that ends the payload.
    while True:
        value = c.uint(8)
        name = MARKER_NAMES.get(value)
        if name is None:
            raise ReferenceError_(f"unknown tag {value:#x}")
        if name == "DATA":
            size = c.uint(8)
            out.append(("data", sid, c.bytes_(size)))
            continue
        out.append(("marker", sid, name))
        if name == "SETUP":
            if c.uint(8) != MARKERS["EOS"]:
                raise ReferenceError_("SETUP not followed by EOS")
            out.append(("marker", sid, "EOS"))
        elif name == "CONFIG_STATE":
            if config_size is None:
                raise ReferenceError_(f"config blob of section {sid}: size unknown")
            out.append(("config", sid, c.bytes_(config_size)))
            if c.uint(8) != MARKERS["EOS"]:
                raise ReferenceError_("config not followed by EOS")
            out.append(("marker", sid, "EOS"))
        break
    if c.uint(1) != T_FOOTER:
        raise ReferenceError_("missing footer")
    footer_id = c.uint(4)
    if footer_id != sid:
        raise ReferenceError_("footer id mismatch")
    out.append(("footer", sid))


def build_stream(records: Iterable[Record]) -> bytes:
    """Encode records (same shapes as parse_stream's) into stream bytes.

    ``("marker", sid, "SETUP")`` writes SETUP only; the EOS after it (and after
    a config blob) must be its own record, exactly as parse_stream returns it.
    """
    out = bytearray()
    for rec in records:
        tag = rec[0]
        if tag == "header":
            out += be(MAGIC_QEVM, 4) + be(int(rec[1]), 4)
        elif tag == "configuration":
            raw = str(rec[1]).encode()
            out += be(T_CONFIG, 1) + be(len(raw), 4) + raw
        elif tag == "command":
            payload = bytes(rec[2])
            out += be(T_COMMAND, 1) + be(int(rec[1]), 2) + be(len(payload), 2) + payload
        elif tag in ("start", "full"):
            _, sid, idstr, inst, ver = rec
            raw = str(idstr).encode()
            out += be(T_START if tag == "start" else T_FULL, 1) + be(int(sid), 4)
            out += be(len(raw), 1) + raw + be(int(inst), 4) + be(int(ver), 4)
        elif tag in ("part", "end"):
            out += be(T_PART if tag == "part" else T_END, 1) + be(int(rec[1]), 4)
        elif tag == "marker":
            out += be(MARKERS[str(rec[2])], 8)
        elif tag == "data":
            data = bytes(rec[2])
            out += be(MARKERS["DATA"], 8) + be(len(data), 8) + data
        elif tag == "config":
            blob = bytes(rec[2])
            out += blob
        elif tag == "footer":
            out += be(T_FOOTER, 1) + be(int(rec[1]), 4)
        elif tag == "eof":
            out += be(T_EOF, 1)
        else:
            raise ReferenceError_(f"unknown record {tag!r}")
    return bytes(out)


# --- return path ----------------------------------------------------------------


def parse_rp(data: bytes) -> list[tuple[int, bytes]]:
    """Return-path messages: be16 type, be16 length, payload."""
    c = Cursor(data)
    out = []
    while c.left():
        msg_type = c.uint(2)
        out.append((msg_type, c.bytes_(c.uint(2))))
    return out


# --- multifd ----------------------------------------------------------------------


def parse_init(data: bytes) -> dict[str, object]:
    """MultiFDInit_t: 64 bytes (reference 3.2)."""
    if len(data) != 64:
        raise ReferenceError_("init packet must be 64 bytes")
    c = Cursor(data)
    rec: dict[str, object] = {
        "magic": c.uint(4),
        "version": c.uint(4),
        "uuid": c.bytes_(16),
        "id": c.uint(1),
        "reserved": c.bytes_(39),
    }
    return rec


def build_init(uuid: bytes, channel_id: int) -> bytes:
    return be(MULTIFD_MAGIC, 4) + be(1, 4) + uuid + be(channel_id, 1) + bytes(39)


def parse_device_state_packet(data: bytes) -> dict[str, object]:
    """MultiFDPacketDeviceState_t (276 bytes) + payload (reference 3.3/3.4)."""
    c = Cursor(data)
    rec: dict[str, object] = {"magic": c.uint(4), "version": c.uint(4), "flags": c.uint(4)}
    idstr_field = c.bytes_(256)
    if idstr_field[255] != 0:
        raise ReferenceError_("unterminated idstr")
    rec["idstr"] = idstr_field.split(b"\0")[0].decode()
    rec["instance_id"] = c.uint(4)
    size = c.uint(4)
    rec["size"] = size
    payload = c.bytes_(size)
    if c.left():
        raise ReferenceError_("trailing bytes after the payload")
    p = Cursor(payload)
    rec["vfio_version"] = p.uint(4)
    rec["idx"] = p.uint(4)
    rec["vfio_flags"] = p.uint(4)
    rec["data"] = p.bytes_(p.left())
    return rec


def build_device_state_packet(
    idstr: str, instance_id: int, idx: int, is_config: bool, data: bytes
) -> bytes:
    payload = be(0, 4) + be(idx, 4) + be(1 if is_config else 0, 4) + data
    raw = idstr.encode()
    field = raw + bytes(256 - len(raw))
    return (
        be(MULTIFD_MAGIC, 4)
        + be(1, 4)
        + be(DEVICE_STATE_FLAG, 4)
        + field
        + be(instance_id, 4)
        + be(len(payload), 4)
        + payload
    )
