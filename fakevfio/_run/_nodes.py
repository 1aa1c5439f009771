"""The mount as the supervisor sees it: which inode is which VFIO node, and the device files.

The node files of a fakevfio mount (``dev/vfio/vfio``, ``dev/iommu``,
``dev/vfio/<group>``, ``dev/vfio/devices/<cdev>``, ``devices/NAME/migration/data``)
are told apart by inode; the map is rebuilt when an unknown inode shows up
(a device created at run time). Devices are driven through their files
(``migration/state``, ``reset``, ...), with the file's errno passed on, and
the supervisor counts each device's migration sessions (a data_fd of an ended
session is dead). Files read as text, and ``migration/state`` for writing, stay
open (one FUSE request per operation instead of four); every use checks the
file's inode, so a removed or re-created device is noticed as by an ``open``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import socket
from pathlib import Path

import attrs

from fakevfio._channel import connect_mount
from fakevfio._control import MAX_MESSAGE, get_request, parse_answer, set_request
from fakevfio._run._fileid import file_id
from fakevfio.errors import IoctlError
from vfio_uapi.fsm import MigFlags, State

STATE_FILE = ("migration", "state")
#: nodes read by MountNodes.prime, taken by the next MountNodes.open of that path
_primed: dict[Path, MountNodes] = {}


class NodeKind(enum.Enum):
    """What a file on the mount is to the VFIO uAPI."""

    CONTAINER = "container"  # /dev/vfio/vfio (legacy type1 container)
    IOMMU = "iommu"  # /dev/iommu (iommufd)
    GROUP = "group"  # /dev/vfio/<group>
    CDEV = "cdev"  # /dev/vfio/devices/vfioN (or a device fd from a group)
    DATA = "data"  # a migration data_fd
    OTHER = "other"  # any other file on the mount


@attrs.frozen(kw_only=True)
class DeviceInfo:
    """A device of the mount, from its ``info`` file."""

    name: str
    cdev: str
    group: int
    flags: int
    regions: dict[str, int]
    config_size: int
    #: The device's PCI address (``pci_name()``: the name GROUP_GET_DEVICE_FD matches).
    pci_address: str = ""
    #: The whole ``info`` object (``bars``, ``irqs``, ``pci_address``, ``dma``, ...).
    info: dict[str, object] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.define(eq=False)
class MountNodes:
    """The node map and device files of the mount at ``path`` (st_dev ``dev``)."""

    path: Path
    dev: int
    nodes: dict[int, tuple[NodeKind, str | None]] = attrs.Factory(dict)
    devices: dict[str, DeviceInfo] = attrs.Factory(dict)
    #: device -> number of sessions ended through the supervisor
    generation: dict[str, int] = attrs.Factory(dict)
    #: kept-open device files: (device, path, open flags) -> (fd, inode)
    held: dict[tuple[str, tuple[str, ...], int], tuple[int, int]] = attrs.Factory(dict)
    #: the paths of the kept-open files, by the same key (no path building per use)
    _paths: dict[tuple[str, tuple[str, ...], int], bytes] = attrs.Factory(dict)
    #: use the mount's control channel for the state (False: the files only, as a
    #: mount without one; tests of the file path set it)
    use_channel: bool = True
    _channel: socket.socket | None = None
    _channel_tried: bool = False

    @classmethod
    def open(cls, mountpoint: str | Path) -> MountNodes:
        """The mount's nodes: the ones :meth:`prime` read for it, else read now."""
        path = Path(mountpoint)
        primed = _primed.pop(path, None)
        if primed is not None:
            return primed
        nodes = cls(path=path, dev=os.stat(path).st_dev)
        nodes.refresh()
        return nodes

    @classmethod
    def prime(cls, mountpoint: str | Path) -> MountNodes:
        """Read the mount's nodes now, for the next :meth:`open` of the same path.

        ``fakevfio run`` reads every ``info`` (a state digest each) once, before the
        fork: the child builds its sysfs view from it and the supervisor starts with it.
        """
        _primed.pop(Path(mountpoint), None)
        nodes = cls.open(mountpoint)
        _primed[nodes.path] = nodes
        return nodes

    def refresh(self) -> None:
        """(Re)build inode -> node kind from the mount's tree."""
        nodes: dict[int, tuple[NodeKind, str | None]] = {}

        def add(p: Path, kind: NodeKind, device: str | None) -> None:
            with contextlib.suppress(OSError):
                nodes[os.stat(p).st_ino] = (kind, device)

        add(self.path / "dev" / "vfio" / "vfio", NodeKind.CONTAINER, None)
        add(self.path / "dev" / "iommu", NodeKind.IOMMU, None)
        devices: dict[str, DeviceInfo] = {}
        with contextlib.suppress(OSError):
            for entry in sorted(os.listdir(self.path / "devices")):
                try:
                    info = json.loads((self.path / "devices" / entry / "info").read_bytes())
                except (OSError, ValueError):
                    continue
                flags = 0
                for flag in info.get("migration_flags", []):
                    flags |= MigFlags[flag]
                dev = DeviceInfo(
                    name=entry,
                    cdev=str(info.get("cdev", "")),
                    group=int(info["iommu_group"]),
                    flags=flags,
                    regions={str(k): int(v) for k, v in info["regions"].items()},
                    config_size=int(info["config_size"]),
                    pci_address=str(info.get("pci_address", "")),
                    info=info,
                )
                devices[entry] = dev
                add(self.path / "dev" / "vfio" / "devices" / dev.cdev, NodeKind.CDEV, entry)
                add(self.path / "dev" / "vfio" / str(dev.group), NodeKind.GROUP, entry)
                add(self.path / "devices" / entry / "migration" / "data", NodeKind.DATA, entry)
        self.nodes = nodes
        self.devices = devices

    def kind(self, ino: int) -> tuple[NodeKind, str | None]:
        """The node kind and device of the mount's inode ``ino``."""
        if ino not in self.nodes:
            self.refresh()
        return self.nodes.get(ino, (NodeKind.OTHER, None))

    def device(self, name: str | None) -> DeviceInfo:
        """The device ``name``; ENODEV once it was removed."""
        if name is None or name not in self.devices:
            self.refresh()
        if name is None or name not in self.devices:
            raise IoctlError(errno.ENODEV, "the device was removed")
        return self.devices[name]

    # -- device files ----------------------------------------------------------------------------
    def dev_path(self, name: str, *rel: str) -> Path:
        return self.path.joinpath("devices", name, *rel)

    def _held(self, name: str, rel: tuple[str, ...], flags: int) -> int:
        """A kept-open fd of the device file (Rule: one FUSE request per operation).

        The file's inode is checked on every use with ``statx`` of the path (the
        kernel's dentry and inode caches answer it: :mod:`._fileid`; the mount
        invalidates the entries when a device is created or removed): a removed
        device fails as an ``open`` would, and a device re-created under the same
        name gets a fresh fd.
        """
        key = (name, rel, flags)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = os.fsencode(self.dev_path(name, *rel))
        ino = file_id(path, cached=True).st_ino
        held = self.held.get(key)
        if held is not None:
            if held[1] == ino:
                return held[0]
            del self.held[key]
            os.close(held[0])
        fd = os.open(path, flags | os.O_CLOEXEC)
        self.held[key] = (fd, ino)
        return fd

    def _ask(self, request: bytes, what: str) -> str | None:
        """The channel's answer to ``request``; None: no channel, use the files.

        The connection is made at the first use; a mount without a channel (an older
        fakevfio, another network namespace, another uid), or one that hung up, is
        driven through its files from then on.
        """
        sock = self._channel
        if sock is None:
            if self._channel_tried or not self.use_channel:
                return None
            self._channel_tried = True
            sock = self._channel = connect_mount(self.path)
            if sock is None:
                return None
        try:
            sock.send(request)
            reply = sock.recv(MAX_MESSAGE)
        except OSError:
            reply = b""
        if not reply:
            self._drop_channel()
            return None
        err, text = parse_answer(reply)
        if err:
            raise IoctlError(err, f"{what}: {text}")
        return text

    def _drop_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.close()
        self._channel = None

    def close(self) -> None:
        """Close every kept-open device file and the channel."""
        self._drop_channel()
        for fd, _ in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()

    def read_text(self, name: str, *rel: str) -> str:
        """The text of a device file: one ``pread`` at 0 (a fresh snapshot) of a kept fd."""
        try:
            return os.pread(self._held(name, rel, os.O_RDONLY), 65536, 0).decode()
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EIO, f"read {'/'.join(rel)}") from None

    def write_text(self, name: str, rel: tuple[str, ...], text: str) -> None:
        """One write of ``text``; ``migration/state`` through a kept fd, the rest opened anew.

        A control file's write is one command whatever the handle, so the state file
        (written by every SET MIG_DEVICE_STATE) stays open; ``irqs``, ``dma`` and
        ``reset`` are opened per write as before (their handles carry replies).
        """
        if rel == STATE_FILE:
            done = self._ask(set_request(name, text.strip()), "write migration/state")
            if done is not None:
                return
        try:
            if rel == STATE_FILE:
                os.pwrite(self._held(name, rel, os.O_WRONLY), text.encode(), 0)
                return
            fd = os.open(self.dev_path(name, *rel), os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EIO, f"write {'/'.join(rel)}") from None

    def state(self, name: str) -> State:
        """The device's state: from the channel, else its ``migration/state`` file."""
        text = self._ask(get_request(name), "read migration/state")
        if text is None:
            text = self.read_text(name, *STATE_FILE)
        return State[text.strip()]

    def end_session(self, name: str) -> None:
        self.generation[name] = self.generation.get(name, 0) + 1


def match_device_name(buf: str, dev: DeviceInfo) -> None:
    """GROUP_GET_DEVICE_FD's name check, as vfio-pci's ``vfio_pci_core_match`` does it.

    The name is the device's PCI address (``pci_name()``, what QEMU and the migrator
    pass), or, a fakevfio extension kept for existing users, the device's name. After
    the name only spaces and one ``vf_token=UUID`` may follow; a fake device is neither
    a PF nor a VF, so a token is EINVAL ("VF token incorrectly provided"), any other
    option EINVAL, and other characters right after the name no match (ENODEV).
    """
    for candidate in (dev.pci_address, dev.name):
        if not candidate or not buf.startswith(candidate):
            continue
        rest = buf[len(candidate) :]
        if not rest:
            return
        if rest[0] != " ":
            continue  # non-whitespace after the name: no match
        if rest.strip(" "):
            raise IoctlError(
                errno.EINVAL,
                f"device options {rest.strip()!r} after {candidate}: a fake device takes no "
                "vf_token (it is neither a PF nor a VF) and no other option",
            )
        return
    raise IoctlError(
        errno.ENODEV,
        f"no device {buf[:80]!r} in group {dev.group} (its device is "
        f"{dev.pci_address or dev.name}, also reachable by its name {dev.name})",
    )
