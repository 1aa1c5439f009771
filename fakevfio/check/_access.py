"""Device access for ``fakevfio check``: one small interface, two implementations.

Rules:

* :class:`FileDevice` drives a fakevfio device directory through its files only
  (``migration/state``, ``migration/data``, ``reset``, ...), exactly as any
  program may (docs INTERFACES section 1).
* :class:`KernelDevice` drives a kernel VFIO device through the real ioctls and
  the data_fd only (``include/uapi/linux/vfio.h``), so under ``fakevfio run`` the
  same checks exercise the supervisor's ioctl path. It opens either an iommufd
  cdev (``/dev/vfio/devices/vfioN``: BIND_IOMMUFD, IOAS_ALLOC, ATTACH) or a PCI
  address through the legacy group path (sysfs ``iommu_group`` ->
  ``/dev/vfio/GROUP``, a TYPE1v2 (else TYPE1) container on ``/dev/vfio/vfio``,
  ``VFIO_GROUP_GET_DEVICE_FD`` by the address), the device forms ``migrator``
  accepts.
* DMA for the logging checks goes through the IOMMU the device was opened with
  (``IOMMU_IOAS_MAP`` or type1 ``VFIO_IOMMU_MAP_DMA``) or, on a device
  directory, through its ``dma`` file's ``map``/``log`` commands.
* Every failing operation raises :class:`AccessError` (an ``OSError``) that keeps
  the errno and names the operation and the device, so checks compare errnos.
* ``set_state`` reports whether the request handed out a *new* data stream:
  on a kernel device the SET ioctl returned a data_fd >= 0; on a file device the
  ``info`` file's session id changed to a new live session.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import stat
import struct
from pathlib import Path
from typing import Protocol

from vfio_uapi import abi
from vfio_uapi.fsm import MigFlags, State, parse_flags, parse_state

#: A read of the log file or the info file never takes more than this.
_META_LIMIT = 1 << 20
#: Metadata files are read in chunks of this size; one shorter than it and than
#: _SMALL_FILE is the whole file (fakevfio serves each read from the file's start).
_READ_CHUNK = 65536
_SMALL_FILE = 16384
#: A DMA logging report's bitmap is at most this many bytes (one bit per page).
MAX_REPORT_BYTES = 1 << 20
#: Where the legacy group path finds a PCI device's IOMMU group.
SYS_PCI_DEVICES = Path("/sys/bus/pci/devices")
DEV_VFIO = Path("/dev/vfio")
_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_INT = struct.Struct("<i")


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
    def read(self, fd: int, size: int) -> bytes: ...
    def write(self, fd: int, data: bytes | memoryview) -> int: ...
    def close_data(self, fd: int) -> None: ...
    def precopy_info(self, fd: int) -> tuple[int, int]: ...
    def data_size(self) -> int: ...
    def reset(self) -> None: ...
    def log(self) -> list[str]: ...
    def digest(self) -> str | None: ...
    def set_faults(self, rules: str) -> None: ...
    def identity(self) -> str: ...
    def configuration(self) -> str: ...
    def dma_logging(self) -> bool: ...
    def dma_map(self, iova: int, vaddr: int, length: int) -> None: ...
    def dma_unmap(self, iova: int, length: int) -> None: ...
    def log_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int: ...
    def log_stop(self) -> None: ...
    def log_report(self, iova: int, length: int, page_size: int) -> bytes: ...
    def close(self) -> None: ...


_UNKNOWN = object()


def _oserror(device: str, op: str, exc: OSError) -> AccessError:
    return AccessError(device, op, exc.errno or errno.EIO, exc.strerror or "")


def bitmap_bytes(length: int, page_size: int) -> int:
    """Bytes of a report bitmap: one bit per page, whole u64 words (``iova_bitmap``)."""
    pages = -(-length // page_size)
    return -(-pages // 64) * 8


class _DataFds:
    """The data stream of a real file descriptor (a file or a kernel data_fd)."""

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def close_data(self, fd: int) -> None:
        os.close(fd)


class FileDevice(_DataFds):
    """A fakevfio device directory (``MOUNT/devices/NAME``)."""

    has_files = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.flags = parse_flags(self._read("migration/flags"))
        #: The session id the last set_state saw (ids are never reused); _UNKNOWN: read it.
        self._session: object = _UNKNOWN

    def _read(self, rel: str) -> str:
        try:
            fd = os.open(self.path / rel, os.O_RDONLY)
        except OSError as exc:
            raise _oserror(self.name, f"open {rel}", exc) from None
        try:
            chunks = []
            total = 0
            while total < _META_LIMIT:
                data = os.read(fd, _READ_CHUNK)
                chunks.append(data)
                total += len(data)
                # A short read of a small file is its end: one FUSE round trip fewer.
                if not data or (total < _SMALL_FILE and len(data) < _READ_CHUNK):
                    break
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

    def _command(self, rel: str, text: str, reply: int) -> bytes:
        """One command to a command file; its reply (up to ``reply`` bytes) read back."""
        try:
            fd = os.open(self.path / rel, os.O_RDWR)
        except OSError as exc:
            raise _oserror(self.name, f"open {rel}", exc) from None
        try:
            os.write(fd, text.encode())
            return os.pread(fd, reply, 0) if reply else b""
        except OSError as exc:
            raise _oserror(self.name, f"{text.strip()!r} to {rel}", exc) from None
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
        before = self._session
        if before is _UNKNOWN:
            before = self._info().get("session")
        self._session = _UNKNOWN
        self._write("migration/state", f"{int(target)}\n")
        after = self._session = self._info().get("session")
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
        self._session = _UNKNOWN
        self._write("reset", "1\n")

    def log(self) -> list[str]:
        return self._read("migration/log").splitlines()

    def digest(self) -> str | None:
        value = self._info().get("state_digest")
        return value if isinstance(value, str) else None

    def set_faults(self, rules: str) -> None:
        self._write("faults", rules)

    def identity(self) -> str:
        return f"driver {self._info().get('driver')}"

    def configuration(self) -> str:
        info = self._info()
        # Not the flags: a stream moves between devices whose flag sets differ.
        keys = ("driver", "config_size", "regions")
        return json.dumps({k: info.get(k) for k in keys}, sort_keys=True)

    def dma_logging(self) -> bool:
        return (self.path / "dma").exists()

    def dma_map(self, iova: int, vaddr: int, length: int) -> None:
        self._command("dma", f"map {iova:#x} {length:#x} {os.getpid()} {vaddr:#x} rw\n", 0)

    def dma_unmap(self, iova: int, length: int) -> None:
        self._command("dma", f"unmap {iova:#x} {length:#x}\n", 0)

    def log_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        spans = ",".join(f"{iova:#x}:{length:#x}" for iova, length in ranges)
        reply = self._command("dma", f"log start {page_size:#x} {spans}\n", 256).split()
        if len(reply) != 2 or reply[0] != b"page_size":
            raise AccessError(self.name, "log start", errno.EPROTO, f"reply {reply!r}")
        return int(reply[1])

    def log_stop(self) -> None:
        self._command("dma", "log stop\n", 0)

    def log_report(self, iova: int, length: int, page_size: int) -> bytes:
        size = bitmap_bytes(length, page_size) if page_size > 0 else 8
        text = f"log report {iova:#x} {length:#x} {page_size:#x}\n"
        return self._command("dma", text, min(max(size, 8), MAX_REPORT_BYTES))

    def close(self) -> None:
        pass


def _ioctl(fd: int, request: int, buf: bytearray) -> int:
    result: int = fcntl.ioctl(fd, request, buf, True)
    return result


def _address(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


class KernelDevice(_DataFds):
    """A kernel VFIO device: an iommufd cdev, or a PCI address on the legacy group path."""

    has_files = False

    def __init__(self, spec: str | os.PathLike[str]) -> None:
        self.name = str(spec)
        self._fds: list[int] = []
        self._data_fd: int | None = None
        self._iommufd = -1
        self._ioas = 0
        self._container = -1
        try:
            if _BDF.match(self.name):
                self._fd = self._open_legacy(self.name)
            else:
                self._fd = self._open_cdev(self.name)
            out = self._feature(
                "GET MIGRATION",
                abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_MIGRATION,
                bytes(abi.FEATURE_MIGRATION.size),
            )
        except BaseException:
            self.close()
            raise
        self.flags = MigFlags(abi.FEATURE_MIGRATION.unpack(out)[0] & 7)

    def _open_cdev(self, path: str) -> int:
        fd = self._open(path)
        self._iommufd = iommufd = self._open("/dev/iommu")
        bind = bytearray(abi.BIND_IOMMUFD.pack(abi.BIND_IOMMUFD_MINSZ, 0, iommufd, 0, 0))
        self._call("VFIO_DEVICE_BIND_IOMMUFD", fd, abi.VFIO_DEVICE_BIND_IOMMUFD, bind)
        alloc = bytearray(abi.IOMMU_IOAS_ALLOC_STRUCT.pack(12, 0, 0))
        self._call("IOMMU_IOAS_ALLOC", iommufd, abi.IOMMU_IOAS_ALLOC, alloc)
        self._ioas = abi.IOMMU_IOAS_ALLOC_STRUCT.unpack(alloc)[2]
        attach = bytearray(
            abi.ATTACH_IOMMUFD_PT.pack(abi.ATTACH_IOMMUFD_PT_MINSZ, 0, self._ioas, 0)
        )
        self._call(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            fd,
            abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            attach[: abi.ATTACH_IOMMUFD_PT_MINSZ],
        )
        return fd

    def _open_legacy(self, spec: str) -> int:
        bdf = (f"0000:{spec}" if spec.count(":") == 1 else spec).lower()
        self.name = bdf
        sysfs = SYS_PCI_DEVICES / bdf
        try:
            group = os.path.basename(os.readlink(sysfs / "iommu_group"))
        except OSError as exc:
            raise AccessError(
                bdf,
                f"read {sysfs}/iommu_group",
                exc.errno or errno.ENODEV,
                "no such PCI device or no IOMMU group (is the IOMMU on, the device bound "
                "to vfio-pci or its variant driver?)",
            ) from None
        container = self._container = self._open(str(DEV_VFIO / "vfio"))
        version = self._call_val("VFIO_GET_API_VERSION", container, abi.VFIO_GET_API_VERSION)
        if version != abi.VFIO_API_VERSION:
            raise AccessError(bdf, "VFIO_GET_API_VERSION", errno.EINVAL, f"version {version}")
        grp = self._open(str(DEV_VFIO / group))
        status = bytearray(abi.GROUP_STATUS.pack(abi.GROUP_STATUS.size, 0))
        self._call("VFIO_GROUP_GET_STATUS", grp, abi.VFIO_GROUP_GET_STATUS, status)
        if not abi.GROUP_STATUS.unpack(status)[1] & abi.VFIO_GROUP_FLAGS_VIABLE:
            raise AccessError(
                bdf,
                "VFIO_GROUP_GET_STATUS",
                errno.EBUSY,
                f"group {group} is not viable: bind every device of it to vfio",
            )
        self._call(
            "VFIO_GROUP_SET_CONTAINER",
            grp,
            abi.VFIO_GROUP_SET_CONTAINER,
            bytearray(_INT.pack(container)),
        )
        for iommu in (abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_TYPE1_IOMMU):
            if self._call_val("VFIO_CHECK_EXTENSION", container, abi.VFIO_CHECK_EXTENSION, iommu):
                self._call_val("VFIO_SET_IOMMU", container, abi.VFIO_SET_IOMMU, iommu)
                break
        else:
            raise AccessError(bdf, "VFIO_CHECK_EXTENSION", errno.ENODEV, "no TYPE1v2 or TYPE1")
        fd = self._call(
            "VFIO_GROUP_GET_DEVICE_FD",
            grp,
            abi.VFIO_GROUP_GET_DEVICE_FD,
            bytearray(bdf.encode() + b"\0"),
        )
        self._fds.append(fd)
        return fd

    def _open(self, where: str) -> int:
        try:
            fd = os.open(where, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(self.name, f"open {where}", exc) from None
        self._fds.append(fd)
        return fd

    def _call(self, op: str, fd: int, request: int, buf: bytearray) -> int:
        try:
            return _ioctl(fd, request, buf)
        except OSError as exc:
            raise _oserror(self.name, op, exc) from None

    def _call_val(self, op: str, fd: int, request: int, value: int = 0) -> int:
        try:
            result: int = fcntl.ioctl(fd, request, value)
        except OSError as exc:
            raise _oserror(self.name, op, exc) from None
        return result

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
        self._call_val("VFIO_DEVICE_RESET", self._fd, abi.VFIO_DEVICE_RESET)

    def log(self) -> list[str]:
        return []

    def digest(self) -> str | None:
        return None

    def set_faults(self, rules: str) -> None:
        raise AccessError(self.name, "set faults", errno.ENOTSUP, "a kernel device has none")

    def _region(self, index: int) -> tuple[int, int]:
        """(size, offset) of a region (``VFIO_DEVICE_GET_REGION_INFO``)."""
        buf = bytearray(abi.REGION_INFO.pack(abi.REGION_INFO.size, 0, index, 0, 0, 0))
        self._call(f"GET_REGION_INFO {index}", self._fd, abi.VFIO_DEVICE_GET_REGION_INFO, buf)
        _argsz, _flags, _index, _cap, size, offset = abi.REGION_INFO.unpack(buf)
        return int(size), int(offset)

    def identity(self) -> str:
        """Vendor, device and subsystem IDs from config space: the driver's identity."""
        size, offset = self._region(abi.VFIO_PCI_CONFIG_REGION_INDEX)
        try:
            head = os.pread(self._fd, 0x30, offset)
        except OSError as exc:
            raise _oserror(self.name, "read config space", exc) from None
        if size < 0x30 or len(head) < 0x30:
            raise AccessError(self.name, "read config space", errno.EIO, f"{len(head)} bytes")
        ids = struct.unpack_from("<HH", head, 0) + struct.unpack_from("<HH", head, 0x2C)
        return "pci {:04x}:{:04x} {:04x}:{:04x}".format(*ids)

    def configuration(self) -> str:
        bars = []
        for index in range(abi.VFIO_PCI_BAR0_REGION_INDEX, abi.VFIO_PCI_BAR0_REGION_INDEX + 6):
            try:
                bars.append(self._region(index)[0])
            except AccessError:
                bars.append(-1)
        return f"{self.identity()} bars {bars}"

    def dma_logging(self) -> bool:
        flags = (
            abi.VFIO_DEVICE_FEATURE_PROBE
            | abi.VFIO_DEVICE_FEATURE_SET
            | abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
        )
        try:
            self._feature("PROBE DMA_LOGGING_START", flags, b"")
        except AccessError as exc:
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    def dma_map(self, iova: int, vaddr: int, length: int) -> None:
        if self._iommufd >= 0:
            flags = (
                abi.IOMMU_IOAS_MAP_FIXED_IOVA
                | abi.IOMMU_IOAS_MAP_WRITEABLE
                | abi.IOMMU_IOAS_MAP_READABLE
            )
            buf = bytearray(
                abi.IOMMU_IOAS_MAP_STRUCT.pack(
                    abi.IOMMU_IOAS_MAP_STRUCT.size, flags, self._ioas, 0, vaddr, length, iova
                )
            )
            self._call("IOMMU_IOAS_MAP", self._iommufd, abi.IOMMU_IOAS_MAP, buf)
            return
        flags = abi.VFIO_DMA_MAP_FLAG_READ | abi.VFIO_DMA_MAP_FLAG_WRITE
        buf = bytearray(
            abi.IOMMU_TYPE1_DMA_MAP.pack(abi.IOMMU_TYPE1_DMA_MAP.size, flags, vaddr, iova, length)
        )
        self._call("VFIO_IOMMU_MAP_DMA", self._container, abi.VFIO_IOMMU_MAP_DMA, buf)

    def dma_unmap(self, iova: int, length: int) -> None:
        if self._iommufd >= 0:
            size = abi.IOMMU_IOAS_UNMAP_STRUCT.size
            buf = bytearray(abi.IOMMU_IOAS_UNMAP_STRUCT.pack(size, self._ioas, iova, length))
            self._call("IOMMU_IOAS_UNMAP", self._iommufd, abi.IOMMU_IOAS_UNMAP, buf)
            return
        size = abi.IOMMU_TYPE1_DMA_UNMAP.size
        buf = bytearray(abi.IOMMU_TYPE1_DMA_UNMAP.pack(size, 0, iova, length))
        self._call("VFIO_IOMMU_UNMAP_DMA", self._container, abi.VFIO_IOMMU_UNMAP_DMA, buf)

    def log_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        table = ctypes.create_string_buffer(max(1, len(ranges)) * abi.DMA_LOGGING_RANGE.size)
        for i, (iova, length) in enumerate(ranges):
            abi.DMA_LOGGING_RANGE.pack_into(table, i * abi.DMA_LOGGING_RANGE.size, iova, length)
        control = abi.DMA_LOGGING_CONTROL.pack(page_size, len(ranges), 0, _address(table))
        out = self._feature(
            "SET DMA_LOGGING_START",
            abi.VFIO_DEVICE_FEATURE_SET | abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            control,
        )
        return int(abi.DMA_LOGGING_CONTROL.unpack(out)[0])

    def log_stop(self) -> None:
        self._feature(
            "SET DMA_LOGGING_STOP",
            abi.VFIO_DEVICE_FEATURE_SET | abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            b"",
        )

    def log_report(self, iova: int, length: int, page_size: int) -> bytes:
        size = bitmap_bytes(length, page_size) if page_size > 0 else 8
        bitmap = ctypes.create_string_buffer(min(max(size, 8), MAX_REPORT_BYTES))
        report = abi.DMA_LOGGING_REPORT.pack(iova, length, page_size, _address(bitmap))
        self._feature(
            "GET DMA_LOGGING_REPORT",
            abi.VFIO_DEVICE_FEATURE_GET | abi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            report,
        )
        return bitmap.raw

    def close(self) -> None:
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None
        while self._fds:
            os.close(self._fds.pop())


def open_device(spec: str) -> Device:
    """A fakevfio device directory, a ``/dev/vfio/devices/vfioN`` cdev or a PCI address.

    Raises:
        AccessError: the argument is none of these (EINVAL), or opening it failed.
    """
    path = Path(spec)
    if (path / "migration" / "state").exists():
        return FileDevice(path)
    if _BDF.match(spec):
        return KernelDevice(spec)
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
        "expected a fakevfio device directory (.../devices/NAME), a VFIO cdev "
        "(/dev/vfio/devices/vfioN) or a PCI address (0000:3b:00.1, legacy group path)",
    )
