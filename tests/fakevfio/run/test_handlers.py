"""The ``fakevfio run`` ioctl handlers called directly, without seccomp, on a real mount.

The test process is the caller: it opens the mount's node files itself, and a
:class:`Call` carries its fds, an in-memory caller memory (faults outside the
buffer or on read-only ranges, like the kernel's EFAULT) and an ``install_fd``
that dups into this process (what ADDFD does to a real caller). Each test
checks argsz handling and the errno order of the kernel (one check's errno
wins over a later one's), and that a fault aborts before any side effect.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from fakevfio._run import Call, NodeKind, Vfio
from fakevfio._run import _iommufd as iommufd
from fakevfio._run._caller import HeldFiles, PassThrough, read_cstring
from fakevfio._run._fileid import file_id
from fakevfio._run._nodes import MountNodes
from fakevfio.errors import FakeVfioError, IoctlError
from tests.conftest import MountFactory
from vfio_uapi import abi as uapi

pytestmark = pytest.mark.fuse

ARG = 0x1000
PAYLOAD = ARG + 8
RO = 0x3000  # a read-only page of the fake caller memory
NAME = 0x5000
F_GET, F_SET, F_PROBE = (
    uapi.VFIO_DEVICE_FEATURE_GET,
    uapi.VFIO_DEVICE_FEATURE_SET,
    uapi.VFIO_DEVICE_FEATURE_PROBE,
)

#: The supervisor drives device states through the mount's control channel, or through
#: the state file where there is none: the tests of SET and GET run both ways.
BOTH_PATHS = pytest.mark.parametrize("channel", [True, False], ids=["channel", "files"])


if sys.platform != "linux" or os.uname().machine != "x86_64":
    pytest.skip("the fakevfio run handlers use x86-64 Linux syscalls", allow_module_level=True)


class Mem:
    """A flat fake of the caller's memory: [0x1000, 0x10000) mapped, one read-only page."""

    def __init__(self) -> None:
        self.buf = bytearray(0x10000)

    def _check(self, addr: int, size: int, *, write: bool) -> None:
        if addr < 0x1000 or addr + size > len(self.buf):
            raise IoctlError(errno.EFAULT, f"0x{addr:x}")
        if write and addr < RO + 0x1000 and addr + size > RO:
            raise IoctlError(errno.EFAULT, f"0x{addr:x} is read-only")

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size, write=False)
        return bytes(self.buf[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data), write=True)
        self.buf[addr : addr + len(data)] = data

    def read_cstring(self, addr: int) -> bytes:
        try:
            return read_cstring(self.read, addr)
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EINVAL, "device name") from None


@attrs.define(eq=False)
class Caller:
    """This process as the supervisor's caller: its fds, a fake memory, what ADDFD gave."""

    vfio: Vfio
    mem: Mem = attrs.Factory(Mem)
    installed: list[tuple[int, bool]] = attrs.Factory(list)
    fds: list[int] = attrs.Factory(list)

    def open(self, path: Path | str, flags: int = os.O_RDWR) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def _install(self, fd: int, send: bool) -> int:
        new = os.dup(fd)
        self.fds.append(new)
        self.installed.append((new, send))
        return new

    def ioctl(self, fd: int, request: int, arg: int | bytes = ARG) -> int | None:
        """The handler's answer; the struct ``arg`` is placed at ARG first."""
        if isinstance(arg, bytes):
            self.mem.buf[ARG : ARG + len(arg)] = arg
            arg = ARG
        call = Call(
            pid=os.getpid(),
            fd=fd,
            request=request,
            arg=arg,
            mem=self.mem,
            install_fd=self._install,
            check_alive=lambda: None,
        )
        return self.vfio.dispatch(call)

    def err(self, fd: int, request: int, arg: int | bytes = ARG) -> int:
        with pytest.raises(IoctlError) as info:
            self.ioctl(fd, request, arg)
        return info.value.errno

    def out(self, offset: int, fmt: str) -> tuple[int, ...]:
        return struct.unpack_from(fmt, self.mem.buf, ARG + offset)


@attrs.frozen
class Env:
    caller: Caller
    mount: Path
    cdev: Path
    group: Path


@pytest.fixture
def env(fakevfio_mount: MountFactory) -> Iterator[Env]:
    with fakevfio_mount(["gpu0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=7"]) as m:
        info = json.loads((m.path / "devices" / "gpu0" / "info").read_text())
        nodes = MountNodes.open(m.path)
        files = HeldFiles(nodes.dev)
        caller = Caller(Vfio(nodes, files))
        vfio_dir = m.path / "dev" / "vfio"
        try:
            yield Env(
                caller,
                m.path,
                vfio_dir / "devices" / info["cdev"],
                vfio_dir / str(info["iommu_group"]),
            )
        finally:
            files.close()
            nodes.close()
            for fd in caller.fds:
                os.close(fd)


def _bind(c: Caller, dev: int, iommu: int) -> int:
    assert c.ioctl(dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, struct.pack("<IIiI", 16, 0, iommu, 0)) == 0
    return c.out(12, "<I")[0]


def _bound(env: Env) -> tuple[int, int, int]:
    """A cdev bound to an iommufd and attached to a new IOAS: (dev fd, iommufd, ioas)."""
    c = env.caller
    dev, iommu = c.open(env.cdev), c.open(env.mount / "dev" / "iommu")
    _bind(c, dev, iommu)
    assert c.ioctl(iommu, uapi.IOMMU_IOAS_ALLOC, struct.pack("<III", 12, 0, 0)) == 0
    (ioas,) = c.out(8, "<I")
    assert c.ioctl(dev, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, struct.pack("<III", 12, 0, ioas)) == 0
    return dev, iommu, ioas


def test_ioctl_error_is_a_fakevfio_error() -> None:
    exc = IoctlError(errno.EOPNOTSUPP, "size < 12")
    assert isinstance(exc, FakeVfioError)
    assert (exc.errno, exc.detail) == (errno.EOPNOTSUPP, "size < 12")
    assert str(exc) == "ioctl: size < 12 (EOPNOTSUPP)"


def test_handlers_tell_node_kinds_and_pass_other_fds_through(env: Env) -> None:
    c = env.caller
    nodes = c.vfio.nodes
    assert nodes.kind(os.stat(env.cdev).st_ino) == (NodeKind.CDEV, "gpu0")
    assert nodes.kind(os.stat(env.group).st_ino) == (NodeKind.GROUP, "gpu0")
    assert nodes.kind(os.stat(env.mount / "dev" / "iommu").st_ino)[0] is NodeKind.IOMMU
    assert nodes.kind(os.stat(env.mount / "devices").st_ino)[0] is NodeKind.OTHER
    r, w = os.pipe()
    c.fds += [r, w]
    with pytest.raises(PassThrough):
        c.ioctl(r, uapi.VFIO_DEVICE_GET_INFO)
    assert c.err(999_999, uapi.VFIO_DEVICE_GET_INFO) == errno.EBADF
    info = c.open(env.mount / "devices" / "gpu0" / "info", os.O_RDONLY)
    assert c.err(info, uapi.VFIO_GET_API_VERSION) == errno.ENOTTY  # on the mount, not a node


def test_bind_iommufd_argsz_errno_order_and_no_side_effect_on_fault(env: Env) -> None:
    c = env.caller
    dev, iommu = c.open(env.cdev), c.open(env.mount / "dev" / "iommu")
    r, w = os.pipe()
    c.fds += [r, w]
    bind = uapi.VFIO_DEVICE_BIND_IOMMUFD
    assert c.err(dev, uapi.VFIO_DEVICE_GET_INFO, struct.pack("<I", 24)) == errno.EINVAL  # unbound
    # argsz < 16 is EINVAL before the iommufd is looked at (999999: not open, would be EBADF)
    assert c.err(dev, bind, struct.pack("<IIiI", 15, 0, 999_999, 0)) == errno.EINVAL
    assert c.err(dev, bind, struct.pack("<IIiI", 16, 1, iommu, 0)) == errno.EINVAL  # flags
    assert c.err(dev, bind, struct.pack("<IIiI", 16, 0, -1, 0)) == errno.EINVAL
    assert c.err(dev, bind, struct.pack("<IIiI", 16, 0, 999_999, 0)) == errno.EBADF
    assert c.err(dev, bind, struct.pack("<IIiI", 16, 0, r, 0)) == errno.EBADFD  # not an iommufd
    assert c.err(dev, bind, 0xFFF8) == errno.EFAULT  # the struct runs off the memory
    # out_devid not writable: EFAULT, and the cdev stays unbound
    c.mem.buf[RO : RO + 16] = struct.pack("<IIiI", 16, 0, iommu, 0)
    assert c.err(dev, bind, RO) == errno.EFAULT
    assert c.err(dev, uapi.VFIO_DEVICE_GET_INFO, struct.pack("<I", 24)) == errno.EINVAL
    devid = _bind(c, dev, iommu)
    assert devid > 0
    assert c.err(dev, bind, struct.pack("<IIiI", 16, 0, iommu, 0)) == errno.EINVAL  # bound
    # a dup is the same open file: bound too (Rule 2)
    dup = os.dup(dev)
    c.fds.append(dup)
    assert c.ioctl(dup, uapi.VFIO_DEVICE_GET_INFO, struct.pack("<I", 24) + bytes(20)) == 0


def test_attach_and_iommufd_ioctls_check_size_before_flags(env: Env) -> None:
    c = env.caller
    dev, iommu = c.open(env.cdev), c.open(env.mount / "dev" / "iommu")
    devid = _bind(c, dev, iommu)
    alloc = uapi.IOMMU_IOAS_ALLOC
    assert c.err(iommu, alloc, struct.pack("<III", 11, 1, 0)) == errno.EINVAL  # size first
    assert c.err(iommu, alloc, struct.pack("<III", 12, 1, 0)) == errno.EOPNOTSUPP
    next_id = c.vfio.next_id
    c.mem.buf[RO : RO + 12] = struct.pack("<III", 12, 0, 0)
    assert c.err(iommu, alloc, RO) == errno.EFAULT  # out_ioas_id read-only: no IOAS made
    assert c.vfio.next_id == next_id
    assert c.ioctl(iommu, alloc, struct.pack("<III", 12, 0, 0)) == 0
    (ioas,) = c.out(8, "<I")
    assert ioas == next_id
    attach = uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    assert c.err(dev, attach, struct.pack("<III", 11, 0, ioas)) == errno.EINVAL
    assert c.err(dev, attach, struct.pack("<III", 12, 1, ioas)) == errno.EINVAL  # PASID flag
    assert c.err(dev, attach, struct.pack("<III", 12, 0, 0xFFFF_FFFF)) == errno.ENOENT
    assert c.ioctl(dev, attach, struct.pack("<III", 12, 0, ioas)) == 0
    # HWPT_ALLOC: a refused allocation uses no id; the HWPT gets the next one
    hwpt = iommufd.HWPT_ALLOC
    before = c.vfio.next_id
    refused = hwpt.pack(hwpt.size, 0, devid + 1000, ioas, 0, 0, 0, 0, 0, 0, 0)
    assert c.err(iommu, uapi.IOMMU_HWPT_ALLOC, refused) == errno.ENOENT  # no such device
    short = hwpt.pack(23, 0, devid, ioas, 0, 0, 0, 0, 0, 0, 0)  # the kernel needs 24
    assert c.err(iommu, uapi.IOMMU_HWPT_ALLOC, short) == errno.EINVAL
    assert c.vfio.next_id == before
    ok = hwpt.pack(24, 0, devid, ioas, 0, 0, 0, 0, 0, 0, 0)  # an older, shorter struct works
    assert c.ioctl(iommu, uapi.IOMMU_HWPT_ALLOC, ok) == 0
    assert c.out(16, "<I") == (before,)
    # the HWPT holds the IOAS; the attached device holds the HWPT
    assert c.ioctl(dev, attach, struct.pack("<III", 12, 0, before)) == 0
    destroy = uapi.IOMMU_DESTROY
    assert c.err(iommu, destroy, struct.pack("<II", 7, before)) == errno.EINVAL
    assert c.err(iommu, destroy, struct.pack("<II", 8, ioas)) == errno.EBUSY
    assert c.err(iommu, destroy, struct.pack("<II", 8, before)) == errno.EBUSY
    assert c.ioctl(dev, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, struct.pack("<II", 8, 0)) == 0
    assert c.ioctl(iommu, destroy, struct.pack("<II", 8, before)) == 0
    assert c.ioctl(iommu, destroy, struct.pack("<II", 8, ioas)) == 0
    assert c.err(iommu, destroy, struct.pack("<II", 8, ioas)) == errno.ENOENT
    assert c.err(iommu, 0x3B00 + 0x90) == errno.ENOTTY  # in the range, no such ioctl


def test_device_info_argsz_is_honoured(env: Env) -> None:
    c = env.caller
    dev, _iommu, _ioas = _bound(env)
    info = uapi.VFIO_DEVICE_GET_INFO
    assert c.err(dev, info, struct.pack("<I", 15)) == errno.EINVAL
    assert c.err(dev, info, 0) == errno.EFAULT
    c.mem.buf[ARG + 20 : ARG + 24] = b"\xde\xad\xbe\xef"
    assert c.ioctl(dev, info, struct.pack("<I", 20)) == 0  # the 24-byte struct is not overrun
    assert c.out(0, "<IIII") == (
        20,
        uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET,
        uapi.VFIO_PCI_NUM_REGIONS,
        uapi.VFIO_PCI_NUM_IRQS,
    )
    assert bytes(c.mem.buf[ARG + 20 : ARG + 24]) == b"\xde\xad\xbe\xef"
    region = uapi.VFIO_DEVICE_GET_REGION_INFO
    assert c.err(dev, region, uapi.REGION_INFO.pack(31, 0, 0, 0, 0, 0)) == errno.EINVAL
    assert c.err(dev, region, uapi.REGION_INFO.pack(32, 0, 9, 0, 0, 0)) == errno.EINVAL
    config = uapi.VFIO_PCI_CONFIG_REGION_INDEX
    assert c.ioctl(dev, region, uapi.REGION_INFO.pack(32, 0, config, 0, 0, 0)) == 0
    assert c.out(16, "<QQ") == (256, uapi.region_offset(config))
    irq = uapi.VFIO_DEVICE_GET_IRQ_INFO
    assert c.err(dev, irq, uapi.IRQ_INFO.pack(15, 0, 0, 0)) == errno.EINVAL
    assert c.err(dev, irq, uapi.IRQ_INFO.pack(16, 0, 5, 0)) == errno.EINVAL
    assert c.ioctl(dev, irq, uapi.IRQ_INFO.pack(16, 0, uapi.VFIO_PCI_MSIX_IRQ_INDEX, 7)) == 0
    assert c.out(12, "<I") == (4,)  # the ram driver's MSI-X vectors
    assert c.err(dev, uapi.VFIO_MIG_GET_PRECOPY_INFO) == errno.ENOTTY  # not on a device fd


@BOTH_PATHS
def test_device_feature_errno_order(env: Env, channel: bool) -> None:
    c = env.caller
    c.vfio.nodes.use_channel = channel
    dev, _iommu, _ioas = _bound(env)
    feat = uapi.VFIO_DEVICE_FEATURE
    mig, state = uapi.VFIO_DEVICE_FEATURE_MIGRATION, uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE

    def err(argsz: int, flags: int) -> int:
        return c.err(dev, feat, struct.pack("<IIQ", argsz, flags, 0))

    assert err(7, 1 << 31 | F_GET | F_SET | 99) == errno.EINVAL  # argsz first
    assert err(16, 1 << 31 | 99) == errno.EINVAL  # unknown flag bits before the feature
    assert err(16, F_GET | F_SET | 99) == errno.EINVAL  # GET and SET before the feature
    assert err(16, F_GET | 99) == errno.ENOTTY
    assert err(16, F_SET | mig) == errno.EINVAL  # MIGRATION has no SET
    assert c.ioctl(dev, feat, struct.pack("<II", 8, F_PROBE | F_GET | mig)) == 0  # no payload
    assert err(16, mig) == errno.EINVAL  # neither GET nor SET
    assert err(15, F_GET | mig) == errno.EINVAL  # payload below the minimum
    assert c.err(dev, feat, PAYLOAD + 0xF000) == errno.EFAULT
    assert c.ioctl(dev, feat, struct.pack("<IIQ", 16, F_GET | mig, 0)) == 0
    assert c.out(8, "<Q") == (7,)  # STOP_COPY | P2P | PRE_COPY
    # GET MIG_DEVICE_STATE into read-only memory: EFAULT, nothing changed
    c.mem.buf[RO : RO + 16] = struct.pack("<IIIi", 16, F_GET | state, 0, 0)
    assert c.err(dev, feat, RO) == errno.EFAULT
    assert c.ioctl(dev, feat, struct.pack("<IIIi", 16, F_GET | state, 0, 0)) == 0
    assert c.out(8, "<Ii") == (uapi.VFIO_DEVICE_STATE_RUNNING, -1)


def test_device_feature_header_at_the_end_of_memory_is_read_alone(env: Env) -> None:
    """A header whose next 8 bytes are unmapped: PROBE works, a payload access is EFAULT."""
    c = env.caller
    dev, _iommu, _ioas = _bound(env)
    feat = uapi.VFIO_DEVICE_FEATURE
    mig, state = uapi.VFIO_DEVICE_FEATURE_MIGRATION, uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    last = len(c.mem.buf) - 8  # the last 8 mapped bytes

    def at_end(argsz: int, flags: int) -> int | None:
        c.mem.buf[last:] = struct.pack("<II", argsz, flags)
        return c.ioctl(dev, feat, last)

    assert at_end(8, F_PROBE | F_GET | mig) == 0
    assert at_end(16, F_PROBE | F_SET | state) == 0
    for flags in (F_GET | state, F_SET | state):
        with pytest.raises(IoctlError) as fault:
            at_end(16, flags)
        assert fault.value.errno == errno.EFAULT
    assert c.ioctl(dev, feat, struct.pack("<IIIi", 16, F_GET | state, 0, 0)) == 0
    assert c.out(8, "<Ii") == (uapi.VFIO_DEVICE_STATE_RUNNING, -1)  # nothing changed


@BOTH_PATHS
def test_set_state_opens_a_data_fd_and_precopy_info_checks(env: Env, channel: bool) -> None:
    c = env.caller
    c.vfio.nodes.use_channel = channel
    dev, _iommu, _ioas = _bound(env)
    feat = uapi.VFIO_DEVICE_FEATURE
    state = uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    state_file = env.mount / "devices" / "gpu0" / "migration" / "state"
    # SET with the payload read-only: EFAULT before the state changed
    c.mem.buf[RO : RO + 16] = struct.pack("<IIIi", 16, F_SET | state, 6, 0)
    assert c.err(dev, feat, RO) == errno.EFAULT
    assert state_file.read_text().strip() == "RUNNING"
    pre_copy = uapi.VFIO_DEVICE_STATE_PRE_COPY
    assert c.ioctl(dev, feat, struct.pack("<IIIi", 16, F_SET | state, pre_copy, 0)) == 0
    assert state_file.read_text().strip() == "PRE_COPY"
    ((data, send),) = c.installed
    assert not send  # the ioctl returns 0; the fd is in the payload
    assert c.out(8, "<Ii") == (pre_copy, data)
    precopy = uapi.VFIO_MIG_GET_PRECOPY_INFO
    assert c.err(data, precopy, uapi.PRECOPY_INFO.pack(23, 0, 0, 0)) == errno.EINVAL
    assert c.err(data, uapi.VFIO_DEVICE_GET_INFO) == errno.ENOTTY
    assert c.ioctl(data, precopy, uapi.PRECOPY_INFO.pack(24, 0, 0, 0)) == 0
    assert c.out(8, "<Q")[0] > 0  # initial_bytes
    # ERROR cannot be requested: the state file's errno, no fd
    error = uapi.VFIO_DEVICE_STATE_ERROR
    assert c.err(dev, feat, struct.pack("<IIIi", 16, F_SET | state, error, 0)) == errno.EINVAL
    assert c.out(8, "<Ii") == (error, -1)
    # reset ends the session: the old data_fd is dead even in a new PRE_COPY
    assert c.ioctl(dev, uapi.VFIO_DEVICE_RESET) == 0
    assert c.ioctl(dev, feat, struct.pack("<IIIi", 16, F_SET | state, pre_copy, 0)) == 0
    assert c.err(data, precopy, uapi.PRECOPY_INFO.pack(24, 0, 0, 0)) == errno.ENODEV


@BOTH_PATHS
def test_set_state_ends_the_session_of_a_held_data_fd_without_reading_state_otherwise(
    env: Env, channel: bool
) -> None:
    """SET reads the state before only when the arcs can matter; a held data_fd's do."""
    c = env.caller
    c.vfio.nodes.use_channel = channel
    dev, _iommu, _ioas = _bound(env)
    feat, state = uapi.VFIO_DEVICE_FEATURE, uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    state_file = env.mount / "devices" / "gpu0" / "migration" / "state"

    def set_state(target: int) -> tuple[int, ...]:
        assert c.ioctl(dev, feat, struct.pack("<IIIi", 16, F_SET | state, target, 7)) == 0
        return c.out(8, "<Ii")

    # no session: RUNNING <-> STOP answer {target, -1} and move the device
    assert set_state(uapi.VFIO_DEVICE_STATE_STOP) == (uapi.VFIO_DEVICE_STATE_STOP, -1)
    assert state_file.read_text().strip() == "STOP"
    assert set_state(uapi.VFIO_DEVICE_STATE_RUNNING) == (uapi.VFIO_DEVICE_STATE_RUNNING, -1)
    assert state_file.read_text().strip() == "RUNNING"
    pre_copy = uapi.VFIO_DEVICE_STATE_PRE_COPY
    _, data = set_state(pre_copy)
    assert data >= 0
    # PRE_COPY -> RUNNING ends the session of the held data_fd ...
    assert set_state(uapi.VFIO_DEVICE_STATE_RUNNING) == (uapi.VFIO_DEVICE_STATE_RUNNING, -1)
    # ... so even in a PRE_COPY the supervisor did not make, that fd is dead
    state_file.write_text("PRE_COPY\n")
    precopy = uapi.VFIO_MIG_GET_PRECOPY_INFO
    assert c.err(data, precopy, uapi.PRECOPY_INFO.pack(24, 0, 0, 0)) == errno.ENODEV


def _resolves(path: Path) -> bool:
    """Whether a path walk finds ``path`` (from the kernel's dentry cache where it can)."""
    try:
        file_id(os.fsencode(path), cached=True)
    except FileNotFoundError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_kept_state_file_follows_a_removed_and_recreated_device(env: Env) -> None:
    """The kept-open ``migration/state`` fd is checked by inode on every use (statx).

    The check sees what a path lookup sees: a removal once the mount's entry
    invalidation has reached the kernel, a re-created device as a new inode.
    """
    nodes = env.caller.vfio.nodes
    nodes.use_channel = False
    device = env.mount / "devices" / "gpu0"
    (device / "migration" / "state").write_text("STOP\n")
    assert nodes.state("gpu0").name == "STOP"  # opens and keeps the fd
    nodes.write_text("gpu0", ("migration", "state"), "RUNNING\n")
    assert nodes.state("gpu0").name == "RUNNING"
    nodes.write_text("gpu0", ("migration", "state"), "STOP\n")
    (device / "remove").write_text("1\n")
    # The mount invalidates the removed entries asynchronously (invalidate_entry_async);
    # until that lands the kernel's dentry cache still resolves the path. Wait for the
    # path walk itself (what the supervisor's statx sees), not for os.stat: that one
    # fails earlier, on the removed inode's GETATTR, while the dentry still resolves.
    state_path = device / "migration" / "state"
    assert wait_until(lambda: not _resolves(state_path)), "the removal never reached the kernel"
    with pytest.raises(IoctlError) as gone:
        nodes.state("gpu0")
    assert gone.value.errno == errno.ENOENT  # as an open of the path would say
    (env.mount / "drivers" / "ram" / "create").write_text("gpu0 size=4K\n")
    assert wait_until(lambda: _resolves(state_path)), "the new device never reached the kernel"
    assert nodes.state("gpu0").name == "RUNNING"  # the new device, not the old fd's
    nodes.write_text("gpu0", ("migration", "state"), "STOP\n")
    assert (device / "migration" / "state").read_text().strip() == "STOP"


def test_legacy_container_and_group_errno_order(env: Env) -> None:
    c = env.caller
    container = c.open(env.mount / "dev" / "vfio" / "vfio")
    group = c.open(env.group)
    r, w = os.pipe()
    c.fds += [r, w]
    assert c.ioctl(container, uapi.VFIO_GET_API_VERSION) == uapi.VFIO_API_VERSION
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) == 1
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, 99) == 0
    # UPDATE_VADDR and DMA_CC ask the type1 IOMMU, which exists only after SET_IOMMU
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_UPDATE_VADDR) == 0
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_UNMAP_ALL) == 1
    status = uapi.VFIO_GROUP_GET_STATUS
    assert c.err(group, status, uapi.GROUP_STATUS.pack(7, 0)) == errno.EINVAL
    assert c.ioctl(group, status, uapi.GROUP_STATUS.pack(8, 0)) == 0
    assert c.out(4, "<I") == (uapi.VFIO_GROUP_FLAGS_VIABLE,)
    c.mem.buf[NAME : NAME + 5] = b"gpu0\0"
    get_fd = uapi.VFIO_GROUP_GET_DEVICE_FD
    assert c.err(group, get_fd, NAME) == errno.EINVAL  # no container yet
    set_iommu = uapi.VFIO_SET_IOMMU
    assert c.err(container, set_iommu, uapi.VFIO_TYPE1v2_IOMMU) == errno.EINVAL  # no group
    set_container = uapi.VFIO_GROUP_SET_CONTAINER
    assert c.err(group, set_container, struct.pack("<i", -1)) == errno.EINVAL
    assert c.err(group, set_container, struct.pack("<i", r)) == errno.EBADFD
    assert c.err(group, set_container, struct.pack("<i", 999_999)) == errno.EBADF
    assert c.ioctl(group, set_container, struct.pack("<i", container)) == 0
    assert c.err(group, set_container, struct.pack("<i", container)) == errno.EINVAL
    assert c.err(group, get_fd, NAME) == errno.EINVAL  # container without an IOMMU
    assert c.err(container, uapi.VFIO_IOMMU_MAP_DMA) == errno.EINVAL
    assert c.err(container, set_iommu, 99) == errno.ENODEV
    assert c.ioctl(container, set_iommu, uapi.VFIO_TYPE1v2_IOMMU) == 0
    assert c.err(container, set_iommu, uapi.VFIO_TYPE1v2_IOMMU) == errno.EINVAL  # already set
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_UPDATE_VADDR) == 1
    assert c.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 1
    rw = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
    dma_map = uapi.IOMMU_TYPE1_DMA_MAP.pack(32, rw, 0x7F00_0000_0000, 0x100000, 0x2000)
    assert c.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, dma_map) == 0
    c.mem.buf[NAME + 0x100 : NAME + 0x105] = b"gpu9\0"
    assert c.err(group, get_fd, NAME + 0x100) == errno.ENODEV
    c.mem.buf[0xFFFE:] = b"gp"  # no NUL before the end of the memory: the next page faults
    assert c.err(group, get_fd, 0xFFFE) == errno.EFAULT
    assert c.ioctl(group, get_fd, NAME) is None  # ADDFD answered it with the new fd
    ((device, send),) = c.installed
    assert send
    # the group's device fd is bound already: no BIND, ioctls work at once
    assert c.ioctl(device, uapi.VFIO_DEVICE_GET_INFO, struct.pack("<I", 24)) == 0
    rebind = struct.pack("<IIiI", 16, 0, 0, 0)
    assert c.err(device, uapi.VFIO_DEVICE_BIND_IOMMUFD, rebind) == errno.EINVAL
    assert c.ioctl(group, status, uapi.GROUP_STATUS.pack(8, 0)) == 0
    assert c.out(4, "<I") == (uapi.VFIO_GROUP_FLAGS_VIABLE | uapi.VFIO_GROUP_FLAGS_CONTAINER_SET,)
    assert c.ioctl(group, uapi.VFIO_GROUP_UNSET_CONTAINER) == 0
    assert c.err(group, uapi.VFIO_GROUP_UNSET_CONTAINER) == errno.EINVAL


def test_iommufd_object_ioctls_through_dispatch_keep_the_kernel_order(env: Env) -> None:
    c = env.caller
    _dev, iommu, ioas = _bound(env)
    ioas_map = uapi.IOMMU_IOAS_MAP
    fixed = iommufd.IOMMU_IOAS_MAP_FIXED_IOVA | iommufd.IOMMU_IOAS_MAP_READABLE

    def map_(size: int, flags: int, ioas_id: int, reserved: int = 0, iova: int = 0) -> int:
        packed = iommufd.IOAS_MAP.pack(
            size, flags, ioas_id, reserved, 0x7F00_0000_0000, 0x2000, iova
        )
        return c.err(iommu, ioas_map, packed)

    assert map_(39, 1 << 9, ioas + 99) == errno.EINVAL  # size before flags before the IOAS
    assert map_(40, 1 << 9, ioas + 99) == errno.EOPNOTSUPP
    assert map_(40, fixed, ioas, reserved=1) == errno.EOPNOTSUPP
    assert map_(40, fixed, ioas + 99) == errno.ENOENT
    assert map_(40, fixed, ioas, iova=0x1001) == errno.EINVAL  # not aligned
    packed = iommufd.IOAS_MAP.pack(40, fixed, ioas, 0, 0x7F00_0000_0000, 0x2000, 0x10000)
    c.mem.buf[RO : RO + 40] = packed
    assert c.err(iommu, ioas_map, RO) == errno.EFAULT  # the iova write faults: nothing mapped
    assert c.ioctl(iommu, ioas_map, packed) == 0
    assert map_(40, fixed, ioas, iova=0x11000) == errno.EEXIST
    ranges = uapi.IOMMU_IOAS_IOVA_RANGES
    assert c.err(iommu, ranges, iommufd.IOAS_IOVA_RANGES.pack(31, ioas, 0, 0, 0, 0)) == (
        errno.EINVAL
    )
    assert c.err(iommu, ranges, iommufd.IOAS_IOVA_RANGES.pack(32, ioas, 0, 0, 0, 0)) == (
        errno.EMSGSIZE
    )
    assert c.out(8, "<I") == (1,)  # how many ranges there are, written before EMSGSIZE
    unmap = uapi.IOMMU_IOAS_UNMAP
    assert c.err(iommu, unmap, iommufd.IOAS_UNMAP.pack(23, ioas, 0x10000, 0x2000)) == errno.EINVAL
    # cutting an area: ENOENT, as iopt_unmap_iova_range answers it
    assert c.err(iommu, unmap, iommufd.IOAS_UNMAP.pack(24, ioas, 0x10000, 0x1000)) == errno.ENOENT
    assert c.ioctl(iommu, unmap, iommufd.IOAS_UNMAP.pack(24, ioas, 0x10000, 0x2000)) == 0
    assert c.out(16, "<Q") == (0x2000,)
    assert c.err(iommu, unmap, iommufd.IOAS_UNMAP.pack(24, ioas, 0x10000, 0x2000)) == errno.ENOENT
    hw_info = uapi.IOMMU_GET_HW_INFO
    assert c.err(iommu, hw_info, iommufd.HW_INFO.pack(31, 1, 0, 0, 0, 0, 0, 0)) == errno.EINVAL
    assert c.err(iommu, hw_info, iommufd.HW_INFO.pack(40, 1, 0, 0, 0, 0, 0, 0)) == errno.EOPNOTSUPP
    assert c.err(iommu, hw_info, iommufd.HW_INFO.pack(40, 0, 0, 0, 0, 0, 0, 0)) == errno.ENOENT
    option = uapi.IOMMU_OPTION
    huge = iommufd.IOMMU_OPTION_HUGE_PAGES
    get = iommufd.IOMMU_OPTION_OP_GET
    assert c.err(iommu, option, iommufd.OPTION.pack(23, huge, get, 0, ioas, 0)) == errno.EINVAL
    assert c.err(iommu, option, iommufd.OPTION.pack(24, huge, 7, 0, ioas, 0)) == errno.EOPNOTSUPP
    assert c.ioctl(iommu, option, iommufd.OPTION.pack(24, huge, get, 0, ioas, 0)) == 0
    assert c.out(16, "<Q") == (1,)
    # another /dev/iommu open file has none of these objects
    other = c.open(env.mount / "dev" / "iommu")
    packed = iommufd.IOAS_MAP.pack(40, fixed, ioas, 0, 0x7F00_0000_0000, 0x2000, 0x80000)
    assert c.err(other, ioas_map, packed) == errno.ENOENT


# -- IOMMU dirty tracking through the real ioctl path (tests/c/iommu_dirty.c) ----------------------
IOMMU_C = Path(__file__).resolve().parents[2] / "c" / "iommu_dirty.c"


@pytest.fixture(scope="module")
def iommu_dirty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = None
    if os.geteuid() != 0:
        reason = "fakevfio run needs root (mount namespace, pidfd_getfd)"
    elif shutil.which("gcc") is None:
        reason = "gcc is missing"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("c") / "iommu_dirty"
    subprocess.run(["gcc", "-Wall", "-Werror", "-O1", "-o", str(exe), str(IOMMU_C)], check=True)
    return exe


def _run_c(mount: Path, *argv: str) -> dict[str, str]:
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount), "--", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def _dma_info(mount: Path) -> dict[str, object]:
    info = json.loads((mount / "devices" / "d0" / "info").read_text())
    dma = info["dma"]
    assert isinstance(dma, dict)
    return dma


DMA_DEVICE = "d0=ram:size=64K,dma_rate=200K,seed=3"


def test_iommufd_dirty_bitmap_is_what_the_device_wrote(
    iommu_dirty: Path, fakevfio_mount: MountFactory
) -> None:
    e = {name: str(getattr(errno, name)) for name in ("EEXIST", "EINVAL", "EOPNOTSUPP", "ENOENT")}
    with fakevfio_mount([DMA_DEVICE]) as m:
        r = _run_c(m.path, str(iommu_dirty), "iommufd", "/dev/vfio/devices/vfio0")
        for key in ("bind", "hw_info", "ioas_alloc", "hwpt_plain", "hwpt_dirty", "attach", "map"):
            assert r[key] == "0", key
        assert r["hw_caps"] == "1"  # IOMMU_HW_CAP_DIRTY_TRACKING
        assert (r["map_overlap"], r["map_unaligned"]) == (e["EEXIST"], e["EINVAL"])
        assert r["set_dirty_plain"] == e["EOPNOTSUPP"]  # HWPT without ALLOC_DIRTY_TRACKING
        assert r["set_dirty"] == "0"
        assert (r["bitmap_page0"], r["bitmap_unaligned"], r["bitmap_hole"]) == (e["EINVAL"],) * 3
        assert r["bitmap_plain"] == e["EOPNOTSUPP"]
        changed = int(r["changed"], 16)
        assert changed, "the device wrote no page of the mapped buffer"
        # every page the device wrote, and only those (our DMA changes each page it writes)
        assert int(r["dirty_noclear"], 16) == changed
        assert int(r["dirty"], 16) == changed  # NO_CLEAR kept them for this read
        assert int(r["dirty_again"], 16) == 0  # that read cleared them
        assert r["unmap_cut"] == e["ENOENT"]
        assert (r["unmap"], r["unmapped"]) == ("0", str(64 * 4096))
        dma = _dma_info(m.path)
        assert dma["mappings"] == 0  # the unmap reached the device
        assert isinstance(dma["bytes_written"], int)
        assert dma["bytes_written"] >= changed.bit_count() * 4096


def test_iommufd_dirty_bitmap_shows_a_lossy_tracker(
    iommu_dirty: Path, fakevfio_mount: MountFactory
) -> None:
    with fakevfio_mount([DMA_DEVICE]) as m:
        (m.path / "devices" / "d0" / "faults").write_text("dirty lose 100\n")
        r = _run_c(m.path, str(iommu_dirty), "iommufd", "/dev/vfio/devices/vfio0")
        assert int(r["changed"], 16)
        assert int(r["dirty"], 16) == 0  # the comparison above can fail


def test_type1_dirty_pages_are_what_the_device_wrote(
    iommu_dirty: Path, fakevfio_mount: MountFactory
) -> None:
    with fakevfio_mount([DMA_DEVICE]) as m:
        info = json.loads((m.path / "devices" / "d0" / "info").read_text())
        group = f"/dev/vfio/{info['iommu_group']}"
        r = _run_c(m.path, str(iommu_dirty), "type1", group, "d0")
        for key in ("set_container", "set_iommu", "get_info", "get_info2", "device_fd", "map"):
            assert r[key] == "0", key
        # vfio_iommu_type1_get_info: the caller learns argsz; caps migration, DMA avail, IOVA
        assert (r["info_argsz"], r["info_flags"]) == ("104", "3")
        assert r["iova_pgsizes"] == "fffffffffffff000"
        assert (r["cap_2_version"], r["cap_3_version"], r["cap_1_version"]) == ("1", "1", "1")
        assert (r["mig_pgsize"], r["mig_max_bitmap"]) == ("1000", str(256 << 20))
        assert r["dma_avail"] == "65535"
        assert (r["nr_iovas"], r["iova_end"]) == ("1", "ffffffffffffffff")
        assert (r["map_overlap"], r["map_unaligned"]) == (str(errno.EEXIST), str(errno.EINVAL))
        assert r["dirty_start"] == "0"
        assert (r["bitmap_pgsize"], r["bitmap_cut"]) == (str(errno.EINVAL), str(errno.EINVAL))
        assert r["bitmap"] == "0"
        changed = int(r["changed"], 16)
        assert changed
        assert int(r["dirty"], 16) == changed
        assert r["unmap_split"] == str(errno.EINVAL)
        assert (r["unmap_bitmap"], r["unmapped"]) == ("0", str(64 * 4096))
        assert int(r["changed2"], 16)
        assert int(r["dirty2"], 16) == int(r["changed2"], 16)  # the bitmap read had cleared
        assert _dma_info(m.path)["mappings"] == 0


def test_iommufd_maps_reach_the_device_dma_file(env: Env) -> None:
    c = env.caller
    dev, iommu, ioas = _bound(env)
    rw = iommufd.IOMMU_IOAS_MAP_READABLE | iommufd.IOMMU_IOAS_MAP_WRITEABLE
    fixed = iommufd.IOMMU_IOAS_MAP_FIXED_IOVA | rw
    packed = iommufd.IOAS_MAP.pack(40, fixed, ioas, 0, 0x7F00_0000_0000, 0x2000, 0x10000)
    assert c.ioctl(iommu, uapi.IOMMU_IOAS_MAP, packed) == 0
    dma = env.mount / "devices" / "gpu0" / "dma"
    assert f"map 0x10000 0x2000 {os.getpid()} 0x7f0000000000 rw" in dma.read_text()
    # the device is bound again through another iommufd (the first one's fds were closed):
    # the stale attachment is dropped, so the new IOAS's maps do not collide with the old
    dev2, iommu2 = c.open(env.cdev), c.open(env.mount / "dev" / "iommu")
    _bind(c, dev2, iommu2)
    assert c.ioctl(iommu2, uapi.IOMMU_IOAS_ALLOC, struct.pack("<III", 12, 0, 0)) == 0
    (ioas2,) = c.out(8, "<I")
    packed = iommufd.IOAS_MAP.pack(40, fixed, ioas2, 0, 0x7E00_0000_0000, 0x1000, 0x10000)
    assert c.ioctl(iommu2, uapi.IOMMU_IOAS_MAP, packed) == 0
    attach = uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    assert c.ioctl(dev2, attach, struct.pack("<III", 12, 0, ioas2)) == 0
    text = dma.read_text()
    assert f"map 0x10000 0x1000 {os.getpid()} 0x7e0000000000 rw" in text
    assert "0x7f0000000000" not in text
    # bound again through the same iommufd: the older device id's attachment goes too
    dev3 = c.open(env.cdev)
    _bind(c, dev3, iommu2)
    assert c.ioctl(dev3, attach, struct.pack("<III", 12, 0, ioas2)) == 0
    assert dma.read_text().count("map 0x10000 0x1000") == 1
    assert c.ioctl(dev3, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, struct.pack("<II", 8, 0)) == 0
    assert "map " not in dma.read_text()
    assert dev  # the first binding's fd stays open, its attachment is gone


def test_a_mapping_belongs_to_the_thread_group() -> None:
    import threading

    from fakevfio._run._caller import thread_group

    tids: list[int] = []
    done = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        done.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    while not tids:
        time.sleep(0.01)
    try:
        assert tids[0] != os.getpid()
        assert thread_group(tids[0]) == os.getpid()  # /proc/TID/status Tgid
    finally:
        done.set()
        t.join()
    call = Call(
        pid=tids[0],
        fd=0,
        request=0,
        arg=0,
        mem=Mem(),
        install_fd=lambda fd, s: fd,
        check_alive=lambda: None,
        tgid=os.getpid(),
    )
    assert call.process == os.getpid()


def test_type1_container_pushes_to_its_groups_devices(env: Env) -> None:
    c = env.caller
    container = c.open(env.mount / "dev" / "vfio" / "vfio")
    group = c.open(env.group)
    assert c.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", container)) == 0
    assert c.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) == 0
    rw = uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE
    dma_map = uapi.IOMMU_TYPE1_DMA_MAP.pack(32, rw, 0x7F00_0000_0000, 0x100000, 0x2000)
    assert c.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, dma_map) == 0
    dma = env.mount / "devices" / "gpu0" / "dma"
    assert f"map 0x100000 0x2000 {os.getpid()} 0x7f0000000000 rw" in dma.read_text()
    start = uapi.IOMMU_TYPE1_DIRTY_BITMAP.pack(8, uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    assert c.ioctl(container, uapi.VFIO_IOMMU_DIRTY_PAGES, start) == 0
    assert "dirty type1 on" in dma.read_text()
    # the group leaves: its device loses the container's mappings and tracker
    assert c.ioctl(group, uapi.VFIO_GROUP_UNSET_CONTAINER) == 0
    text = dma.read_text()
    assert "map " not in text
    assert "dirty type1 off" in text
    # the IOMMU went with the last group
    assert c.err(container, uapi.VFIO_IOMMU_GET_INFO, struct.pack("<I", 24)) == errno.EINVAL


def test_a_threads_files_are_copied_through_its_process(env: Env) -> None:
    import threading

    tids: list[int] = []
    done = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        done.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    while not tids:
        time.sleep(0.01)
    try:
        fd = env.caller.open(env.cdev)
        files = HeldFiles(os.stat(env.mount).st_dev)
        try:
            # a vCPU or migration thread's ioctl: pidfd_open(TID) fails before Linux 6.9
            entry = files.entry(tids[0], fd, os.fstat(fd).st_ino, NodeKind.CDEV, "gpu0")
            assert os.path.samestat(os.fstat(entry.held), os.fstat(fd))
        finally:
            files.close()
    finally:
        done.set()
        t.join()


def test_closed_files_found_by_the_held_file_scan_drop_their_mappings(env: Env) -> None:
    c = env.caller
    dev, iommu, ioas = _bound(env)
    fixed = iommufd.IOMMU_IOAS_MAP_FIXED_IOVA | iommufd.IOMMU_IOAS_MAP_READABLE
    packed = iommufd.IOAS_MAP.pack(40, fixed, ioas, 0, 0x7F00_0000_0000, 0x2000, 0x10000)
    assert c.ioctl(iommu, uapi.IOMMU_IOAS_MAP, packed) == 0
    dma = env.mount / "devices" / "gpu0" / "dma"
    assert "map 0x10000" in dma.read_text()
    # the scan ignores the supervisor's own process (here: this one): other processes hold them
    holders = [subprocess.Popen(["sleep", "60"], pass_fds=[fd]) for fd in (dev, iommu)]
    try:
        c.vfio.files.collect()
        assert "map 0x10000" in dma.read_text()  # both still open somewhere
        holders[1].kill()  # the iommufd closed; the bound cdev keeps its context
        holders[1].wait()
        c.vfio.files.collect()
        assert "map 0x10000" in dma.read_text()
        holders[0].kill()  # the cdev closed: unbound, its mappings gone
        holders[0].wait()
        c.vfio.files.collect()
        assert "map " not in dma.read_text()
        assert c.vfio.files.files == []
    finally:
        for p in holders:
            p.kill()
            p.wait()


def test_the_channel_follows_a_removed_and_recreated_device_at_once(env: Env) -> None:
    """Through the channel a removal is ENOENT at once (no dentry cache in between)."""
    nodes = env.caller.vfio.nodes
    device = env.mount / "devices" / "gpu0"
    nodes.write_text("gpu0", ("migration", "state"), "STOP\n")
    assert nodes.state("gpu0").name == "STOP"
    assert nodes._channel is not None  # the channel answered, not the file
    (device / "remove").write_text("1\n")
    for request in (
        lambda: nodes.state("gpu0"),
        lambda: nodes.write_text("gpu0", ("migration", "state"), "RUNNING\n"),
    ):
        with pytest.raises(IoctlError) as gone:
            request()
        assert gone.value.errno == errno.ENOENT  # as an open of the path would say
        assert "gpu0" in gone.value.detail
    (env.mount / "drivers" / "ram" / "create").write_text("gpu0 size=4K\n")
    assert nodes.state("gpu0").name == "RUNNING"  # the new device, at once too
    nodes.write_text("gpu0", ("migration", "state"), "STOP\n")
    state_path = device / "migration" / "state"
    assert wait_until(lambda: _resolves(state_path)), "the new device never reached the kernel"
    assert state_path.read_text().strip() == "STOP"
