"""Which file a path names (device and inode), without a FUSE request where the kernel knows.

``os.stat`` asks for every basic field, and the FUSE kernel module sends the
mount a GETATTR whenever one of them is stale: after any read of a file
(``fuse_invalidate_atime``) and, before Linux 6.2, after any write too. On
the supervisor's hot path (a ``pread`` of ``migration/state``, then the check
that the kept fd is still that file) that doubled the cost of GET
MIG_DEVICE_STATE. ``statx`` with ``STATX_INO`` asks only for what the
supervisor uses; with ``AT_STATX_DONT_SYNC`` the cached inode answers outright
(its number cannot change). The path walk still revalidates every dentry, and
the mount invalidates the entries of a removed or re-created device, so a
gone file is still ENOENT. Struct layout: ``include/uapi/linux/stat.h``.
"""

from __future__ import annotations

import ctypes
import os
import struct

import attrs

from fakevfio._libc import libc

AT_FDCWD = -100
AT_STATX_DONT_SYNC = 0x4000
STATX_INO = 0x100
STATX_SIZE = 256
#: struct statx: stx_ino at 32, stx_dev_major and stx_dev_minor at 136
_INO = struct.Struct("<Q")
_DEV = struct.Struct("<II")
_statx = getattr(libc, "statx", None)  # glibc >= 2.28; os.stat otherwise


@attrs.frozen
class FileId:
    """A file's identity: ``st_dev`` and ``st_ino`` as ``os.stat`` reports them."""

    st_dev: int
    st_ino: int


def file_id(path: str | bytes, *, cached: bool = False) -> FileId:
    """The device and inode ``path`` names (OSError with ``os.stat``'s errno otherwise).

    ``cached``: take the inode's cached attributes as they are (AT_STATX_DONT_SYNC);
    otherwise the file system is asked only if the kernel's inode number may be stale.
    """
    if _statx is None:
        st = os.stat(path)
        return FileId(st.st_dev, st.st_ino)
    buf = ctypes.create_string_buffer(STATX_SIZE)
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    if _statx(AT_FDCWD, raw, AT_STATX_DONT_SYNC if cached else 0, STATX_INO, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(raw))
    (ino,) = _INO.unpack_from(buf, 32)
    major, minor = _DEV.unpack_from(buf, 136)
    return FileId(os.makedev(major, minor), ino)
