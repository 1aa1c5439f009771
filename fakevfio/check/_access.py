"""Device access for ``fakevfio check``: one small interface, two implementations.

Rules:

* :class:`FileDevice` drives a fakevfio device directory through its files only
  (``migration/state``, ``migration/data``, ``reset``, ...), exactly as any
  program may (docs INTERFACES section 1).
* :class:`KernelDevice` drives a kernel VFIO cdev (``/dev/vfio/devices/vfioN``)
  through the real ioctls and the data_fd only (``include/uapi/linux/vfio.h``),
  so under ``fakevfio run`` the same checks exercise the supervisor's ioctl path.
* Every failing operation raises :class:`AccessError` (an ``OSError``) that keeps
  the errno and names the operation and the device, so checks compare errnos.
* ``set_state`` reports whether the request handed out a *new* data stream:
  on a kernel device the SET ioctl returned a data_fd >= 0; on a file device the
  ``info`` file's session id changed to a new live session.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Protocol

from vfio_uapi import abi
from vfio_uapi.fsm import MigFlags, State, parse_flags, parse_state

#: A read of the log file or the info file never takes more than this.
_META_LIMIT = 1 << 20


class AccessError(OSError):
    """An operation on a device failed; ``errno`` is the device's answer."""

    def __init__(self, device: str, op: str, err: int, detail: str = "") -> None:
        name = errno.errorcode.get(err, str(err))
        text = f"{op} on {device} failed with {name}" + (f": {detail}" if detail else "")
        super().__init__(err, text)
        self.device = device
        self.op = op


class Device(Protocol):
    """What a check needs from a device."""

    name: str
    flags: MigFlags
    #: Whether the device keeps a ``migration/log`` and a ``state_digest``.
    has_files: bool

    def state(self) -> State: ...
    def set_state(self, target: State | int) -> bool: ...
    def open_data(self, write: bool) -> int: ...
    def precopy_info(self, fd: int) -> tuple[int, int]: ...
    def data_size(self) -> int: ...
    def reset(self) -> None: ...
    def log(self) -> list[str]: ...
    def digest(self) -> str | None: ...
    def set_faults(self, rules: str) -> None: ...
    def close(self) -> None: ...


def _oserror(device: str, op: str, exc: OSError) -> AccessError:
    return AccessError(device, op, exc.errno or errno.EIO, exc.strerror or "")


class FileDevice:
    """A fakevfio device directory (``MOUNT/devices/NAME``)."""

    has_files = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.flags = parse_flags(self._read("migration/flags"))

    def _read(self, rel: str) -> str:
        try:
            fd = os.open(self.path / rel, os.O_RDONLY)
        except OSError as exc:
            raise _oserror(self.name, f"open {rel}", exc) from None
        try:
            chunks = []
            total = 0
            while total < _META_LIMIT:
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
                total += len(data)
            return b"".join(chunks).decode("utf-8", "replace")
        except OSError as exc:
            raise _oserror(self.name, f"read {rel}", exc) from None
        finally:
            os.close(fd)

    def _write(self, rel: str, text: str) -> None:
        try:
            fd = os.open(self.path / rel, os.O_WRONLY)
        except OSError as exc:
            raise _oserror(self.name, f"open {rel}", exc) from None
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            raise _oserror(self.name, f"write {text.strip()!r} to {rel}", exc) from None
        finally:
            os.close(fd)

    def _info(self) -> dict[str, object]:
        value = json.loads(self._read("info"))
        if not isinstance(value, dict):
            raise AccessError(self.name, "read info", errno.EPROTO, "not a JSON object")
        return value

    def state(self) -> State:
        return parse_state(self._read("migration/state").strip())

    def set_state(self, target: State | int) -> bool:
        before = self._info().get("session")
        self._write("migration/state", f"{int(target)}\n")
        after = self._info().get("session")
        return after is not None and after != before

    def open_data(self, write: bool) -> int:
        try:
            return os.open(self.path / "migration/data", os.O_WRONLY if write else os.O_RDONLY)
        except OSError as exc:
            raise _oserror(self.name, "open migration/data", exc) from None

    def precopy_info(self, fd: int) -> tuple[int, int]:
        del fd  # the file answers for the live session
        fields = dict(line.split() for line in self._read("migration/precopy_info").splitlines())
        return int(fields["initial_bytes"]), int(fields["dirty_bytes"])

    def data_size(self) -> int:
        return int(self._read("migration/data_size").strip())

    def reset(self) -> None:
        self._write("reset", "1\n")

    def log(self) -> list[str]:
        return self._read("migration/log").splitlines()

    def digest(self) -> str | None:
        value = self._info().get("state_digest")
        return value if isinstance(value, str) else None

    def set_faults(self, rules: str) -> None:
        self._write("faults", rules)

    def close(self) -> None:
        pass


def _ioctl(fd: int, request: int, buf: bytearray) -> None:
    fcntl.ioctl(fd, request, buf, True)


class KernelDevice:
    """A kernel VFIO cdev opened through iommufd (bind, IOAS, attach)."""

    has_files = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = str(path)
        self._fds: list[int] = []
        self._data_fd: int | None = None
        try:
            self._fd = self._open(self.name)
            iommufd = self._open("/dev/iommu")
            bind = bytearray(abi.BIND_IOMMUFD.pack(abi.BIND_IOMMUFD_MINSZ, 0, iommufd, 0, 0))
            self._call("VFIO_DEVICE_BIND_IOMMUFD", self._fd, abi.VFIO_DEVICE_BIND_IOMMUFD, bind)
            alloc = bytearray(abi.IOMMU_IOAS_ALLOC_STRUCT.pack(12, 0, 0))
            self._call("IOMMU_IOAS_ALLOC", iommufd, abi.IOMMU_IOAS_ALLOC, alloc)
            ioas = abi.IOMMU_IOAS_ALLOC_STRUCT.unpack(alloc)[2]
            attach = bytearray(abi.ATTACH_IOMMUFD_PT.pack(abi.ATTACH_IOMMUFD_PT_MINSZ, 0, ioas, 0))
            self._call(
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                self._fd,
                abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                attach[: abi.ATTACH_IOMMUFD_PT_MINSZ],
            )
            out = self._feature(
                "GET MIGRATION",
                abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_MIGRATION,
                bytes(abi.FEATURE_MIGRATION.size),
            )
        except BaseException:
            self.close()
            raise
        self.flags = MigFlags(abi.FEATURE_MIGRATION.unpack(out)[0] & 7)

    def _open(self, where: str) -> int:
        try:
            fd = os.open(where, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(self.name, f"open {where}", exc) from None
        self._fds.append(fd)
        return fd

    def _call(self, op: str, fd: int, request: int, buf: bytearray) -> None:
        try:
            _ioctl(fd, request, buf)
        except OSError as exc:
            raise _oserror(self.name, op, exc) from None

    def _feature(self, op: str, flags: int, payload: bytes) -> bytearray:
        buf = bytearray(abi.DEVICE_FEATURE.pack(8 + len(payload), flags) + payload)
        self._call(op, self._fd, abi.VFIO_DEVICE_FEATURE, buf)
        return buf[8:]

    def state(self) -> State:
        out = self._feature(
            "GET MIG_DEVICE_STATE",
            abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            abi.FEATURE_MIG_STATE.pack(0, -1),
        )
        return State(abi.FEATURE_MIG_STATE.unpack(out)[0])

    def set_state(self, target: State | int) -> bool:
        out = self._feature(
            f"SET MIG_DEVICE_STATE {int(target)}",
            abi.VFIO_DEVICE_FEATURE_SET | abi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            abi.FEATURE_MIG_STATE.pack(int(target), -1),
        )
        data_fd = abi.FEATURE_MIG_STATE.unpack(out)[1]
        if data_fd < 0:
            return False
        if self._data_fd is not None:
            os.close(self._data_fd)
        self._data_fd = data_fd
        return True

    def open_data(self, write: bool) -> int:
        del write  # the kernel fixed the direction when it made the data_fd
        if self._data_fd is None:
            raise AccessError(self.name, "open data_fd", errno.ENODEV, "no data_fd handed out")
        return os.dup(self._data_fd)

    def precopy_info(self, fd: int) -> tuple[int, int]:
        buf = bytearray(abi.PRECOPY_INFO.pack(abi.PRECOPY_INFO.size, 0, 0, 0))
        self._call("VFIO_MIG_GET_PRECOPY_INFO", fd, abi.VFIO_MIG_GET_PRECOPY_INFO, buf)
        _argsz, _flags, initial, dirty = abi.PRECOPY_INFO.unpack(buf)
        return int(initial), int(dirty)

    def data_size(self) -> int:
        out = self._feature(
            "GET MIG_DATA_SIZE",
            abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            bytes(abi.FEATURE_MIG_DATA_SIZE.size),
        )
        return int(abi.FEATURE_MIG_DATA_SIZE.unpack(out)[0])

    def reset(self) -> None:
        try:
            fcntl.ioctl(self._fd, abi.VFIO_DEVICE_RESET, 0)
        except OSError as exc:
            raise _oserror(self.name, "VFIO_DEVICE_RESET", exc) from None

    def log(self) -> list[str]:
        return []

    def digest(self) -> str | None:
        return None

    def set_faults(self, rules: str) -> None:
        raise AccessError(self.name, "set faults", errno.ENOTSUP, "a kernel device has none")

    def close(self) -> None:
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
        while self._fds:
            os.close(self._fds.pop())


def open_device(spec: str) -> Device:
    """A fakevfio device directory or a ``/dev/vfio/devices/vfioN`` cdev.

    Raises:
        AccessError: the path is neither (ENOENT/EINVAL), or opening it failed.
    """
    path = Path(spec)
    if (path / "migration" / "state").exists():
        return FileDevice(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise _oserror(spec, "stat", exc) from None
    # Under `fakevfio run` the cdev is a node the supervisor answers for (not S_IFCHR).
    if stat.S_ISCHR(mode) or (not stat.S_ISDIR(mode) and spec.startswith("/dev/vfio/")):
        return KernelDevice(path)
    raise AccessError(
        spec,
        "open",
        errno.EINVAL,
        "expected a fakevfio device directory (.../devices/NAME) or a VFIO cdev "
        "(/dev/vfio/devices/vfioN)",
    )
