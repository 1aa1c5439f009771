"""When the destination device's config is loaded relative to its data (fakevfio/_pci.py Rule 6).

The fake device places every config write it receives while RESUMING against
its loading stream (bytes written so far, whether END was in); a write before
END is one ``CONFIG-EARLY`` line in ``migration/log``. QEMU loads config after
the data (the SECTION_FULL follows the SECTION_END; over multifd the config
packet is the last idx and ``vfio_load_bufs_thread`` loads it after every data
buffer), so a destination that does otherwise shows here and in every test
comparing a destination's log with ``DEST_ARCS``.
"""

from __future__ import annotations

from fakevfio._device import Device
from fakevfio._pci import COMMAND, pci_space
from fakevfio._ram import RamDriver
from fakevfio.testing import LocalDevice
from vfio_uapi.fsm import State


def _devices() -> tuple[LocalDevice[RamDriver], LocalDevice[RamDriver], Device]:
    src = LocalDevice(RamDriver("src", {"size": "64K", "seed": "3"}))
    dst_core = Device("dst", "ram", RamDriver("dst", {"size": "64K"}), 1)
    return src, LocalDevice(dst_core.driver, _device=dst_core), dst_core  # type: ignore[arg-type]


def test_config_written_mid_stream_is_logged_with_its_position() -> None:
    src, dst, core = _devices()
    stream = src.save()
    half = len(stream) // 2
    dst.set_state(State.RESUMING)
    dst.write(stream[:half])
    core.config_write(COMMAND, memoryview(b"\x06\x00"))
    assert dst.log()[-1] == f"CONFIG-EARLY 0x4 2 at {half}"
    dst.write(stream[half:])
    before = len(dst.log())
    core.config_write(COMMAND, memoryview(b"\x06\x00"))
    assert len(dst.log()) == before  # after END: nothing logged
    info = pci_space(core).resume_writes_info()
    assert info == {"after_end": 1, "before_end": 1, "unknown": 0, "positions": [half, len(stream)]}
    dst.set_state(State.RUNNING)
    assert dst.digest() == src.digest()


def test_config_writes_outside_resuming_are_not_placed() -> None:
    _, dst, core = _devices()
    core.config_write(COMMAND, memoryview(b"\x02\x00"))  # RUNNING: a guest's write
    dst.set_state(State.STOP)
    core.config_write(COMMAND, memoryview(b"\x02\x00"))
    assert "CONFIG" not in " ".join(dst.log())
    assert not pci_space(core).resume_writes
