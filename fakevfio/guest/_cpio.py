"""A writer for the kernel's initramfs format: a "newc" cpio archive.

Theory of operation: the kernel unpacks ``-initrd`` as one or more cpio archives
in the "new ASCII" (``070701``) format (Documentation/driver-api/early-userspace/
buffer-format.rst): per entry a 110-byte header of 13 eight-digit hex fields, the
NUL-terminated name padded to 4 bytes, the data padded to 4 bytes; a
``TRAILER!!!`` entry ends the archive. So no ``cpio`` binary is needed (a fresh
Debian has none).

Rule 1: entries are written in the order given; a directory must come before the
files in it (the kernel creates nothing implicitly).
Rule 2: names are relative (no leading ``/``), at most 4095 bytes, without NUL.
Rule 3: the archive is deterministic: inode numbers count up from 1, mtime is 0,
uid and gid are 0, so the same entries always give the same bytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

import attrs

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MAX_NAME = 4095


@attrs.frozen(kw_only=True)
class Entry:
    """One file, directory, symlink or device node of the archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Entry:
        return cls(name=name, mode=stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(name=name, mode=stat.S_IFREG | perm, data=data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(name=name, mode=stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # check
    )
    return MAGIC + b"".join(b"%08x" % f for f in fields)


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or raw.startswith(b"/") or b"\0" in raw or len(raw) > MAX_NAME:
        raise ValueError(
            f"cpio entry name {name!r}: expected a relative path of 1..{MAX_NAME} bytes "
            "without NUL (e.g. 'bin/busybox')"
        )
    return raw


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """The entries as one newc cpio archive, trailer included."""
    out = bytearray()
    ino = 0
    for ino, entry in enumerate([*entries, Entry(name=TRAILER, mode=0)], start=1):
        name = _check_name(entry.name)
        header = _header(0 if entry.name == TRAILER else ino, entry, name)
        out += header + name + b"\0"
        out += _pad(len(header) + len(name) + 1)
        out += entry.data + _pad(len(entry.data))
    del ino
    return bytes(out)


__all__ = ["Entry", "newc_archive"]
