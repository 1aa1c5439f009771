"""The pyfuse3 adapter: serves a :class:`fakevfio._tree.Tree` as a FUSE filesystem.

This is the only module that imports pyfuse3. Handlers resolve the inode or
handle, run the tree's synchronous method in a worker thread (device locks may
be held for a long time, e.g. while ``info`` hashes gigabytes), wait out the
time the core asks for (``migration/data``: until the reply's deadline counted
from the request's arrival, so emulated bandwidth is a pace; control files: an
injected delay after the work), and translate errors: only :class:`pyfuse3.FUSEError` ever
leaves a handler, and anything unexpected is logged and becomes EIO.

Known shortcoming: pyfuse3 exposes no ``FOPEN_STREAM``; ``migration/data`` is
opened ``nonseekable`` instead, which is what the kernel's ``stream_open`` gives
a data_fd apart from the ``f_pos`` bookkeeping.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pyfuse3
import trio

from fakevfio._channel import ADDRESS_XATTR, ControlServer
from fakevfio._device import Device
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import Attr, Handle, Kind, Tree, errno_of

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Period of the workload ticker (devices with a dirtying workload).
WORKLOAD_TICK_S = 0.02
#: Kernel dentry/attribute cache lifetime; device create/remove invalidates explicitly.
CACHE_TIMEOUT_S = 60
#: Worker threads for device work: at least this many, else 2 per device.
MIN_THREADS = 8
#: FUSE request tasks; each request in flight (a read waiting out its emulated
#: bandwidth, a state change) holds one, so allow plenty.
MIN_TASKS = 4
MAX_TASKS = 256
#: Mount options. ``max_read=`` is not usable: libfuse then insists that
#: ``conn.max_read`` match it in init(), which pyfuse3 does not expose, and the
#: session dies at FUSE_INIT. libfuse >= 3.x negotiates up to 1 MiB requests
#: (max_pages) by itself.
BASE_OPTIONS = frozenset({"fsname=fakevfio", "default_permissions"})
_ADDRESS_XATTR = ADDRESS_XATTR.encode()


#: Reads of these kinds run in the trio task itself when their device's lock is free
#: (no worker-thread hop: the FUSE floor's cost): small, bounded work, never a hash,
#: a driver arc or a stream. A held lock sends them to a worker thread as before.
INLINE_READS = frozenset(
    {Kind.CONFIG, Kind.REGION, Kind.STATE, Kind.FLAGS, Kind.GROUP_NODE, Kind.CDEV_NODE}
)
#: Opens and releases run in the trio task except for these (which take a device lock).
THREADED_OPENS = frozenset({Kind.DATA, Kind.FAULTS})
#: getattr runs in the trio task except for these (their size takes a device lock). The
#: kernel asks again after every write to a file (a write drops its cached attributes).
THREADED_ATTRS = frozenset({Kind.CONFIG, Kind.REGION})


#: Drivers whose stream work is a bounded copy (``save_range``/``load_range`` are a
#: memoryview of, or a copy into, their memory) and whose arcs are cheap (a stream
#: object made or checked, no hashing, no I/O): their ``migration/data`` reads and
#: writes and their ``migration/state`` writes run in the trio task too when the
#: device lock is free (a worker-thread hop costs more than such a state change).
#: Exact types only: a subclass may do anything.
INLINE_DATA_DRIVERS: tuple[type, ...] = (RamDriver,)
#: The kinds whose reads and writes :data:`INLINE_DATA_DRIVERS` devices serve inline.
INLINE_DRIVER_KINDS = frozenset({Kind.DATA, Kind.STATE})


def _inline_data(handle: Handle) -> bool:
    device = handle.device
    return (
        handle.node.kind in INLINE_DRIVER_KINDS
        and device is not None
        and type(device.driver) in INLINE_DATA_DRIVERS
    )


class _Busy:
    """The device lock was held: run the operation in a worker thread instead."""


BUSY = _Busy()


def _fuse_error(exc: Exception, what: str) -> pyfuse3.FUSEError:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    err = errno_of(exc)
    if err is None:
        logger.error("%s: unexpected error, replying EIO", what, exc_info=exc)
        err = errno.EIO
    else:
        logger.debug("%s: %s", what, exc)
    return pyfuse3.FUSEError(err)


class VfioFs(pyfuse3.Operations):
    """FUSE operations over the pure :class:`Tree`."""

    def __init__(self, tree: Tree) -> None:
        super().__init__()
        self.tree = tree
        self.limiter = trio.CapacityLimiter(MIN_THREADS)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[str, Attr]]] = {}
        self._next_fh = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._mtime_ns = time.time_ns()
        #: the control channel's name, the root's ADDRESS_XATTR (None: no channel)
        self.channel_address: bytes | None = None
        self.resize_limiter()

    def resize_limiter(self) -> None:
        """Two threads per device, at least :data:`MIN_THREADS`."""
        self.limiter.total_tokens = max(MIN_THREADS, 2 * len(self.tree.registry.live_devices()))

    async def _run(self, what: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except Exception as exc:  # noqa: BLE001 - the FUSE boundary maps everything
            raise _fuse_error(exc, what) from None

    def _inline(
        self, what: str, device: Device | None, fn: Callable[..., _T], *args: object
    ) -> _T | _Busy:
        """``fn(*args)`` in the trio task, holding ``device``'s lock if it is free now."""
        lock = device.lock if device is not None else None
        if lock is not None and not lock.acquire(blocking=False):
            return BUSY
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the FUSE boundary maps everything
            raise _fuse_error(exc, what) from None
        finally:
            if lock is not None:
                lock.release()

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(attr.ino)
        entry.generation = 0
        # Sizes never change for an inode, and entries that come and go are
        # invalidated explicitly (see write), so the kernel may cache both.
        entry.entry_timeout = CACHE_TIMEOUT_S
        entry.attr_timeout = CACHE_TIMEOUT_S
        entry.st_mode = pyfuse3.ModeT(attr.mode)
        entry.st_nlink = attr.nlink
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_rdev = 0
        entry.st_size = attr.size
        entry.st_blksize = 4096
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_atime_ns = self._mtime_ns
        entry.st_mtime_ns = self._mtime_ns
        entry.st_ctime_ns = self._mtime_ns
        return entry

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    # -- metadata ------------------------------------------------------------
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        return self._entry(await self._run("lookup", self.tree.lookup, parent_inode, text))

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            kind: Kind | None = self.tree.node(inode).kind
        except Exception:  # noqa: BLE001 - tree.getattr reports it, in a worker thread
            kind = None
        if kind is not None and kind not in THREADED_ATTRS:
            attr = self._inline("getattr", None, self.tree.getattr, inode)
            if not isinstance(attr, _Busy):
                return self._entry(attr)
        return self._entry(await self._run("getattr", self.tree.getattr, inode))

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # O_TRUNC of a control file must succeed (``echo X > file``); mode, owner
        # and time changes are accepted and ignored.
        if fields.update_size:
            result = await self._run("truncate", self.tree.truncate, inode, attr.st_size)
        else:
            result = await self._run("setattr", self.tree.getattr, inode)
        return self._entry(result)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Inode numbers are never reused and the tree prunes removed devices itself.
        return

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_namemax = 255
        return data

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EACCES)

    # -- directories -----------------------------------------------------------
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        entries = await self._run("opendir", self.tree.listdir, inode)
        fh = next(self._next_fh)
        self._dirs[fh] = entries
        return pyfuse3.FileHandleT(fh)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for index in range(start_id, len(entries)):
            name, attr = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), index + 1):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    # -- files ------------------------------------------------------------------------
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        try:
            kind: Kind | None = self.tree.node(inode).kind
        except Exception:  # noqa: BLE001 - tree.open reports it, in a worker thread
            kind = None
        handle: Handle | _Busy = BUSY
        if kind is not None and kind not in THREADED_OPENS:
            handle = self._inline("open", None, self.tree.open, inode, flags)
        if isinstance(handle, _Busy):
            handle = await self._run("open", self.tree.open, inode, flags)
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fh),
            direct_io=True,
            keep_cache=False,
            nonseekable=handle.node.kind is Kind.DATA,
        )

    # pyfuse3's stub says bytes, but its handler takes any contiguous buffer
    # (PyObject_GetBuffer), so a bytearray or a view of a stopped device's state
    # (fakevfio._stream Rule 6) goes out uncopied.
    async def read(  # type: ignore[override]
        self, fh: pyfuse3.FileHandleT, off: int, size: int
    ) -> bytes | bytearray | memoryview:
        handle = self._handle(fh)
        arrival = trio.current_time()
        if handle.node.kind in INLINE_READS or _inline_data(handle):
            done = self._inline("read", handle.device, self.tree.read, handle, off, size, arrival)
            if not isinstance(done, _Busy):
                if done[1] > 0:  # (no coroutine per request where nothing is waited for)
                    await self._wait(handle, arrival, done[1])
                return done[0]
        data, delay = await self._run("read", self.tree.read, handle, off, size, arrival)
        await self._wait(handle, arrival, delay)
        return data

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        arrival = trio.current_time()
        if _inline_data(handle):
            done = self._inline("write", handle.device, self.tree.write, handle, off, buf, arrival)
            if not isinstance(done, _Busy):
                if done[1] > 0:
                    await self._wait(handle, arrival, done[1])
                return done[0]
        count, delay = await self._run("write", self.tree.write, handle, off, buf, arrival)
        if handle.node.kind in (Kind.DRIVER_CREATE, Kind.REMOVE):
            self.resize_limiter()
            for parent, name in self.tree.take_invalidations():
                pyfuse3.invalidate_entry_async(
                    pyfuse3.InodeT(parent),
                    pyfuse3.FileNameT(os.fsencode(name)),
                    ignore_enoent=True,
                )
        await self._wait(handle, arrival, delay)
        return count

    @staticmethod
    async def _wait(handle: Handle, arrival: float, delay: float) -> None:
        """Wait out what the core asked for: a deadline for data, a delay for the rest.

        ``migration/data`` replies are due ``delay`` after the request's arrival,
        so the processing time is inside the emulated device time (a pace, see
        :class:`fakevfio._device.Bandwidth`); a control file's delay (an injected
        arc delay) is added after the work, as INTERFACES says.
        """
        if delay <= 0:
            return
        if handle.node.kind is Kind.DATA:
            await trio.sleep_until(arrival + delay)
        else:
            await trio.sleep(delay)

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        """Only the root's ADDRESS_XATTR exists: the control channel's name."""
        if (
            inode == pyfuse3.ROOT_INODE
            and bytes(name) == _ADDRESS_XATTR
            and self.channel_address is not None
        ):
            return self.channel_address
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.get(fh)
        if handle is not None and handle.truncated:
            await self._run("flush", self.tree.flush, handle)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.node.kind in THREADED_OPENS:
            await self._run("release", self.tree.release, handle)
        else:
            self._inline("release", None, self.tree.release, handle)

    # -- background ----------------------------------------------------------------------
    async def run_workloads(self) -> None:
        """Advance the workload of every device that has one, every 20 ms, forever."""
        last = trio.current_time()
        while True:
            await trio.sleep(WORKLOAD_TICK_S)
            now = trio.current_time()
            elapsed, last = now - last, now
            busy = [d for d in self.tree.registry.live_devices() if d.driver.has_workload()]
            if not busy:
                continue

            def tick(devices: list[Device] = busy, seconds: float = elapsed) -> None:
                for device in devices:
                    try:
                        device.advance(seconds)
                    except Exception:
                        logger.exception("workload of device %s failed", device)

            await trio.to_thread.run_sync(tick, limiter=self.limiter)


async def serve(
    mountpoint: str,
    registry: Registry,
    *,
    allow_other: bool = False,
    debug: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``registry``'s devices at ``mountpoint`` and serve until unmounted or cancelled.

    Calls ``task_status.started()`` once the mount is live. Cancelling the
    caller's scope (or an external ``fusermount3 -u``) ends the service; the
    filesystem is always unmounted on the way out.
    """
    ops = VfioFs(Tree(registry))
    options = set(BASE_OPTIONS)
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    channel: ControlServer | None = None
    try:
        channel = ControlServer(ops.tree)
        ops.channel_address = channel.address
    except OSError as exc:
        logger.warning("no control channel (fakevfio run uses the files): %s", exc)
    try:
        pyfuse3.init(ops, mountpoint, options)
    except BaseException:
        if channel is not None:
            channel.close()
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.run_workloads)
            task_status.started()
            await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()
    finally:
        if channel is not None:
            channel.close()
        pyfuse3.close(unmount=True)


# -- the FUSE floor (benchmarks) ------------------------------------------------------------
#: The floor's files: a data file served from one preallocated buffer, a 4-byte file,
#: and a file held in ``size`` bytes of memory.
FLOOR_DATA_INO, FLOOR_SMALL_INO, FLOOR_RAM_INO = 2, 3, 4
FLOOR_NAMES = {b"data": FLOOR_DATA_INO, b"small": FLOOR_SMALL_INO, b"ram": FLOOR_RAM_INO}
FLOOR_BUFFER = 1 << 20


class FloorFs(pyfuse3.Operations):
    """The least a pyfuse3 file system does per request: the benchmarks' FUSE floor.

    Rule 1: ``data`` (``size`` bytes) answers a read with a slice of one 1 MiB
            buffer made once, and a write by counting it; ``small`` holds 4 bytes.
    Rule 2: ``ram`` is ``size`` bytes of anonymous memory, filled at start: a read
            answers with a view of the bytes at its offset (no copy in the daemon)
            and a write copies its bytes there. It moves as many distinct bytes
            through memory as a device of that state size must (a 1 GiB state does
            not stay in the CPU's caches, a 1 MiB buffer does), and nothing more.
    Rule 3: all open ``direct_io`` like the device files, and handlers run in the
            trio task (no worker thread, no lock): what is left is pyfuse3, trio,
            the kernel and memory, which :class:`VfioFs` cannot go below.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.buffer = memoryview(bytes(range(256)) * (FLOOR_BUFFER // 256))
        self.ram = memoryview(mmap.mmap(-1, max(size, 1)))
        for off in range(0, size, FLOOR_BUFFER):
            n = min(FLOOR_BUFFER, size - off)
            self.ram[off : off + n] = self.buffer[:n]
        self.written = 0
        self._mtime_ns = time.time_ns()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(ino)
        entry.entry_timeout = CACHE_TIMEOUT_S
        entry.attr_timeout = CACHE_TIMEOUT_S
        if ino == pyfuse3.ROOT_INODE:
            entry.st_mode = pyfuse3.ModeT(0o40755)
            entry.st_nlink = 2
        else:
            entry.st_mode = pyfuse3.ModeT(0o100666)
            entry.st_nlink = 1
            entry.st_size = 4 if ino == FLOOR_SMALL_INO else self.size
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self._mtime_ns
        return entry

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        ino = FLOOR_NAMES.get(bytes(name)) if parent_inode == pyfuse3.ROOT_INODE else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=True, keep_cache=False)

    async def read(  # type: ignore[override]
        self, fh: pyfuse3.FileHandleT, off: int, size: int
    ) -> bytes | memoryview:
        if fh == FLOOR_SMALL_INO:
            return b"RUN\n"[off : off + size]
        if fh == FLOOR_RAM_INO:
            return self.ram[off : off + max(0, min(size, self.size - off))]
        size = max(0, min(size, self.size - off, FLOOR_BUFFER))
        return self.buffer[:size]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        if fh == FLOOR_RAM_INO:
            end = min(off + len(buf), self.size)
            if end > off:
                self.ram[off:end] = memoryview(buf)[: end - off]
        self.written += len(buf)
        return len(buf)


def serve_floor(mountpoint: str, size: int) -> None:
    """Mount :class:`FloorFs` at ``mountpoint``; print a ready line; serve until SIGTERM/SIGINT."""
    import signal

    async def main() -> None:
        pyfuse3.init(FloorFs(size), mountpoint, {"fsname=fakevfio-floor"})
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                print(f"fakevfio-floor: mounted {mountpoint}", flush=True)
                await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)

    trio.run(main)


__all__ = ["FloorFs", "VfioFs", "serve", "serve_floor"]
