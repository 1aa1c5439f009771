"""The DMA logging features of a device fd (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``).

Theory of operation
-------------------
``vfio_ioctl_device_feature_logging_start/stop/report`` of
drivers/vfio/vfio_main.c, over the device's ``dma`` file (``log start``,
``log stop``, ``log report``; the device core checks the driver-level rules
and its errno comes back from the write).

Rule 1: ``vfio_check_feature`` first: START and STOP are SET-only, REPORT is
        GET-only (EINVAL otherwise); PROBE then answers 0; without PROBE one of
        GET or SET is needed and the payload must hold the struct (START 24
        bytes, STOP none, REPORT 32), else EINVAL.
Rule 2: START: ``num_ranges`` 0 is EINVAL and more than ``LOG_MAX_RANGES``
        (256) E2BIG before the ranges array is read; the ranges are read from
        the caller's memory (EFAULT), the device checks them, and the control
        struct with the device's page size is copied back (EFAULT stops the
        logging again, as the kernel does).
Rule 3: REPORT: page size and overflow are checked by the device, but the
        caller's bitmap is probed for writing first (the kernel pins it before
        calling the driver), so a bad pointer is EFAULT and clears nothing.
        The device's bitmap is ORed into the caller's: the kernel only sets
        bits. Long ranges go in pieces of :data:`REPORT_CHUNK_PAGES` pages.

Known shortcoming: when the ranges array cannot be read, EFAULT wins even if
an earlier range was invalid (the kernel would report that range's errno).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from fakevfio._run._nodes import DeviceInfo
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio


LOGGING_FEATURES = frozenset(
    {
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    }
)
#: vfio_main.c ``LOG_MAX_RANGES``: PAGE_SIZE / sizeof(struct vfio_device_feature_dma_logging_range)
LOG_MAX_RANGES = 4096 // uapi.DMA_LOGGING_RANGE.size
#: Pages per ``log report`` command (a 2 MiB bitmap; a multiple of 64 keeps words whole).
REPORT_CHUNK_PAGES = 1 << 24
#: Bytes of one reply read from the ``dma`` file.
_READ_BYTES = 1 << 20

_GET, _SET = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET
_OPS = {
    uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START: (_SET, uapi.DMA_LOGGING_CONTROL.size),
    uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: (_SET, 0),
    uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: (_GET, uapi.DMA_LOGGING_REPORT.size),
}


def logging_feature(
    vfio: Vfio, call: Call, dev: DeviceInfo, index: int, flags: int, argsz: int
) -> int:
    """One DEVICE_FEATURE ioctl for a DMA logging feature (argsz and flag word checked)."""
    ops, minsz = _OPS[index]
    # vfio_check_feature() (Rule 1)
    if flags & (_GET | _SET) & ~ops:
        raise IoctlError(errno.EINVAL, f"DMA logging feature {index} is {_name(ops)}-only")
    if flags & uapi.VFIO_DEVICE_FEATURE_PROBE:
        return 0
    if not flags & (_GET | _SET):
        raise IoctlError(errno.EINVAL, "neither GET nor SET")
    if argsz - uapi.DEVICE_FEATURE.size < minsz:
        raise IoctlError(errno.EINVAL, f"payload of {argsz - 8} bytes (the struct is {minsz})")
    payload = call.arg + uapi.DEVICE_FEATURE.size
    if index == uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
        command(vfio, dev, "log stop", reply=False)
        return 0
    if index == uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START:
        return _start(vfio, call, dev, payload)
    return _report(vfio, call, dev, payload)


def _name(ops: int) -> str:
    return "SET" if ops == _SET else "GET"


def _start(vfio: Vfio, call: Call, dev: DeviceInfo, payload: int) -> int:
    raw = call.mem.read(payload, uapi.DMA_LOGGING_CONTROL.size)
    page_size, num_ranges, reserved, ranges_ptr = uapi.DMA_LOGGING_CONTROL.unpack(raw)
    if num_ranges == 0:
        raise IoctlError(errno.EINVAL, "num_ranges 0")
    if num_ranges > LOG_MAX_RANGES:
        raise IoctlError(errno.E2BIG, f"num_ranges {num_ranges} > {LOG_MAX_RANGES}")
    size = uapi.DMA_LOGGING_RANGE.size
    table = call.mem.read(ranges_ptr, num_ranges * size)
    spans = []
    for i in range(num_ranges):
        iova, length = uapi.DMA_LOGGING_RANGE.unpack_from(table, i * size)
        spans.append(f"{iova:#x}:{length:#x}")
    reply = command(vfio, dev, f"log start {page_size:#x} {','.join(spans)}").split()
    if len(reply) != 2 or reply[0] != b"page_size":
        raise IoctlError(errno.EIO, f"dma file answered {b' '.join(reply)[:60]!r}")
    out = uapi.DMA_LOGGING_CONTROL.pack(int(reply[1]), num_ranges, reserved, ranges_ptr)
    try:
        call.mem.write(payload, out)
    except IoctlError:
        command(vfio, dev, "log stop", reply=False)
        raise
    return 0


def _report(vfio: Vfio, call: Call, dev: DeviceInfo, payload: int) -> int:
    raw = call.mem.read(payload, uapi.DMA_LOGGING_REPORT.size)
    iova, length, page_size, bitmap = uapi.DMA_LOGGING_REPORT.unpack(raw)
    ok_size = page_size >= 4096 and not page_size & (page_size - 1)
    if not ok_size or iova + length >= 1 << 64 or length == 0:
        # the device's own checks give the errno (EINVAL / EOVERFLOW) and change nothing
        command(vfio, dev, f"log report {iova:#x} {length:#x} {page_size:#x}")
        raise IoctlError(errno.EIO, "the device accepted a bad report")
    pages = -(-length // page_size)
    chunk_bytes = REPORT_CHUNK_PAGES // 8
    # Rule 3: the kernel pins the user bitmap first; probe every page of it for writing.
    total = -(-pages // 64) * 8
    for off in range(0, total, chunk_bytes):
        n = min(chunk_bytes, total - off)
        call.mem.write(bitmap + off, call.mem.read(bitmap + off, n))
    at = 0
    while at < pages:
        n = min(REPORT_CHUNK_PAGES, pages - at)
        start = iova + at * page_size
        span = min(n * page_size, iova + length - start)
        bits = command(vfio, dev, f"log report {start:#x} {span:#x} {page_size:#x}")
        addr = bitmap + at // 8
        old = call.mem.read(addr, len(bits))
        merged = (int.from_bytes(old, "little") | int.from_bytes(bits, "little")).to_bytes(
            len(bits), "little"
        )
        call.mem.write(addr, merged)
        at += n
    return 0


def command(vfio: Vfio, dev: DeviceInfo, text: str, *, reply: bool = True) -> bytes:
    """Write one command to the device's ``dma`` file; its reply (b"" without one).

    Raises:
        IoctlError: with the errno of the write (the device's check that failed).
    """
    path = vfio.nodes.dev_path(dev.name, "dma")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise IoctlError(exc.errno or errno.EIO, f"open {dev.name}/dma") from None
    try:
        os.write(fd, text.encode())
        out = bytearray()
        if not reply:
            return b""
        while True:  # the reply is read from offset 0 of the same handle
            piece = os.pread(fd, _READ_BYTES, len(out))
            if not piece:
                return bytes(out)
            out += piece
    except OSError as exc:
        raise IoctlError(exc.errno or errno.EIO, f"{dev.name}/dma: {text[:60]}") from None
    finally:
        os.close(fd)
