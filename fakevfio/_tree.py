"""The fakevfio filesystem as a pure inode/path model (INTERFACES section 1).

Theory of operation
-------------------
:class:`Tree` knows the layout of the mount and what a read or write of each
file does; the pyfuse3 adapter (:mod:`fakevfio._fuse`) only resolves inodes,
calls these synchronous methods (in worker threads where they may block) and
maps errors to errno with :func:`errno_of`. Nothing here imports pyfuse3 or trio.

Rule 1: every file is a :class:`Node` (a kind, plus the device number and a
        name where the kind needs them). Devices are keyed by their *number*,
        never their name, so a device removed and re-created under the same name
        gets fresh inodes and stale handles of the old one fail with ENOENT or
        ENODEV instead of reaching the new device.
Rule 2: inode numbers are handed out on first lookup and never reused; the
        entries of a removed device are dropped, so the table stays bounded by
        the number of live devices. Directory entries that appear or vanish
        (create/remove) are queued in ``invalidations`` for the adapter to pass
        on to the kernel's dentry cache.
Rule 3: text files (``info``, ``migration/state``, ...) are generated fresh by a
        read at offset 0 and served positionally from that snapshot, so ``cat``
        works and a multi-read of a big ``info`` is consistent.
Rule 4: every write to a control file is one complete file content (``echo X >
        file`` is one ``write()``); writes larger than ``MAX_CONTROL_WRITE_BYTES``
        fail with EFBIG and change nothing. ``O_TRUNC`` and truncation to 0 of
        writable files succeed and do nothing, except that ``faults`` opened
        with ``O_TRUNC`` and closed without a write is an empty file: its rules
        are cleared (the kernel never passes a 0-byte write to FUSE).
Rule 5: ``migration/data`` binds to the live session at ``open()``; offsets are
        ignored (the session holds the one stream position). The driver's errno
        (ENOMSG, ENODEV, ...) is returned as is.
Rule 6: node files for ``fakevfio run`` (``dev/vfio/<group>``,
        ``dev/vfio/devices/vfioN``) map positional I/O like the kernel's
        vfio-pci: region index = ``offset >> 40`` (``VFIO_PCI_OFFSET_SHIFT``);
        0..5 are BARs (driver region ``barN``), 7 is PCI config space, anything
        else EINVAL. ``dev/vfio/vfio`` and ``dev/iommu`` only take ioctls (handled
        by the ``run`` supervisor), so reads and writes there give EINVAL.
Rule 7: a device-side failure of a device's file (an errno from the device: a refused
        or failed arc, a stream the driver rejected, an injected fault) is recorded as
        the device's ``last_error`` in ``info`` (what was attempted, the errno, why, the
        state, how often in a row) and logged once at WARNING; an identical repeat only
        counts. ENOMSG from ``migration/data`` (the pre-copy temporary end) is the
        protocol, not a failure, and is not recorded.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Mapping

import attrs

from fakevfio._device import Device, Session
from fakevfio._faults import FaultRules
from fakevfio._options import DeviceSpec
from fakevfio._pci import COMMAND_MEMORY, bar_index, pci_space
from fakevfio._registry import Registry
from fakevfio.driver import BarKind
from fakevfio.errors import ConfigError, DeviceError, UnknownDevice
from vfio_uapi.fsm import flags_text, parse_state

logger = logging.getLogger(__name__)

ROOT_INODE = 1
#: Upper bound of one write to a control file (state, faults, create, ...).
MAX_CONTROL_WRITE_BYTES = 64 * 1024
#: ``VFIO_PCI_OFFSET_SHIFT``: node-file offsets carry the region index above this bit.
VFIO_PCI_OFFSET_SHIFT = 40
_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
VFIO_PCI_CONFIG_REGION_INDEX = 7
_BAR_INDEXES = range(6)
#: Bound on the ``message`` of a recorded error (Rule 7).
MAX_ERROR_MESSAGE_CHARS = 500


class Kind(enum.Enum):
    """What a node is; the value is only for debugging."""

    # Members are singletons compared by identity, so the identity hash is
    # consistent; Enum's own __hash__ is Python code, and every request tests
    # a kind against a few sets and mappings.
    __hash__ = object.__hash__

    ROOT = "root"
    DEVICES_DIR = "devices"
    DRIVERS_DIR = "drivers"
    DEV_DIR = "dev"
    DEV_VFIO_DIR = "dev/vfio"
    DEV_VFIO_DEVICES_DIR = "dev/vfio/devices"
    DEV_VFIO_CONTAINER = "dev/vfio/vfio"
    DEV_IOMMU = "dev/iommu"
    DRIVER_DIR = "drivers/<driver>"
    DRIVER_CREATE = "drivers/<driver>/create"
    DEVICE_DIR = "devices/<name>"
    INFO = "info"
    CONFIG = "config"
    RESET = "reset"
    FAULTS = "faults"
    IRQS = "irqs"
    DMA = "dma"
    REMOVE = "remove"
    REGIONS_DIR = "regions"
    REGION = "regions/<region>"
    MIGRATION_DIR = "migration"
    FLAGS = "migration/flags"
    STATE = "migration/state"
    DATA = "migration/data"
    PRECOPY_INFO = "migration/precopy_info"
    PRECOPY_INFO_V2 = "migration/precopy_info_v2"
    DATA_SIZE = "migration/data_size"
    LOG = "migration/log"
    GROUP_NODE = "dev/vfio/<group>"
    CDEV_NODE = "dev/vfio/devices/vfioN"


_DIRS = frozenset(
    {
        Kind.ROOT,
        Kind.DEVICES_DIR,
        Kind.DRIVERS_DIR,
        Kind.DEV_DIR,
        Kind.DEV_VFIO_DIR,
        Kind.DEV_VFIO_DEVICES_DIR,
        Kind.DRIVER_DIR,
        Kind.DEVICE_DIR,
        Kind.REGIONS_DIR,
        Kind.MIGRATION_DIR,
    }
)

#: Permission bits of each file kind ("r" -> 0o444, "w" -> 0o200, "rw" -> 0o644).
_ACCESS: Mapping[Kind, str] = {
    Kind.INFO: "r",
    Kind.CONFIG: "rw",
    Kind.RESET: "w",
    Kind.FAULTS: "rw",
    Kind.IRQS: "rw",
    Kind.DMA: "rw",
    Kind.REMOVE: "w",
    Kind.REGION: "rw",
    Kind.FLAGS: "r",
    Kind.STATE: "rw",
    Kind.DATA: "rw",
    Kind.PRECOPY_INFO: "r",
    Kind.PRECOPY_INFO_V2: "r",
    Kind.DATA_SIZE: "r",
    Kind.LOG: "r",
    Kind.DRIVER_CREATE: "w",
    Kind.DEV_VFIO_CONTAINER: "rw",
    Kind.DEV_IOMMU: "rw",
    Kind.GROUP_NODE: "rw",
    Kind.CDEV_NODE: "rw",
}
_MODES: Mapping[Kind, int] = {
    Kind.DATA: 0o600,
    Kind.DEV_VFIO_CONTAINER: 0o666,
    Kind.DEV_IOMMU: 0o666,
    Kind.GROUP_NODE: 0o600,
    Kind.CDEV_NODE: 0o600,
}
_PERMS = {"r": 0o444, "w": 0o200, "rw": 0o644}

#: Fixed children of fixed directories.
_STATIC_CHILDREN: Mapping[Kind, Mapping[str, Kind]] = {
    Kind.ROOT: {"dev": Kind.DEV_DIR, "devices": Kind.DEVICES_DIR, "drivers": Kind.DRIVERS_DIR},
    Kind.DEV_DIR: {"iommu": Kind.DEV_IOMMU, "vfio": Kind.DEV_VFIO_DIR},
    Kind.DRIVER_DIR: {"create": Kind.DRIVER_CREATE},
    Kind.DEVICE_DIR: {
        "config": Kind.CONFIG,
        "dma": Kind.DMA,
        "faults": Kind.FAULTS,
        "irqs": Kind.IRQS,
        "info": Kind.INFO,
        "migration": Kind.MIGRATION_DIR,
        "regions": Kind.REGIONS_DIR,
        "remove": Kind.REMOVE,
        "reset": Kind.RESET,
    },
    Kind.MIGRATION_DIR: {
        "data": Kind.DATA,
        "data_size": Kind.DATA_SIZE,
        "flags": Kind.FLAGS,
        "log": Kind.LOG,
        "precopy_info": Kind.PRECOPY_INFO,
        "precopy_info_v2": Kind.PRECOPY_INFO_V2,
        "state": Kind.STATE,
    },
}
#: Text files: generated content, positional reads.
_TEXT_KINDS = frozenset(
    {
        Kind.INFO,
        Kind.FAULTS,
        Kind.IRQS,
        Kind.DMA,
        Kind.FLAGS,
        Kind.STATE,
        Kind.PRECOPY_INFO,
        Kind.PRECOPY_INFO_V2,
        Kind.DATA_SIZE,
        Kind.LOG,
    }
)
#: Control files: each write is one complete command.
_CONTROL_KINDS = frozenset(
    {
        Kind.RESET,
        Kind.FAULTS,
        Kind.IRQS,
        Kind.DMA,
        Kind.REMOVE,
        Kind.STATE,
        Kind.DRIVER_CREATE,
    }
)


@attrs.frozen
class Node:
    """One file or directory: its kind, the device number and a name where needed."""

    kind: Kind
    device: int = -1
    name: str = ""


@attrs.frozen(kw_only=True)
class Attr:
    """What ``getattr`` reports for a node."""

    ino: int
    mode: int
    size: int
    nlink: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@attrs.define(eq=False)
class Handle:
    """One open file: the node, its device (pinned at open) and per-handle state."""

    node: Node
    device: Device | None
    readable: bool
    writable: bool
    session: Session | None = None
    snapshot: bytes = b""
    #: Opened with O_TRUNC and not written yet (``faults``: cleared on release).
    truncated: bool = False
    #: The reply of the last command written on this handle (``irqs``, ``dma``):
    #: reads return it instead of the file's text until the next write.
    reply: bytes | None = None


def errno_of(exc: BaseException) -> int | None:
    """The errno a domain error maps to at the filesystem boundary (None: not ours)."""
    if isinstance(exc, DeviceError):
        return exc.errno
    if isinstance(exc, UnknownDevice):
        return errno.ENOENT
    if isinstance(exc, ConfigError):
        return errno.EINVAL
    return None


def _fail(err: int, message: str) -> DeviceError:
    return DeviceError(err, message)


@attrs.frozen(kw_only=True)
class ErrorRecord:
    """A device's last failure through its files (Rule 7), shown as ``info``'s ``last_error``."""

    #: What was attempted: ``write migration/data``, ``write migration/state RUNNING``, ...
    operation: str
    errno: int
    message: str
    #: The device's state when it failed.
    state: str
    #: How many times in a row this same failure happened.
    count: int = 1
    #: The number of failures recorded for this device so far (tells a new one apart).
    seq: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "operation": self.operation,
            "errno": errno.errorcode.get(self.errno, str(self.errno)),
            "message": self.message,
            "state": self.state,
            "count": self.count,
            "seq": self.seq,
        }


def _operation(verb: str, kind: Kind, data: bytes | memoryview | None = None) -> str:
    """The attempted operation, as ``last_error`` names it (a state write with its target)."""
    what = f"{verb} {kind.value}"
    if data is not None and kind in (Kind.STATE, Kind.RESET, Kind.FAULTS, Kind.IRQS, Kind.DMA):
        text = bytes(data[:80]).decode("utf-8", "replace").strip().splitlines()
        if text:
            what += f" {text[0]!r}"
    return what


class Tree:
    """Inodes, lookups and file semantics of one mount over a :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._inodes: dict[Node, int] = {Node(Kind.ROOT): ROOT_INODE}
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(Kind.ROOT)}
        self._next_inode = ROOT_INODE + 1
        #: (parent inode, name) of directory entries that changed; the adapter drains it.
        self.invalidations: list[tuple[int, str]] = []
        #: device number -> its last failure (Rule 7)
        self._errors: dict[int, ErrorRecord] = {}

    # -- device errors (Rule 7) ---------------------------------------------------------
    def record_error(self, device: Device, operation: str, exc: BaseException) -> None:
        """Remember ``exc`` as ``device``'s last error and log it once at WARNING."""
        err = errno_of(exc)
        if err is None:
            return
        message = str(exc)[:MAX_ERROR_MESSAGE_CHARS]
        with self._lock:
            last = self._errors.get(device.number)
            same = last is not None and (last.operation, last.errno, last.message) == (
                operation,
                err,
                message,
            )
            record = ErrorRecord(
                operation=operation,
                errno=err,
                message=message,
                state=device.state.name,
                count=last.count + 1 if last is not None and same else 1,
                seq=last.seq + 1 if last is not None else 1,
            )
            self._errors[device.number] = record
        if not same:
            logger.warning(
                "device %s: %s failed: %s: %s (state %s; see devices/%s/info last_error)",
                device.name,
                operation,
                errno.errorcode.get(err, err),
                message.removeprefix(f"device {device.name}: "),
                record.state,
                device.name,
            )

    def last_error(self, device: Device) -> ErrorRecord | None:
        """The device's last recorded failure (Rule 7), if any."""
        with self._lock:
            return self._errors.get(device.number)

    # -- inode table ----------------------------------------------------------
    def inode(self, node: Node) -> int:
        """The node's inode number, allocated on first use (Rule 2)."""
        with self._lock:
            ino = self._inodes.get(node)
            if ino is None:
                ino = self._next_inode
                self._next_inode += 1
                self._inodes[node] = ino
                self._nodes[ino] = node
            return ino

    def node(self, ino: int) -> Node:
        """The node of a live inode.

        Raises:
            DeviceError: ENOENT for an unknown inode or one of a removed device.
        """
        with self._lock:
            node = self._nodes.get(ino)
        if node is None:
            raise _fail(errno.ENOENT, f"no inode {ino}")
        self._check_alive(node)
        return node

    def _entries_changed(self, device: Device) -> None:
        changed = [
            (Node(Kind.DEVICES_DIR), device.name),
            (Node(Kind.DEV_VFIO_DIR), str(device.iommu_group)),
            (Node(Kind.DEV_VFIO_DEVICES_DIR), device.cdev),
        ]
        entries = [(self.inode(parent), name) for parent, name in changed]
        with self._lock:
            self.invalidations.extend(entries)

    def take_invalidations(self) -> list[tuple[int, str]]:
        """Return and clear the queued (parent inode, name) entry changes."""
        with self._lock:
            out, self.invalidations = self.invalidations, []
        return out

    def _forget_device(self, number: int) -> None:
        with self._lock:
            self._errors.pop(number, None)
            for node in [n for n in self._inodes if n.device == number]:
                del self._nodes[self._inodes.pop(node)]

    def _device(self, number: int) -> Device:
        return self.registry.by_number(number)

    def _check_alive(self, node: Node) -> None:
        if node.device >= 0:
            device = self._device(node.device)
            if node.kind is Kind.REGION and node.name not in device.regions():
                raise _fail(errno.ENOENT, f"device {device.name} has no region {node.name}")
        elif node.kind in (Kind.DRIVER_DIR, Kind.DRIVER_CREATE) and (
            node.name not in self.registry.drivers
        ):
            raise _fail(errno.ENOENT, f"no driver {node.name}")

    # -- directories --------------------------------------------------------------
    def _children(self, node: Node) -> dict[str, Node]:
        kind = node.kind
        static = _STATIC_CHILDREN.get(kind)
        if static is not None:
            return {name: Node(k, node.device, "") for name, k in static.items()}
        if kind is Kind.DEVICES_DIR:
            return {d.name: Node(Kind.DEVICE_DIR, d.number) for d in self.registry.live_devices()}
        if kind is Kind.DRIVERS_DIR:
            return {name: Node(Kind.DRIVER_DIR, -1, name) for name in self.registry.drivers}
        if kind is Kind.REGIONS_DIR:
            regions = self._device(node.device).regions()
            return {r: Node(Kind.REGION, node.device, r) for r in regions}
        if kind is Kind.DEV_VFIO_DIR:
            out = {
                "devices": Node(Kind.DEV_VFIO_DEVICES_DIR),
                "vfio": Node(Kind.DEV_VFIO_CONTAINER),
            }
            for d in self.registry.live_devices():
                out[str(d.iommu_group)] = Node(Kind.GROUP_NODE, d.number)
            return out
        if kind is Kind.DEV_VFIO_DEVICES_DIR:
            return {d.cdev: Node(Kind.CDEV_NODE, d.number) for d in self.registry.live_devices()}
        raise _fail(errno.ENOTDIR, f"{kind.value} is not a directory")

    def lookup(self, parent_ino: int, name: str) -> Attr:
        """Resolve ``name`` in a directory.

        Raises:
            DeviceError: ENOENT (no such entry), ENOTDIR.
        """
        parent = self.node(parent_ino)
        if name == ".":
            return self.getattr(parent_ino)
        child = self._children(parent).get(name)
        if child is None:
            raise _fail(errno.ENOENT, f"no entry {name!r} in {parent.kind.value}")
        child = _fix_driver_node(parent, name, child)
        return self._attr(child)

    def listdir(self, ino: int) -> list[tuple[str, Attr]]:
        """A directory's entries (sorted by name), without ``.`` and ``..``."""
        parent = self.node(ino)
        entries = sorted(self._children(parent).items())
        return [(name, self._attr(_fix_driver_node(parent, name, n))) for name, n in entries]

    def getattr(self, ino: int) -> Attr:
        return self._attr(self.node(ino))

    def _attr(self, node: Node) -> Attr:
        ino = self.inode(node)
        if node.kind in _DIRS:
            return Attr(ino=ino, mode=stat.S_IFDIR | 0o755, size=0, nlink=2)
        size = 0
        if node.kind is Kind.CONFIG:
            size = len(self._device(node.device).config_bytes())
        elif node.kind is Kind.REGION:
            device = self._device(node.device)
            with device.lock:
                bar = None
                index = bar_index(node.name)
                if index is not None:
                    bar = pci_space(device).layout.bars.get(index)
                size = bar.size if bar is not None else device.regions().get(node.name, 0)
        perms = _MODES.get(node.kind, _PERMS[_ACCESS[node.kind]])
        return Attr(ino=ino, mode=stat.S_IFREG | perms, size=size, nlink=1)

    def truncate(self, ino: int, size: int) -> Attr:
        """``setattr(size=...)``: truncating a writable file to 0 succeeds and does nothing."""
        node = self.node(ino)
        if node.kind in _DIRS:
            raise _fail(errno.EISDIR, "cannot truncate a directory")
        if size != 0 or "w" not in _ACCESS[node.kind]:
            raise _fail(errno.EINVAL, f"{node.kind.value} has a fixed size")
        if node.kind is Kind.FAULTS:  # ``truncate -s 0 faults``: an empty rule file
            device = self._device(node.device)
            with device.lock:
                device.faults = FaultRules()
        return self._attr(node)

    # -- files --------------------------------------------------------------------------
    def open(self, ino: int, flags: int) -> Handle:
        """Open a file; ``migration/data`` binds to the live session here (Rule 5).

        Raises:
            DeviceError: EISDIR, EACCES (mode the file does not allow), ENODEV
                (data without a live session), ENOENT.
        """
        node = self.node(ino)
        if node.kind in _DIRS:
            raise _fail(errno.EISDIR, f"{node.kind.value} is a directory")
        acc = flags & os.O_ACCMODE
        readable = acc in (os.O_RDONLY, os.O_RDWR)
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        allowed = _ACCESS[node.kind]
        if (readable and "r" not in allowed) or (writable and "w" not in allowed):
            raise _fail(errno.EACCES, f"{node.kind.value} opens {allowed!r} only")
        device = self._device(node.device) if node.device >= 0 else None
        handle = Handle(node, device, readable, writable, truncated=bool(flags & os.O_TRUNC))
        if node.kind is Kind.DATA:
            assert device is not None
            try:
                handle.session = device.open_session(read=readable, write=writable)
            except DeviceError as exc:
                self.record_error(device, f"open {node.kind.value}", exc)
                raise
        return handle

    def read(
        self, handle: Handle, off: int, size: int, now: float = 0.0
    ) -> tuple[bytes | bytearray | memoryview, float]:
        """Read ``size`` bytes at ``off``; returns (data, seconds the caller should wait)."""
        try:
            return self._read(handle, off, size, now)
        except (DeviceError, ConfigError) as exc:
            pre_copy_end = handle.node.kind is Kind.DATA and errno_of(exc) == errno.ENOMSG
            if handle.device is not None and not pre_copy_end:
                self.record_error(handle.device, _operation("read", handle.node.kind), exc)
            raise

    def write(
        self, handle: Handle, off: int, data: bytes | memoryview, now: float = 0.0
    ) -> tuple[int, float]:
        """Write at ``off``; returns (bytes accepted, seconds the caller should wait)."""
        try:
            return self._write(handle, off, data, now)
        except (DeviceError, ConfigError) as exc:
            if handle.device is not None:
                operation = _operation("write", handle.node.kind, data)
                self.record_error(handle.device, operation, exc)
            raise

    def _read(
        self, handle: Handle, off: int, size: int, now: float = 0.0
    ) -> tuple[bytes | bytearray | memoryview, float]:
        node, device = handle.node, handle.device
        kind = node.kind
        if not handle.readable:
            raise _fail(errno.EBADF, "handle not open for reading")
        if handle.reply is not None:
            return handle.reply[off : off + size], 0.0
        if kind in _TEXT_KINDS:
            assert device is not None
            if off == 0 or not handle.snapshot:
                handle.snapshot = (
                    _info_text(device, self.last_error(device))
                    if kind is Kind.INFO
                    else _text(kind, device)
                )
            return handle.snapshot[off : off + size], 0.0
        if kind is Kind.DATA:
            assert device is not None
            assert handle.session is not None
            # pyfuse3 replies from any contiguous buffer: no copy here.
            return device.read(handle.session, size, now)
        if kind is Kind.CONFIG:
            assert device is not None
            return device.config_read(off, size), 0.0
        if kind is Kind.REGION:
            assert device is not None
            return device.region_read(node.name, off, size), 0.0
        if kind in (Kind.GROUP_NODE, Kind.CDEV_NODE):
            assert device is not None
            return _node_io(device, off, size, None), 0.0
        raise _fail(errno.EINVAL, f"{kind.value} cannot be read")

    def _write(
        self, handle: Handle, off: int, data: bytes | memoryview, now: float = 0.0
    ) -> tuple[int, float]:
        node, device = handle.node, handle.device
        kind = node.kind
        if not handle.writable:
            raise _fail(errno.EBADF, "handle not open for writing")
        view = memoryview(data)
        handle.truncated = False
        if kind is Kind.DATA:
            assert device is not None
            assert handle.session is not None
            return device.write(handle.session, view, now)
        if kind is Kind.CONFIG:
            assert device is not None
            return device.config_write(off, view), 0.0
        if kind is Kind.REGION:
            assert device is not None
            return device.region_write(node.name, off, view), 0.0
        if kind in (Kind.GROUP_NODE, Kind.CDEV_NODE):
            assert device is not None
            _node_io(device, off, len(view), view)
            return len(view), 0.0
        if kind in _CONTROL_KINDS:
            if len(view) > MAX_CONTROL_WRITE_BYTES:
                raise _fail(
                    errno.EFBIG,
                    f"{kind.value}: write of {len(view)} bytes "
                    f"(at most {MAX_CONTROL_WRITE_BYTES} per write)",
                )
            if kind in (Kind.IRQS, Kind.DMA):
                assert device is not None
                text = _decode(bytes(view), kind)
                with device.lock:
                    target = device.irqs if kind is Kind.IRQS else device.dma
                    handle.reply = None
                    handle.reply = target.control(text)
                return len(view), 0.0
            return len(view), self._control(node, device, bytes(view))
        raise _fail(errno.EINVAL, f"{kind.value} cannot be written")

    def flush(self, handle: Handle) -> None:
        """A close() of the handle (FUSE FLUSH: the caller's close() waits for it).

        A FUSE filesystem never sees an empty ``write()``, so "writing an empty
        file" to ``faults`` (``: > faults``) is an ``O_TRUNC`` open without a
        write; the rules are cleared here, before that close() returns. (Not at
        open: a bad write after an O_TRUNC open must keep the old rules. Not at
        release: FUSE sends RELEASE after close() has returned, so the caller's
        next request could still meet the old rules.)
        """
        if handle.truncated and handle.node.kind is Kind.FAULTS and handle.device is not None:
            handle.truncated = False
            with handle.device.lock:
                handle.device.faults = FaultRules()

    def release(self, handle: Handle) -> None:
        """The last close of a handle (asynchronous to the caller's close())."""
        self.flush(handle)

    # -- the state by name (the control channel, :mod:`fakevfio._control`) ---------------
    def state_text(self, name: str) -> str:
        """What a read of device ``name``'s ``migration/state`` gives, without the newline.

        UnknownDevice (ENOENT, as an open of the path) once the device is gone.
        """
        return _TEXT[Kind.STATE](self.registry.get(name)).strip()

    def write_state(self, name: str, text: str) -> float:
        """A write of ``text`` to device ``name``'s ``migration/state``, as the file does it.

        The same transition, errno and ``last_error`` (Rule 7) as the file's write;
        returns the seconds to wait before answering (an injected arc delay).
        """
        device = self.registry.get(name)
        try:
            return _set_state(device, text)
        except (DeviceError, ConfigError) as exc:
            self.record_error(device, _operation("write", Kind.STATE, text.encode()), exc)
            raise

    # -- file semantics ------------------------------------------------------------------
    def _control(self, node: Node, device: Device | None, data: bytes) -> float:
        kind = node.kind
        if kind is Kind.RESET:
            assert device is not None
            device.reset()
            return 0.0
        if kind is Kind.REMOVE:
            assert device is not None
            if self.registry.devices.get(device.name) is not device:
                raise _fail(errno.ENOENT, f"device {device.name} was already removed")
            self.registry.remove(device.name)
            self._forget_device(device.number)
            self._entries_changed(device)
            return 0.0
        text = _decode(data, kind)
        if kind is Kind.STATE:
            assert device is not None
            return _set_state(device, text)
        if kind is Kind.FAULTS:
            assert device is not None
            rules = FaultRules.parse(text)  # ConfigError -> EINVAL, old rules kept
            with device.lock:
                device.faults = rules
            return 0.0
        if kind is Kind.DRIVER_CREATE:
            _create(self, node.name, text)
            return 0.0
        raise AssertionError(kind)


def _set_state(device: Device, text: str) -> float:
    """One write of ``migration/state``: parse the target, run the arcs; the arc delay."""
    try:
        target = parse_state(text)
    except ValueError as exc:
        raise _fail(errno.EINVAL, f"migration/state: {exc}") from None
    return device.set_state(target).delay_s


def _fix_driver_node(parent: Node, name: str, child: Node) -> Node:
    # The driver's name travels down to its create file.
    if parent.kind is Kind.DRIVER_DIR:
        return attrs.evolve(child, name=parent.name)
    return child


def _create(tree: Tree, driver: str, text: str) -> None:
    spec = DeviceSpec.from_create_line(driver, text)
    if spec.name in tree.registry.devices:
        raise _fail(errno.EEXIST, f"a device named {spec.name} already exists")
    try:
        device = tree.registry.create(spec)
    except ConfigError:
        if spec.name in tree.registry.devices:  # lost a race with another create
            raise _fail(errno.EEXIST, f"a device named {spec.name} already exists") from None
        raise
    tree._entries_changed(device)


def _decode(data: bytes, kind: Kind) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(errno.EINVAL, f"{kind.value}: write is not UTF-8 text") from None


#: The generated text of each text file but ``info`` (which also needs the tree).
_TEXT: Mapping[Kind, Callable[[Device], str]] = {
    Kind.INFO: lambda device: json.dumps(device.info(), sort_keys=True) + "\n",
    Kind.FAULTS: lambda device: device.faults.text(),
    Kind.IRQS: lambda device: _locked(device, device.irqs.text),
    Kind.DMA: lambda device: _locked(device, device.dma.text),
    Kind.FLAGS: lambda device: flags_text(device.flags) + "\n",
    Kind.STATE: lambda device: device.state.name + "\n",
    Kind.PRECOPY_INFO: lambda device: _precopy_text(device),
    Kind.PRECOPY_INFO_V2: lambda device: _precopy_text(device, v2=True),
    Kind.DATA_SIZE: lambda device: f"{device.data_size()}\n",
    Kind.LOG: lambda device: device.log_text(),
}


def _text(kind: Kind, device: Device) -> bytes:
    return _TEXT[kind](device).encode()


def _info_text(device: Device, last_error: ErrorRecord | None) -> bytes:
    """``info``: the device's own fields and ``last_error`` (Rule 7; null: none yet)."""
    info = dict(device.info())
    info["last_error"] = None if last_error is None else last_error.to_json()
    return (json.dumps(info, sort_keys=True) + "\n").encode()


def _locked(device: Device, text: Callable[[], str]) -> str:
    with device.lock:
        return text()


def _node_io(device: Device, off: int, size: int, data: memoryview | None) -> bytes:
    """Positional I/O on a device node (Rule 6); ``data`` None means read.

    As ``vfio_pci_rw``: config accesses outside the space are EFAULT
    (``vfio_config_do_rw``); a BAR access at or past the BAR's end, or to a
    BAR the device does not implement, is EINVAL and one that runs past the
    end is cut short (``vfio_pci_bar_rw``); memory BARs answer EIO while the
    command register's memory enable is clear (``__vfio_pci_memory_enabled``).
    """
    index = off >> VFIO_PCI_OFFSET_SHIFT
    inner = off & _OFFSET_MASK
    if index == VFIO_PCI_CONFIG_REGION_INDEX:
        config_size = len(device.config_bytes())
        if inner + size > config_size:
            raise _fail(
                errno.EFAULT,
                f"device {device.name}: config access of {size} bytes at {inner} "
                f"is outside the {config_size}-byte config space",
            )
        if data is None:
            return device.config_read(inner, size)
        device.config_write(inner, data)
        return b""
    if index in _BAR_INDEXES:
        with device.lock:
            space = pci_space(device)
            bar = space.layout.bars.get(index)
            if bar is None:
                raise _fail(errno.EINVAL, f"device {device.name} does not implement BAR {index}")
            if inner >= bar.size:
                raise _fail(
                    errno.EINVAL,
                    f"device {device.name}: BAR {index} access at {inner} is past its end "
                    f"({bar.size} bytes)",
                )
            if bar.kind is not BarKind.IO and not space.command() & COMMAND_MEMORY:
                raise _fail(
                    errno.EIO,
                    f"device {device.name}: BAR {index} is memory and the command register's "
                    "memory enable (bit 1) is clear; set it first",
                )
            count = min(size, bar.size - inner)
            region = f"bar{index}"
            if data is None:
                return device.region_read(region, inner, count)
            device.region_write(region, inner, data[:count])
            return b""
    raise _fail(errno.EINVAL, f"device {device.name} has no region with index {index}")


def _precopy_text(device: Device, *, v2: bool = False) -> str:
    """``migration/precopy_info``; with ``v2`` the PRECOPY_INFOv2 query, with a flags line.

    ``flags`` is ``struct vfio_precopy_info``'s as a Linux 7.1 driver returns
    it to a caller that opted in: 0, or 1 (``VFIO_PRECOPY_INFO_REINIT``).
    """
    info = device.precopy_info(v2=v2)
    text = f"initial_bytes {info.initial_bytes}\ndirty_bytes {info.dirty_bytes}\n"
    if v2:
        text += f"flags {int(info.reinit)}\n"  # bit 0: VFIO_PRECOPY_INFO_REINIT
    return text


__all__ = [
    "MAX_CONTROL_WRITE_BYTES",
    "ROOT_INODE",
    "Attr",
    "ErrorRecord",
    "Handle",
    "Kind",
    "Node",
    "Tree",
    "errno_of",
]
