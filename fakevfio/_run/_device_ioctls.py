"""The device fd ioctls (info, regions, IRQs, reset, DEVICE_FEATURE) and the data_fd's one.

A bound cdev (or a device fd from a group) answers VFIO_DEVICE_GET_INFO,
GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS, RESET and DEVICE_FEATURE with the
kernel's argsz checks and errno order (``vfio_ioctl_device_feature`` and
``vfio_check_feature``); MIG_DEVICE_STATE drives ``migration/state`` and opens
the session's data_fd on the mount (installed in the caller with ADDFD). A
data_fd answers only VFIO_MIG_GET_PRECOPY_INFO; its reads and writes never
reach the supervisor. The interrupt ioctls are in :mod:`._irq_ioctls`, the
DMA logging features in :mod:`._dma_ioctls`.

PRECOPY_INFOv2 (Linux 7.1, ``vfio_ioctl_device_feature_migration_precopy_info_v2``
and ``vfio_check_precopy_ioctl``): feature 12 is SET-only with no payload
(GET: EINVAL; PROBE: 0), and EINVAL on a device without PRE_COPY. The opt-in
belongs to the device and lasts until its last device fd is closed (the
kernel clears it in ``vfio_df_device_last_close``). After it, PRECOPY_INFO's
flags are output (0 or REINIT, from the device's ``migration/precopy_info_v2``
query); without it they are the caller's, echoed, as every kernel does for
compatibility.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from fakevfio._run import _dma_ioctls, _irq_ioctls
from fakevfio._run._caller import OpenFile
from fakevfio._run._nodes import DeviceInfo, NodeKind
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi
from vfio_uapi.errors import IllegalTransition
from vfio_uapi.fsm import NEW_SESSION_ARCS, PRECOPY_STATES, State, arcs_session_change, path

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio

_U32 = struct.Struct("<I")
_Handler = Callable[["Vfio", "Call", DeviceInfo], int]
#: The device fds open when their device opted in to PRECOPY_INFOv2 (gone with the fds).
_PRECOPY_V2: weakref.WeakSet[OpenFile] = weakref.WeakSet()
#: The device's v2 pre-copy query file (``initial_bytes``, ``dirty_bytes``, ``flags``).
PRECOPY_V2_FILE = "precopy_info_v2"


def device_ioctl(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    """A device fd ioctl other than BIND/ATTACH/DETACH (the fd is bound)."""
    handler = _DEVICE_IOCTLS.get(call.request)
    if handler is None:
        raise IoctlError(errno.ENOTTY)
    return handler(vfio, call, dev)


def _get_info(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    """``vfio_pci_ioctl_get_info``: argsz >= 16, at most ``sizeof(info)`` bytes written back."""
    argsz = _U32.unpack(call.mem.read(call.arg, uapi.DEVICE_INFO_MINSZ)[:4])[0]
    if argsz < uapi.DEVICE_INFO_MINSZ:
        raise IoctlError(errno.EINVAL, f"VFIO_DEVICE_GET_INFO: argsz {argsz} < 16")
    out = uapi.DEVICE_INFO.pack(
        argsz,
        uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET,
        uapi.VFIO_PCI_NUM_REGIONS,
        uapi.VFIO_PCI_NUM_IRQS,
        0,
        0,
    )
    call.mem.write(call.arg, out[: min(argsz, len(out))])
    return 0


def _bar_sizes(dev: DeviceInfo) -> dict[int, int]:
    """BAR index -> size from the device's ``info["bars"]`` (the PCI surface)."""
    bars = dev.info.get("bars")
    if not isinstance(bars, dict):
        return {}
    out: dict[int, int] = {}
    for index, bar in bars.items():
        if isinstance(bar, dict) and str(index).isdigit():
            out[int(index)] = int(bar.get("size", 0))
    return out


def _get_region_info(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    """``vfio_pci_ioctl_get_region_info``: BARs of their BAR size, config, no ROM, no VGA.

    BARs and config are READ|WRITE (never MMAP: the node's I/O goes through
    the mount); an unimplemented BAR and the absent ROM answer size 0 and no
    flags; the VGA index is EINVAL (no VGA device), as is any index past it.
    Only the 32-byte struct is written back; argsz is left as given.
    """
    argsz, _flags, index, _cap, _size, _off = uapi.REGION_INFO.unpack(
        call.mem.read(call.arg, uapi.REGION_INFO.size)
    )
    if argsz < uapi.REGION_INFO.size:
        raise IoctlError(errno.EINVAL, f"VFIO_DEVICE_GET_REGION_INFO: argsz {argsz} < 32")
    if index >= uapi.VFIO_PCI_NUM_REGIONS:
        raise IoctlError(errno.EINVAL, f"region index {index} >= 9 (no device-specific regions)")
    if index == uapi.VFIO_PCI_VGA_REGION_INDEX:
        raise IoctlError(errno.EINVAL, "region index 8: not a VGA device")
    size = 0
    if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
        size = dev.config_size
    elif index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
        size = _bar_sizes(dev).get(index, 0)
    rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
    call.mem.write(
        call.arg,
        uapi.REGION_INFO.pack(argsz, rw if size else 0, index, 0, size, uapi.region_offset(index)),
    )
    return 0


def _reset(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    vfio.nodes.write_text(dev.name, ("reset",), "1\n")
    vfio.nodes.end_session(dev.name)
    return 0


def _read_feature(call: Call) -> bytes:
    """The feature header and, when it is readable too, the 8 bytes after it.

    One ``process_vm_readv`` instead of two for the 16-byte features (GET and SET
    MIG_DEVICE_STATE); when the second half is unmapped, only the header is read,
    so its EFAULT (or the payload's, later) comes where the kernel's does.
    """
    try:
        return call.mem.read(call.arg, 16)
    except IoctlError:
        return call.mem.read(call.arg, 8)


def _feature(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    head = _read_feature(call)
    argsz, flags = uapi.DEVICE_FEATURE.unpack_from(head)
    if argsz < uapi.DEVICE_FEATURE.size:
        raise IoctlError(errno.EINVAL, "argsz < 8")
    if flags & ~uapi.VFIO_DEVICE_FEATURE_ALL_FLAGS:
        raise IoctlError(errno.EINVAL, "unknown flag bits")
    get, set_ = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET
    probe = flags & uapi.VFIO_DEVICE_FEATURE_PROBE
    if flags & get and flags & set_ and not probe:
        raise IoctlError(errno.EINVAL, "GET and SET without PROBE")
    index = flags & uapi.VFIO_DEVICE_FEATURE_MASK
    if index in _dma_ioctls.LOGGING_FEATURES:
        return _dma_ioctls.logging_feature(vfio, call, dev, index, flags, argsz)
    if index == uapi.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2:
        return _precopy_info_v2(vfio, call, dev, flags)
    ops = _FEATURE_OPS.get(index)
    if ops is None:
        # no logging ops on emulated devices; unknown features: vfio-pci says ENOTTY
        raise IoctlError(errno.ENOTTY, f"feature {index} not supported")
    # vfio_check_feature()
    if flags & (get | set_) & ~ops:
        raise IoctlError(errno.EINVAL, "GET/SET not supported by this feature")
    if probe:
        return 0
    if not flags & (get | set_):
        raise IoctlError(errno.EINVAL, "neither GET nor SET")
    if argsz - 8 < 8:
        raise IoctlError(errno.EINVAL, "payload smaller than the feature's minimum")
    payload = call.arg + 8
    if index == uapi.VFIO_DEVICE_FEATURE_MIGRATION:
        call.mem.write(payload, uapi.FEATURE_MIGRATION.pack(dev.flags))
        return 0
    if index == uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
        size = int(vfio.nodes.read_text(dev.name, "migration", "data_size"))
        call.mem.write(payload, uapi.FEATURE_MIG_DATA_SIZE.pack(size))
        return 0
    raw = head[8:] if len(head) == 16 else call.mem.read(payload, uapi.FEATURE_MIG_STATE.size)
    if not flags & set_:
        state = vfio.nodes.state(dev.name)
        call.mem.write(payload, uapi.FEATURE_MIG_STATE.pack(int(state), -1))
        return 0
    return _set_state(vfio, call, dev, raw)


def _precopy_info_v2(vfio: Vfio, call: Call, dev: DeviceInfo, flags: int) -> int:
    """Feature 12: PRE_COPY check, then ``vfio_check_feature(SET, minsz 0)``, then opt in."""
    if not dev.flags & uapi.VFIO_MIGRATION_PRE_COPY:
        raise IoctlError(errno.EINVAL, "PRECOPY_INFOv2 on a device without PRE_COPY")
    if flags & uapi.VFIO_DEVICE_FEATURE_GET:
        raise IoctlError(errno.EINVAL, "PRECOPY_INFOv2 is SET only")
    if flags & uapi.VFIO_DEVICE_FEATURE_PROBE:
        return 0
    if not flags & uapi.VFIO_DEVICE_FEATURE_SET:
        raise IoctlError(errno.EINVAL, "neither GET nor SET")
    # The flag is the device's: every device fd of it open now carries it.
    for f in vfio.files.files:
        if f.kind is NodeKind.CDEV and f.bound and f.device == dev.name:
            _PRECOPY_V2.add(f)
    return 0


def precopy_v2(vfio: Vfio, device: str) -> bool:
    """Whether a device fd of ``device`` still open opted in to PRECOPY_INFOv2."""
    return any(f.device == device for f in vfio.files.files if f in _PRECOPY_V2)


#: The targets a SET can open a session (a data_fd) on: those of the new-session arcs.
_OPENING_TARGETS = frozenset(int(arc[1]) for arc in NEW_SESSION_ARCS)


def _live_data_fd(vfio: Vfio, device: str) -> bool:
    """Whether the supervisor holds a data_fd of ``device``'s live session."""
    live = vfio.nodes.generation.get(device, 0)
    return any(
        f.kind is NodeKind.DATA and f.device == device and f.generation == live
        for f in vfio.files.files
    )


def _set_state(vfio: Vfio, call: Call, dev: DeviceInfo, raw: bytes) -> int:
    """SET MIG_DEVICE_STATE: one write of ``migration/state``, then the session's data_fd.

    The state before the request only tells which arcs ran, and that matters
    only if they may open a session (the target is one a new-session arc ends
    in) or end one whose data_fd the supervisor holds; otherwise (RUNNING <->
    STOP with no transfer under way, QEMU's every pause and resume) it is not
    read: one FUSE request instead of two.
    """
    nodes = vfio.nodes
    payload = call.arg + 8
    target_no, _fd = uapi.FEATURE_MIG_STATE.unpack(raw)
    no_fd = uapi.FEATURE_MIG_STATE.pack(target_no, -1)
    # EFAULT now rather than after the state changed; what the kernel leaves there
    # (vfio_ioctl_device_feature_mig_device_state) unless a data_fd is returned
    call.mem.write(payload, no_fd)
    arcs: list[tuple[State, State]] | None = None
    if target_no in _OPENING_TARGETS or _live_data_fd(vfio, dev.name):
        before = nodes.state(dev.name)
        arcs = []
        if target_no < uapi.VFIO_DEVICE_STATE_NR:
            with contextlib.suppress(IllegalTransition):
                arcs = path(before, State(target_no), dev.flags)
    try:
        nodes.write_text(dev.name, ("migration", "state"), f"{target_no}\n")
    except IoctlError:
        if arcs:
            with contextlib.suppress(IoctlError):
                reached = nodes.state(dev.name)
                done = []
                for arc in arcs:
                    if arc[0] == reached:
                        break
                    done.append(arc)
                if arcs_session_change(done).ends:
                    nodes.end_session(dev.name)
        raise
    change = arcs_session_change(arcs or ())
    if change.ends:
        nodes.end_session(dev.name)
    if not change.opens:
        return 0
    mode = os.O_WRONLY if change.writable else os.O_RDONLY
    try:
        fd = os.open(nodes.dev_path(dev.name, "migration", "data"), mode | os.O_CLOEXEC)
    except OSError as exc:
        raise IoctlError(exc.errno or errno.EIO, "open migration/data") from None
    try:
        newfd = call.install_fd(fd, False)
    except IoctlError:
        os.close(fd)
        raise
    vfio.files.add(
        OpenFile(
            held=fd,
            ino=os.fstat(fd).st_ino,
            kind=NodeKind.DATA,
            device=dev.name,
            generation=nodes.generation.get(dev.name, 0),
        )
    )
    call.mem.write(payload, uapi.FEATURE_MIG_STATE.pack(target_no, newfd))
    return 0


def data_ioctl(vfio: Vfio, call: Call, ino: int, device: str | None) -> int:
    """An ioctl on a data_fd: only VFIO_MIG_GET_PRECOPY_INFO."""
    if call.request != uapi.VFIO_MIG_GET_PRECOPY_INFO:
        raise IoctlError(errno.ENOTTY)
    raw = call.mem.read(call.arg, uapi.PRECOPY_INFO.size)
    argsz, flags, _i, _d = uapi.PRECOPY_INFO.unpack(raw)
    if argsz < uapi.PRECOPY_INFO.size:
        raise IoctlError(errno.EINVAL, "argsz < 24")
    dev = vfio.nodes.device(device)
    entry = vfio.find(call, call.fd, ino)
    if entry is not None and entry.generation != vfio.nodes.generation.get(dev.name, 0):
        # EINVAL outside PRE_COPY* comes first, as for a live data_fd
        if vfio.nodes.state(dev.name) not in PRECOPY_STATES:
            raise IoctlError(errno.EINVAL, "not in PRE_COPY/PRE_COPY_P2P")
        raise IoctlError(errno.ENODEV, "the session of this data_fd has ended")
    # A live data_fd: the query files answer EINVAL outside PRE_COPY/PRE_COPY_P2P
    # themselves (INTERFACES), so the state is not read first: one FUSE request.
    opted_in = precopy_v2(vfio, dev.name)
    text = None
    if opted_in:
        try:
            text = vfio.nodes.read_text(dev.name, "migration", PRECOPY_V2_FILE)
        except IoctlError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # A mount without the v2 query: the device never re-initialises.
    if text is None:
        text = vfio.nodes.read_text(dev.name, "migration", "precopy_info")
    fields = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
    if opted_in:  # an output field from here on: 0 or REINIT, never the caller's bits
        flags = int(fields.get("flags", "0")) & uapi.VFIO_PRECOPY_INFO_REINIT
    out = uapi.PRECOPY_INFO.pack(
        argsz, flags, int(fields["initial_bytes"]), int(fields["dirty_bytes"])
    )
    call.mem.write(call.arg, out)
    return 0


#: vfio_check_feature()'s allowed ops of the migration features
_FEATURE_OPS = {
    uapi.VFIO_DEVICE_FEATURE_MIGRATION: uapi.VFIO_DEVICE_FEATURE_GET,
    uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: (
        uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_SET
    ),
    uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: uapi.VFIO_DEVICE_FEATURE_GET,
}
_DEVICE_IOCTLS: dict[int, _Handler] = {
    uapi.VFIO_DEVICE_GET_INFO: _get_info,
    uapi.VFIO_DEVICE_GET_REGION_INFO: _get_region_info,
    uapi.VFIO_DEVICE_GET_IRQ_INFO: _irq_ioctls.get_irq_info,
    uapi.VFIO_DEVICE_SET_IRQS: _irq_ioctls.set_irqs,
    uapi.VFIO_DEVICE_RESET: _reset,
    uapi.VFIO_DEVICE_FEATURE: _feature,
}
