"""The device backend for real kernel VFIO devices (``/dev/vfio``).

:class:`KernelBackend` implements :class:`migrator.backend.DeviceBackend` with the
VFIO migration v2 ioctls, with exactly the semantics of
:class:`~migrator.backend.FakeVfioBackend`, so the engines cannot tell the two apart.
Under ``fakevfio run`` the same code drives emulated devices through the ioctl
supervisor; that is how this module is tested without hardware.

Two ways to open a device (``reference/linux-vfio-uapi.md`` section 1):

- iommufd cdev (``/dev/vfio/devices/vfioN``): BIND_IOMMUFD to ``/dev/iommu``,
  IOMMU_IOAS_ALLOC, ATTACH_IOMMUFD_PT.
- PCI address, legacy path: sysfs ``iommu_group`` -> ``/dev/vfio/<group>``, a
  container on ``/dev/vfio/vfio`` (TYPE1v2, else TYPE1), GROUP_GET_DEVICE_FD.

Safety rules this backend keeps (section 7 of the reference):

1. It never requests STOP_COPY -> PRE_COPY / PRE_COPY_P2P: unpatched kernels spin
   forever in ``vfio_mig_get_next_state`` there. Refused locally with EINVAL.
2. After any failed SET it drops the data_fd (the kernel may have ended the
   session) and re-reads the state.
3. The data_fd is dropped on session-ending arcs and on reset; a new data_fd
   returned while one is held (or on an arc that does not open a session) is
   an error: "data_fd out of sync".
4. PRECOPY_INFO's flags are sent as 0 and read only after the PRECOPY_INFOv2
   opt-in succeeded (``SET VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``, Linux 7.1):
   before 7.1, and without the opt-in, every driver echoes them back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migrator.backend import DataFdBackend, DeviceBackend, PrecopyInfo
from migrator.errors import DeviceOpError
from vfio_uapi import abi as uapi
from vfio_uapi.errors import IllegalTransition
from vfio_uapi.fsm import NO_CHANGE, PRECOPY_STATES, MigFlags, State, session_change

DEV_VFIO = Path("/dev/vfio")
DEV_IOMMU = Path("/dev/iommu")
SYS_PCI_DEVICES = Path("/sys/bus/pci/devices")

_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_CDEV = re.compile(r"^vfio\d+$")
_INT = struct.Struct("<i")


def _ioctl_buf(fd: int, request: int, buf: bytearray) -> int:
    """A pointer ioctl: the kernel reads and writes ``buf``; returns the ioctl's value."""
    result: int = fcntl.ioctl(fd, request, buf, True)
    return result


def _ioctl_val(fd: int, request: int, value: int = 0) -> int:
    """A by-value ioctl (or one without argument); returns the ioctl's value."""
    return fcntl.ioctl(fd, request, value)


class KernelBackend(DataFdBackend):
    """One kernel VFIO device fd with VFIO migration v2 support.

    Use :meth:`open_cdev`, :meth:`open_pci` or :func:`open_device`; the
    constructor takes an already opened device fd (and the fds that keep it
    usable: iommufd, group, container), which it owns from then on.
    """

    def __init__(
        self,
        device_fd: int,
        *,
        location: str,
        idstr: str,
        helper_fds: tuple[int, ...] = (),
    ) -> None:
        self.location = location
        self.idstr = idstr
        self._fd = device_fd
        self._helpers = helper_fds
        self._data_fd: int | None = None
        self._config: tuple[int, int] | None = None  # (offset, size) of the CONFIG region
        self._last_state: State | None = None
        self._precopy_v2 = False
        try:
            self._flags = self._read_flags()
        except BaseException:
            self.close()
            raise

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open_cdev(cls, cdev: str | os.PathLike[str], idstr: str | None = None) -> KernelBackend:
        """Open ``/dev/vfio/devices/vfioN`` through iommufd (bind, IOAS, attach)."""
        where = str(cdev)
        fds: list[int] = []
        try:
            dev = _open(where, fds)
            iommufd = _open(str(DEV_IOMMU), fds)
            bind = bytearray(uapi.BIND_IOMMUFD.pack(uapi.BIND_IOMMUFD_MINSZ, 0, iommufd, 0, 0))
            # argsz 16 (the minimum): every kernel with the cdev path accepts it.
            _op(
                where,
                "VFIO_DEVICE_BIND_IOMMUFD",
                _ioctl_buf,
                dev,
                uapi.VFIO_DEVICE_BIND_IOMMUFD,
                bind,
            )
            alloc = bytearray(uapi.IOMMU_IOAS_ALLOC_STRUCT.pack(12, 0, 0))
            _op(where, "IOMMU_IOAS_ALLOC", _ioctl_buf, iommufd, uapi.IOMMU_IOAS_ALLOC, alloc)
            ioas = uapi.IOMMU_IOAS_ALLOC_STRUCT.unpack(alloc)[2]
            attach = bytearray(
                uapi.ATTACH_IOMMUFD_PT.pack(uapi.ATTACH_IOMMUFD_PT_MINSZ, 0, ioas, 0)
            )[: uapi.ATTACH_IOMMUFD_PT_MINSZ]
            _op(
                where,
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                _ioctl_buf,
                dev,
                uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                attach,
            )
        except BaseException:
            _close_all(fds)
            raise
        name = Path(where).name
        return cls(dev, location=where, idstr=idstr or f"{name}/vfio", helper_fds=(iommufd,))

    @classmethod
    def open_pci(cls, bdf: str, idstr: str | None = None) -> KernelBackend:
        """Open a PCI device by address through its IOMMU group (legacy container path)."""
        if bdf.count(":") == 1:
            bdf = f"0000:{bdf}"
        bdf = bdf.lower()
        where = bdf
        group = _pci_group(bdf)
        fds: list[int] = []
        try:
            dev, grp, container = _open_legacy(where, bdf, group, fds)
        except BaseException:
            _close_all(fds)
            raise
        return cls(dev, location=where, idstr=idstr or f"{bdf}/vfio", helper_fds=(grp, container))

    # --- ioctl helpers -----------------------------------------------------------------------

    def _fail(self, op: str, exc: OSError, detail: str = "") -> DeviceOpError:
        err = exc.errno or errno.EIO
        return DeviceOpError(self.location, op, err, detail or exc.strerror or "")

    def _feature(self, op: str, flags: int, payload: bytes) -> bytearray:
        buf = bytearray(uapi.DEVICE_FEATURE.pack(8 + len(payload), flags) + payload)
        try:
            _ioctl_buf(self._fd, uapi.VFIO_DEVICE_FEATURE, buf)
        except OSError as exc:
            raise self._fail(op, exc) from None
        return buf[8:]

    def _read_flags(self) -> MigFlags:
        try:
            out = self._feature(
                "GET VFIO_DEVICE_FEATURE_MIGRATION",
                uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_MIGRATION,
                bytes(uapi.FEATURE_MIGRATION.size),
            )
        except DeviceOpError as exc:
            if exc.errno == errno.ENOTTY:
                raise DeviceOpError(
                    self.location,
                    "GET VFIO_DEVICE_FEATURE_MIGRATION",
                    errno.ENOTTY,
                    "the device has no migration support",
                ) from None
            raise
        value = uapi.FEATURE_MIGRATION.unpack(out)[0]
        if not value & uapi.VFIO_MIGRATION_STOP_COPY:
            raise DeviceOpError(
                self.location,
                "GET VFIO_DEVICE_FEATURE_MIGRATION",
                errno.EINVAL,
                f"flags 0x{value:x} lack STOP_COPY",
            )
        return MigFlags(value & (MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY))

    def probe(self, feature: int) -> bool:
        """VFIO_DEVICE_FEATURE PROBE: whether the device supports ``feature`` (any of GET/SET)."""
        for op in (uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET):
            try:
                self._feature("PROBE", uapi.VFIO_DEVICE_FEATURE_PROBE | op | feature, b"")
            except DeviceOpError as exc:
                if exc.errno in (errno.ENOTTY, errno.EINVAL):
                    continue
                raise
            return True
        return False

    # --- DeviceBackend -----------------------------------------------------------------------

    def migration_flags(self) -> MigFlags:
        return self._flags

    def get_state(self) -> State:
        out = self._feature(
            "GET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
            uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            uapi.FEATURE_MIG_STATE.pack(0, -1),
        )
        number = uapi.FEATURE_MIG_STATE.unpack(out)[0]
        try:
            state = State(number)
        except ValueError:
            raise DeviceOpError(
                self.location,
                "GET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
                errno.EINVAL,
                f"unknown state number {number}",
            ) from None
        self._last_state = state
        return state

    def set_state(self, state: State) -> None:
        before = self.get_state()
        op = f"set state {before.name} -> {state.name}"
        if before is State.STOP_COPY and state in PRECOPY_STATES:
            # Rule 1: never send this arc to a kernel (it hangs unpatched kernels).
            raise DeviceOpError(
                self.location,
                op,
                errno.EINVAL,
                "STOP_COPY -> PRE_COPY* is not allowed (refused locally)",
            )
        if before == state:
            return
        try:
            out = self._feature(
                op,
                uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                uapi.FEATURE_MIG_STATE.pack(int(state), -1),
            )
        except DeviceOpError as exc:
            self._drop_data_fd()
            reached = self._reread_state()
            if reached is not None:
                exc.message += f"; device now in {reached.name}"
            raise
        data_fd = uapi.FEATURE_MIG_STATE.unpack(out)[1]
        try:
            change = session_change(before, state, self._flags)
        except IllegalTransition:
            change = NO_CHANGE
        if change.ends and not change.opens:
            self._drop_data_fd()
        opens_session = change.opens
        if data_fd >= 0:
            if self._data_fd is not None or not opens_session:
                os.close(data_fd)
                self._drop_data_fd()
                raise DeviceOpError(self.location, op, errno.EBADF, "data_fd out of sync")
            self._data_fd = data_fd
        elif opens_session:
            self._drop_data_fd()
            raise DeviceOpError(
                self.location,
                op,
                errno.EBADF,
                "data_fd out of sync (the kernel returned no data_fd)",
            )

    def _reread_state(self) -> State | None:
        try:
            return self.get_state()
        except DeviceOpError:
            return None

    def _get_precopy_info(self) -> tuple[int, int, int]:
        fd = self._data("VFIO_MIG_GET_PRECOPY_INFO")
        # flags = 0 in (Rule 4): drivers without the v2 opt-in echo it back.
        buf = bytearray(uapi.PRECOPY_INFO.pack(uapi.PRECOPY_INFO.size, 0, 0, 0))
        try:
            _ioctl_buf(fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, buf)
        except OSError as exc:
            raise self._fail("VFIO_MIG_GET_PRECOPY_INFO", exc) from None
        _argsz, flags, initial, dirty = uapi.PRECOPY_INFO.unpack(buf)
        return flags, initial, dirty

    def precopy_info(self) -> tuple[int, int]:
        _flags, initial, dirty = self._get_precopy_info()
        return initial, dirty

    def enable_precopy_v2(self) -> bool:
        """``SET VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`` (no payload, argsz 8).

        EINVAL (the device has no PRE_COPY) and ENOTTY (a kernel before 7.1)
        mean "not enabled"; any other errno is raised.
        """
        if self._precopy_v2:
            return True
        try:
            self._feature(
                "SET VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2",
                uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2,
                b"",
            )
        except DeviceOpError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTTY):
                return False
            raise
        self._precopy_v2 = True
        return True

    def precopy_info_v2(self) -> PrecopyInfo:
        flags, initial, dirty = self._get_precopy_info()
        reinit = self._precopy_v2 and bool(flags & uapi.VFIO_PRECOPY_INFO_REINIT)
        return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty, reinit=reinit)

    def data_size(self) -> int:
        out = self._feature(
            "GET VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
            uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            bytes(uapi.FEATURE_MIG_DATA_SIZE.size),
        )
        return int(uapi.FEATURE_MIG_DATA_SIZE.unpack(out)[0])

    def _config_region(self) -> tuple[int, int]:
        if self._config is None:
            buf = bytearray(
                uapi.REGION_INFO.pack(
                    uapi.REGION_INFO.size, 0, uapi.VFIO_PCI_CONFIG_REGION_INDEX, 0, 0, 0
                )
            )
            try:
                _ioctl_buf(self._fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
            except OSError as exc:
                raise self._fail("VFIO_DEVICE_GET_REGION_INFO (config)", exc) from None
            _argsz, _flags, _index, _cap, size, offset = uapi.REGION_INFO.unpack(buf)
            self._config = (offset, size)
        return self._config

    def read_config(self) -> bytes:
        offset, size = self._config_region()
        out = bytearray()
        try:
            while len(out) < size:
                chunk = os.pread(self._fd, size - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
        except OSError as exc:
            raise self._fail("read config", exc) from None
        return bytes(out)

    def write_config_at(self, offset: int, data: bytes) -> None:
        base, size = self._config_region()
        if offset + len(data) > size:
            raise DeviceOpError(
                self.location,
                "write config",
                errno.EINVAL,
                f"{len(data)} bytes at 0x{offset:x} pass the {size}-byte config region",
            )
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], base + offset + done)
        except OSError as exc:
            raise self._fail("write config", exc) from None

    def reset(self) -> None:
        self._drop_data_fd()
        try:
            _ioctl_val(self._fd, uapi.VFIO_DEVICE_RESET)
        except OSError as exc:
            raise self._fail("VFIO_DEVICE_RESET", exc) from None

    def close(self) -> None:
        self._drop_data_fd()
        fds = [self._fd, *self._helpers]
        self._fd = -1
        self._helpers = ()
        _close_all([fd for fd in fds if fd >= 0])


def _pci_group(bdf: str) -> str:
    """The IOMMU group of PCI device ``bdf`` whose ``/dev/vfio/<group>`` exists, else what is wrong.

    Raises:
        DeviceOpError: no such device, no IOMMU group, or the group has no VFIO node
            (the device is not bound to vfio-pci); each says what to do about it.
    """
    sysfs = SYS_PCI_DEVICES / bdf
    if not sysfs.exists():
        raise DeviceOpError(
            bdf, "find iommu_group", errno.ENODEV, f"no such PCI device (no {sysfs})"
        )
    try:
        group = os.path.basename(os.readlink(sysfs / "iommu_group"))
    except OSError as exc:
        raise DeviceOpError(
            bdf,
            "find iommu_group",
            exc.errno or errno.ENODEV,
            f"no IOMMU group ({sysfs}/iommu_group: {exc.strerror}); is the IOMMU on "
            "(intel_iommu=on / amd_iommu=on)?",
        ) from None
    if not (DEV_VFIO / group).exists():
        try:
            driver = os.path.basename(os.readlink(sysfs / "driver"))
        except OSError:
            driver = "no driver"
        raise DeviceOpError(
            bdf,
            f"open {DEV_VFIO / group}",
            errno.ENOENT,
            f"IOMMU group {group} has no VFIO node: the device is bound to {driver}, not "
            f"vfio-pci (echo vfio-pci > {sysfs}/driver_override, then bind it)",
        )
    return group


def _open(where: str, fds: list[int]) -> int:
    try:
        fd = os.open(where, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceOpError(
            where, f"open {where}", exc.errno or errno.EIO, exc.strerror or ""
        ) from None
    fds.append(fd)
    return fd


def _op(where: str, name: str, call: Callable[..., int], *args: Any) -> int:
    try:
        return call(*args)
    except OSError as exc:
        raise DeviceOpError(where, name, exc.errno or errno.EIO, exc.strerror or "") from None


def _open_legacy(where: str, bdf: str, group: str, fds: list[int]) -> tuple[int, int, int]:
    """Container + group + device fd (each appended to ``fds`` as soon as it exists)."""
    container = _open(str(DEV_VFIO / "vfio"), fds)
    version = _op(where, "VFIO_GET_API_VERSION", _ioctl_val, container, uapi.VFIO_GET_API_VERSION)
    if version != uapi.VFIO_API_VERSION:
        raise DeviceOpError(
            where, "VFIO_GET_API_VERSION", errno.EINVAL, f"unknown API version {version}"
        )
    grp = _open(str(DEV_VFIO / group), fds)
    status = bytearray(uapi.GROUP_STATUS.pack(uapi.GROUP_STATUS.size, 0))
    _op(where, "VFIO_GROUP_GET_STATUS", _ioctl_buf, grp, uapi.VFIO_GROUP_GET_STATUS, status)
    if not uapi.GROUP_STATUS.unpack(status)[1] & uapi.VFIO_GROUP_FLAGS_VIABLE:
        raise DeviceOpError(
            where,
            "VFIO_GROUP_GET_STATUS",
            errno.EBUSY,
            f"group {group} is not viable (bind all its devices to vfio)",
        )
    _op(
        where,
        "VFIO_GROUP_SET_CONTAINER",
        _ioctl_buf,
        grp,
        uapi.VFIO_GROUP_SET_CONTAINER,
        bytearray(_INT.pack(container)),
    )
    for iommu in (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU):
        if (
            _op(
                where,
                "VFIO_CHECK_EXTENSION",
                _ioctl_val,
                container,
                uapi.VFIO_CHECK_EXTENSION,
                iommu,
            )
            > 0
        ):
            _op(where, "VFIO_SET_IOMMU", _ioctl_val, container, uapi.VFIO_SET_IOMMU, iommu)
            break
    else:
        raise DeviceOpError(
            where,
            "VFIO_CHECK_EXTENSION",
            errno.ENODEV,
            "container supports neither TYPE1v2 nor TYPE1",
        )
    dev = _op(
        where,
        "VFIO_GROUP_GET_DEVICE_FD",
        _ioctl_buf,
        grp,
        uapi.VFIO_GROUP_GET_DEVICE_FD,
        bytearray(bdf.encode() + b"\0"),
    )
    fds.append(dev)
    return dev, grp, container


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def open_device(spec: str, idstr: str | None = None) -> DeviceBackend:
    """Open a kernel VFIO device: a cdev path (``/dev/vfio/devices/vfioN``) or a PCI address.

    Raises:
        DeviceOpError: the device cannot be opened or has no migration support.
        ValueError: ``spec`` is neither a cdev path nor a PCI address.
    """
    name = os.path.basename(spec.rstrip("/"))
    if _CDEV.match(name) and ("/" in spec):
        return KernelBackend.open_cdev(spec, idstr)
    if _BDF.match(spec):
        return KernelBackend.open_pci(spec, idstr)
    raise ValueError(
        f"{spec!r} is neither a VFIO cdev path (/dev/vfio/devices/vfioN) nor a PCI address"
    )
