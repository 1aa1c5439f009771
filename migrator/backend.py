"""The device backend interface, and its implementation for fakevfio devices.

Everything above this interface (the source and destination engines) is the
same code for fake devices and for real ``/dev/vfio`` devices
(:mod:`migrator.kernel`). Backend calls are synchronous and may block (they are
syscalls); the engine runs them in worker threads.

The semantics are the kernel's: ``set_state`` is one
``VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE``; when its final arc opens a new
data_fd the backend keeps it, and it drops the data_fd when the session ends
or after any failed SET (the kernel may have ended the session). After a
failed SET the backend re-reads the device state.

Pre-copy info v2 (Linux 7.1): a caller that opts in with
:meth:`DeviceBackend.enable_precopy_v2` (``SET
VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``) reads :meth:`~DeviceBackend.precopy_info_v2`,
whose ``reinit`` is ``VFIO_PRECOPY_INFO_REINIT``: the device has new initial
data (initial_bytes started again from a new value, dirty_bytes from 0).
Without the opt-in ``reinit`` is always False (older kernels echo the caller's
flags, so the field means nothing there) and initial_bytes never grows.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from migrator._wire.pci_config import (
    ConfigLayout,
    decode_qemu_config,
    encode_qemu_config,
    restore_writes,
)
from migrator.errors import DeviceOpError, MigrationError, NoDataNow
from vfio_uapi.abi import VFIO_PRECOPY_INFO_REINIT
from vfio_uapi.fsm import MigFlags, State, parse_flags, session_change

CONFIG_READ_MAX = 4096
#: Buffers per writev(): far below Linux's IOV_MAX (1024).
_IOV_MAX = 64
#: A device's v2 pre-copy query file (``initial_bytes``, ``dirty_bytes``, ``flags`` lines).
PRECOPY_V2_FILE = "precopy_info_v2"
#: What file operations on a FUSE mount whose server died return: ENOTCONN for
#: new lookups and opens, ECONNABORTED on files that were already open.
_DEAD_MOUNT_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


@attrs.frozen
class PrecopyInfo:
    """``struct vfio_precopy_info`` as a caller that opted in to v2 reads it."""

    initial_bytes: int
    dirty_bytes: int
    #: ``VFIO_PRECOPY_INFO_REINIT``: new initial data is on the stream (only after the opt-in).
    reinit: bool = False


class DeviceBackend(abc.ABC):
    """One VFIO device as the migrator sees it."""

    #: Section id (``<basename>/vfio`` by default).
    idstr: str
    #: Where the device is (path or address), for messages.
    location: str

    @abc.abstractmethod
    def migration_flags(self) -> MigFlags: ...

    @abc.abstractmethod
    def get_state(self) -> State: ...

    @abc.abstractmethod
    def set_state(self, state: State) -> None:
        """SET MIG_DEVICE_STATE; raises DeviceOpError (state re-read, data_fd dropped)."""

    @abc.abstractmethod
    def read_data(self, buf: memoryview) -> int:
        """One read() of the data_fd into ``buf``: bytes read, 0 at EOF; NoDataNow on ENOMSG."""

    def read_data_many(self, bufs: Sequence[memoryview]) -> int:
        """Successive reads into ``bufs`` until one comes back short: bytes read in all.

        The device sees the same reads as one :meth:`read_data` per buffer, so
        the stream's DATA blocks stay QEMU's (one per buffer); the first read's
        errors are raised, a later read's end the call early (the next call
        raises it). This default loops; a data_fd backend does it in one
        ``readv``, which costs one worker-thread hop per several buffers.
        """
        total = 0
        for buf in bufs:
            try:
                n = self.read_data(buf)
            except MigrationError:
                if total:
                    return total
                raise
            total += n
            if n < len(buf):
                break
        return total

    @abc.abstractmethod
    def write_data(self, data: memoryview) -> None:
        """Write all of ``data`` to the resuming data_fd (loops on partial writes)."""

    def write_data_many(self, bufs: Sequence[memoryview]) -> None:
        """Write all of ``bufs``, in order, as :meth:`write_data` would one by one.

        A data_fd backend does it with ``writev`` (one worker-thread hop for
        several multifd buffers); a kernel driver's data_fd without write_iter
        still gets one write() per buffer, as from QEMU.
        """
        for buf in bufs:
            self.write_data(buf)

    @abc.abstractmethod
    def precopy_info(self) -> tuple[int, int]:
        """VFIO_MIG_GET_PRECOPY_INFO: (initial_bytes, dirty_bytes)."""

    def enable_precopy_v2(self) -> bool:
        """Opt in to PRECOPY_INFOv2 (``SET VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``).

        Returns whether the device took it: False for a device without
        PRE_COPY (the kernel's EINVAL) or one that predates the feature
        (ENOTTY). Idempotent; the opt-in lasts while the device stays open.
        """
        return False

    def precopy_info_v2(self) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO with its flags: ``reinit`` only after the opt-in."""
        initial, dirty = self.precopy_info()
        return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty)

    @abc.abstractmethod
    def data_size(self) -> int:
        """VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: stop_copy_length."""

    @abc.abstractmethod
    def read_config(self) -> bytes:
        """The device's PCI config space."""

    @abc.abstractmethod
    def write_config_at(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the device's PCI config space."""

    def save_config(self) -> bytes:
        """QEMU's ``vmstate_vfio_pci_config`` blob for this device (see :mod:`.pci_config`)."""
        return encode_qemu_config(self.read_config())

    def config_layout(self) -> ConfigLayout:
        """The layout of the blobs this device saves and loads (its own config space)."""
        return ConfigLayout.of(self.read_config())

    def write_config(self, blob: bytes) -> None:
        """Restore a QEMU config blob as QEMU's ``vfio_pci_load_config`` does.

        Only PCI_COMMAND, the BARs and the MSI/MSI-X enable bits are written
        (:func:`restore_writes`); raises FramingError for a blob that does not
        fit this device.
        """
        current = self.read_config()
        saved = decode_qemu_config(blob, ConfigLayout.of(current))
        for offset, data in restore_writes(current, saved.config):
            self.write_config_at(offset, data)

    @abc.abstractmethod
    def reset(self) -> None:
        """VFIO_DEVICE_RESET."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def has_data_fd(self) -> bool:
        return False


class DataFdBackend(DeviceBackend):
    """The data_fd half both backends share: a stream read and written with plain syscalls."""

    location: str
    _data_fd: int | None = None

    @abc.abstractmethod
    def _fail(self, op: str, exc: OSError) -> DeviceOpError:
        """Turn an OSError of ``op`` into a DeviceOpError naming this device."""

    def _drop_data_fd(self) -> None:
        fd, self._data_fd = self._data_fd, None
        if fd is not None:
            # close() frees the fd even when it reports an error (a dead FUSE
            # server's ENOTCONN); closing it again would hit EBADF or another fd.
            with contextlib.suppress(OSError):
                os.close(fd)

    def has_data_fd(self) -> bool:
        return self._data_fd is not None

    def _data(self, op: str) -> int:
        if self._data_fd is None:
            raise DeviceOpError(self.location, op, errno.EBADF, "no data_fd (no live session)")
        return self._data_fd

    def read_data(self, buf: memoryview) -> int:
        fd = self._data("read data")
        try:
            return os.readv(fd, [buf])
        except OSError as exc:
            if exc.errno == errno.ENOMSG:
                raise NoDataNow(self.location) from None
            raise self._fail("read data", exc) from None

    def read_data_many(self, bufs: Sequence[memoryview]) -> int:
        # readv: a FUSE direct-I/O file makes one request per page-aligned 1 MiB
        # buffer and stops at a short one; a file without read_iter (a kernel
        # variant driver's data_fd) gets one read() per buffer and stops there too.
        fd = self._data("read data")
        try:
            return os.readv(fd, bufs)
        except OSError as exc:
            if exc.errno == errno.ENOMSG:
                raise NoDataNow(self.location) from None
            raise self._fail("read data", exc) from None

    def write_data(self, data: memoryview) -> None:
        fd = self._data("write data")
        while len(data):
            try:
                n = os.write(fd, data)
            except OSError as exc:
                raise self._fail("write data", exc) from None
            data = data[n:]

    def write_data_many(self, bufs: Sequence[memoryview]) -> None:
        fd = self._data("write data")
        views = [buf for buf in bufs if len(buf)]
        first = 0
        while first < len(views):
            try:
                n = os.writev(fd, views[first : first + _IOV_MAX])
            except OSError as exc:
                raise self._fail("write data", exc) from None
            while n and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]


class FakeVfioBackend(DataFdBackend):
    """A fakevfio device directory (``MOUNT/devices/NAME``), driven through its files."""

    def __init__(self, directory: str | os.PathLike[str], idstr: str | None = None) -> None:
        self.dir = Path(directory)
        self.location = str(self.dir)
        self.idstr = idstr or f"{self.dir.name}/vfio"
        try:
            present = (self.dir / "migration" / "state").exists()
        except OSError as exc:  # e.g. ENOTCONN: the mount's server died
            raise self._fail("open", exc) from None
        if not present:
            raise DeviceOpError(
                self.location, "open", errno.ENOENT, "not a fakevfio device directory"
            )
        self._flags = parse_flags(self._read_text("migration/flags"))
        self._data_fd: int | None = None
        self._data_writable = False
        self._precopy_v2 = False

    def _fail(self, op: str, exc: OSError) -> DeviceOpError:
        err = exc.errno or errno.EIO
        detail = exc.strerror or ""
        if err in _DEAD_MOUNT_ERRNOS:
            detail += "; the device's mount stopped answering (its fakevfio server died)"
        return DeviceOpError(self.location, op, err, detail)

    def _read_text(self, rel: str) -> str:
        try:
            with open(self.dir / rel, "rb", buffering=0) as f:
                return f.read(65536).decode()
        except OSError as exc:
            raise self._fail(f"read {rel}", exc) from None

    def migration_flags(self) -> MigFlags:
        return self._flags

    def get_state(self) -> State:
        return State[self._read_text("migration/state").strip()]

    def set_state(self, state: State) -> None:
        before = self.get_state()
        if before == state:
            return
        try:
            fd = os.open(self.dir / "migration" / "state", os.O_WRONLY)
            try:
                os.write(fd, f"{state.name}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            self._drop_data_fd()
            raise self._fail(f"set state {before.name} -> {state.name}", exc) from None
        change = session_change(before, state, self._flags)
        if change.opens:
            self._drop_data_fd()
            writable = change.writable
            try:
                self._data_fd = os.open(
                    self.dir / "migration" / "data", os.O_WRONLY if writable else os.O_RDONLY
                )
            except OSError as exc:
                raise self._fail("open migration/data", exc) from None
            self._data_writable = writable
        elif change.ends:
            self._drop_data_fd()

    def precopy_info(self) -> tuple[int, int]:
        fields = _fields(self._read_text("migration/precopy_info"))
        return int(fields["initial_bytes"]), int(fields["dirty_bytes"])

    def enable_precopy_v2(self) -> bool:
        """The device's ``migration/precopy_info_v2`` file is the v2 query (Linux 7.1)."""
        if not self._flags & MigFlags.PRE_COPY:
            return False
        try:
            present = (self.dir / "migration" / PRECOPY_V2_FILE).exists()
        except OSError as exc:
            raise self._fail(f"look up migration/{PRECOPY_V2_FILE}", exc) from None
        self._precopy_v2 = present
        return present

    def precopy_info_v2(self) -> PrecopyInfo:
        if not self._precopy_v2:
            return super().precopy_info_v2()
        fields = _fields(self._read_text(f"migration/{PRECOPY_V2_FILE}"))
        return PrecopyInfo(
            initial_bytes=int(fields["initial_bytes"]),
            dirty_bytes=int(fields["dirty_bytes"]),
            reinit=bool(int(fields.get("flags", "0"), 0) & VFIO_PRECOPY_INFO_REINIT),
        )

    def data_size(self) -> int:
        return int(self._read_text("migration/data_size"))

    def read_config(self) -> bytes:
        try:
            with open(self.dir / "config", "rb", buffering=0) as f:
                return f.read(CONFIG_READ_MAX)
        except OSError as exc:
            raise self._fail("read config", exc) from None

    def write_config_at(self, offset: int, data: bytes) -> None:
        try:
            fd = os.open(self.dir / "config", os.O_WRONLY)
            try:
                if os.pwrite(fd, data, offset) != len(data):
                    raise OSError(errno.EIO, f"short write of {len(data)} bytes at {offset}")
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._fail("write config", exc) from None

    def reset(self) -> None:
        self._drop_data_fd()
        try:
            fd = os.open(self.dir / "reset", os.O_WRONLY)
            try:
                os.write(fd, b"1\n")
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._fail("reset", exc) from None

    def close(self) -> None:
        self._drop_data_fd()


def _fields(text: str) -> dict[str, str]:
    """``NAME VALUE`` lines as a dict (blank lines ignored)."""
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip())
