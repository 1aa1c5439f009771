"""QEMU's config blob (migrator._wire.pci_config) and its restore, kernel backend included.

The blob is checked against the independent model in ``wire_sender`` /
``qemu_reference`` (written from hw/vfio/pci.c, hw/pci/pci.c and hw/pci/msix.c;
``tests/test_qemu_wire.py`` checks it byte for byte against a real QEMU's), the
restore against what QEMU's ``vfio_pci_load_config`` makes reach the device: a
script under ``fakevfio run`` restores a blob through ``KernelBackend`` (real
VFIO ioctls and config-region pwrites, answered by the supervisor) and logs every
config write it makes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator._wire import pci_config as pc
from migrator.errors import FramingError, LocalProtocolError
from tests.conftest import MountFactory
from tests.migrator import qemu_reference as ref
from tests.migrator import wire_sender as ws
from tests.migrator.memory import MemoryDevice, config_space

MSI_AT, MSIX_AT, EXP_AT = 0x50, 0x60, 0x70


def space(size: int = 256, *, msi: bool = False, msix: int = 0, express: bool = False) -> bytes:
    """A config space with the chosen capabilities (a list in that order)."""
    cfg = bytearray(config_space(b""))
    cfg += bytes(size - 256)
    caps = [(MSI_AT, 0x05)] * msi + [(MSIX_AT, 0x11)] * bool(msix) + [(EXP_AT, 0x10)] * express
    if caps:
        cfg[6] |= 0x10  # PCI_STATUS_CAP_LIST
        cfg[0x34] = caps[0][0]
        for (at, cap_id), (nxt, _) in zip(caps, [*caps[1:], (0, 0)], strict=True):
            cfg[at], cfg[at + 1] = cap_id, nxt
    if msix:
        cfg[MSIX_AT + 2 : MSIX_AT + 4] = (msix - 1).to_bytes(2, "little")
    cfg[0x40:0x48] = b"marker!!"  # device-specific bytes: never restored
    return bytes(cfg)


CASES = {
    "plain": (space(), 256, 0),
    "msi": (space(msi=True), 256, 0),
    "msix-4": (space(msi=True, msix=4), 256, 4),
    "msix-9": (space(msix=9), 256, 9),  # the PBA takes two bytes
    "pcie-4096": (space(4096, msix=2, express=True), 4096, 2),
    "4096-not-express": (space(4096, msix=1), 256, 1),  # QEMU sends 256 bytes then
}


@pytest.mark.parametrize("name", CASES)
def test_blob_is_the_independent_models(name: str) -> None:
    config, size, vectors = CASES[name]
    blob = pc.encode_qemu_config(config)
    assert blob == ws.qemu_config_blob(config)
    layout = pc.ConfigLayout.of(config)
    assert (layout.config_size, layout.msix_vectors) == (size, vectors)
    assert layout.blob_size == ref.pci_config_blob_size(size, vectors) == len(blob)
    fields = ref.parse_pci_config_blob(blob, size, vectors)
    assert fields["version_id"] == 2
    assert fields["config"] == config[:size]
    assert fields["irq_state"] == [0, 0, 0, 0]
    # msix_init leaves every vector masked (vector control bit 0), nothing pending.
    assert fields["msix_table"] == (bytes(12) + b"\1\0\0\0") * vectors
    assert fields["msix_pba"] == bytes(-(-vectors // 8))
    parsed = pc.decode_qemu_config(blob, layout)
    assert (parsed.config, parsed.msix_table, parsed.msix_pba) == (
        fields["config"],
        fields["msix_table"],
        fields["msix_pba"],
    )


def test_blob_of_another_layout_is_refused() -> None:
    config, _, _ = CASES["msix-4"]
    blob = pc.encode_qemu_config(config)
    with pytest.raises(FramingError, match=r"config blob of 341 bytes, expected 276 .* 0 MSI-X"):
        pc.decode_qemu_config(blob, pc.ConfigLayout.of(space()))
    bad = b"\0\0\0\3" + blob[4:]
    with pytest.raises(FramingError, match="PCIDevice version_id 3"):
        pc.decode_qemu_config(bad, pc.ConfigLayout.of(config))
    with pytest.raises(LocalProtocolError, match="config space of 64 bytes"):
        pc.ConfigLayout.of(config[:64])


def test_a_looping_capability_list_ends() -> None:
    cfg = bytearray(space(msi=True))
    cfg[MSI_AT + 1] = MSI_AT  # points at itself
    assert pc.find_capability(bytes(cfg), 0x11) is None
    assert pc.find_capability(bytes(cfg), 0x05) == MSI_AT


def guest_programmed(config: bytes) -> bytes:
    """``config`` as a guest leaves it: COMMAND, BARs, MSI and MSI-X on, other bytes changed."""
    cfg = bytearray(config)
    cfg[4:6] = b"\x06\x00"
    cfg[0x10:0x28] = bytes(range(1, 25))
    cfg[0x3C] = 10  # INTERRUPT_LINE: QEMU's, not the device's
    cfg[MSI_AT + 2] |= 0x01  # MSI enable
    cfg[MSIX_AT + 3] |= 0xC0  # MSI-X enable + function mask
    cfg[0x40:0x48] = b"SOURCE!!"
    return bytes(cfg)


def test_restore_writes_what_vfio_pci_load_config_writes() -> None:
    dst = space(msi=True, msix=4)
    src = guest_programmed(dst)
    writes = pc.restore_writes(dst, src)
    msix_ctl = (int.from_bytes(dst[MSIX_AT + 2 : MSIX_AT + 4], "little") | 0xC000).to_bytes(
        2, "little"
    )
    assert writes == [
        (0x04, b"\x06\x00"),
        (0x10, bytes(range(1, 25))),
        (MSI_AT + 2, b"\x01\x00"),
        (MSIX_AT + 2, msix_ctl),
    ]
    # Enable bits already as saved: no write for them.
    assert pc.restore_writes(src, src) == writes[:2]


@pytest.mark.parametrize(("at", "what"), [(0, "vendor/device id"), (0x0B, "revision/class")])
def test_restore_refuses_another_device(at: int, what: str) -> None:
    dst = space()
    src = bytearray(dst)
    src[at] ^= 0xFF
    with pytest.raises(FramingError, match=f"another device: {what}"):
        pc.restore_writes(dst, bytes(src))


def test_backend_write_config_applies_only_the_restore() -> None:
    dst = MemoryDevice("d/vfio")
    dst.config = space(msi=True, msix=4)
    before = dst.config
    src = guest_programmed(before)
    dst.write_config(pc.encode_qemu_config(src))
    after = dst.config
    assert after[4:6] == src[4:6]
    assert after[0x10:0x28] == src[0x10:0x28]
    assert after[0x3C] == before[0x3C]
    assert after[0x40:0x48] == b"marker!!"
    changed = {i for i in range(256) if after[i] != before[i]}
    assert changed <= set(range(4, 6)) | set(range(0x10, 0x28)) | {MSI_AT + 2, MSIX_AT + 3}


# --- KernelBackend under fakevfio run --------------------------------------------------

KERNEL_RESTORE = """
import json, os, sys
import migrator.kernel
from migrator.kernel import KernelBackend, open_device

dev = open_device("/dev/vfio/devices/vfio0", None)
assert isinstance(dev, KernelBackend)
base = dev._config_region()[0]
writes = []
real = os.pwrite
def logged(fd, data, offset):
    writes.append([offset - base, bytes(data).hex()])
    return real(fd, data, offset)
migrator.kernel.os.pwrite = logged
before = dev.read_config()
blob = bytes.fromhex(sys.argv[1])
dev.write_config(blob)
print(json.dumps({"before": before.hex(), "writes": writes}))
dev.close()
"""


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[Path]:
    from tests.test_run import _seccomp_missing

    if reason := _seccomp_missing():
        pytest.skip(reason)
    with fakevfio_mount(["gpu0=ram:size=64K,flags=STOP_COPY+P2P"]) as m:
        yield m.path


@pytest.mark.fuse
def test_kernel_backend_restores_only_command_and_bars(mount: Path, tmp_path: Path) -> None:
    from tests.test_run import run_under

    config = (mount / "devices" / "gpu0" / "config").read_bytes()
    src = bytearray(config)
    src[4:6] = b"\x06\x00"  # memory space + bus master
    src[0x10:0x14] = (0xE0000000 | int.from_bytes(config[0x10:0x14], "little") & 0xF).to_bytes(
        4, "little"
    )
    src[0x3C] = 11
    src[0x40:0x48] = b"SOURCE!!"
    script = tmp_path / "restore.py"
    script.write_text(KERNEL_RESTORE)
    done = run_under(mount, sys.executable, str(script), ws.qemu_config_blob(bytes(src)).hex())
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert bytes.fromhex(out["before"]) == config
    # Exactly QEMU's device writes: PCI_COMMAND, then the six BARs; no MSI/MSI-X
    # write (both off in the blob and on the device).
    assert out["writes"] == [[4, "0600"], [0x10, bytes(src[0x10:0x28]).hex()]]
    after = (mount / "devices" / "gpu0" / "config").read_bytes()
    assert after[4:6] == b"\x06\x00"
    assert after[0x10:0x14] == bytes(src[0x10:0x14])
    assert after[0x3C] == config[0x3C]
    assert b"SOURCE!!" not in after
