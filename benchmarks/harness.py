"""Mounts, migrator runs, raw copies and timing for the benchmark scenarios.

Everything runs the real command lines (``python -m fakevfio mount``,
``python -m migrator incoming|migrate``, ``dd``, the FUSE floor, a C ioctl probe) as subprocesses,
the way a user would, and times them from here. Mounts and migrator runs are
:mod:`fakevfio.testing`'s (one lifecycle for tests, benchmarks and the demo).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fakevfio import testing
from fakevfio.testing import HarnessError, MigrationResult, Mount, force_unmount, mount
from fakevfio.testing._process import read_line

MiB = 1 << 20
GiB = 1 << 30


class BenchError(HarnessError):
    """A benchmark step failed (the message says which)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size_text(n: int) -> str:
    """``n`` bytes as a ram-driver size option (K/M/G suffixes, powers of 1024)."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


# -- mounts and migrator runs (fakevfio.testing's) -----------------------------------------
def mounted(
    base: Path, devices: Sequence[str], *, debug: bool = False, ready_timeout: float = 300.0
) -> contextlib.AbstractContextManager[Mount]:
    """``fakevfio mount`` with ``devices`` (``NAME=ram:...``); always unmounted on exit."""
    extra = ["--debug"] if debug else []
    return mount(devices, base_dir=base, extra_args=extra, ready_timeout=ready_timeout)


#: Migrations that failed and were retried, as (what, error) pairs, for the report.
FAILURES: list[tuple[str, str]] = []


def migrate(
    src: Mount,
    dst: Mount,
    names: Sequence[str],
    args: Sequence[str] = (),
    *,
    timeout: float = 600.0,
    retries: int = 1,
) -> MigrationResult:
    """Migrate devices ``names`` over tcp loopback, retried after a failure (kept in FAILURES).

    ``args`` go to both migrators; the result has both JSON objects and each
    side's peak RSS.
    """
    for attempt in range(retries + 1):
        try:
            return testing.migrate(src, dst, names, options=args, timeout=timeout)
        except HarnessError as exc:
            what = f"{len(names)} device(s) {' '.join(args)}".strip()
            FAILURES.append((what, str(exc)))
            log(f"migration failed ({what}): {exc}")
            if attempt == retries:
                raise
            log("retrying once")
    raise AssertionError("unreachable")


# -- raw copies -------------------------------------------------------------------------
def _dd(cmd: str, timeout: float) -> tuple[int, float]:
    """Run a shell line whose last stage is a ``dd``; (bytes that dd reports, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{cmd!r} failed: {proc.stderr.strip()}")
    # With a pipeline both dds report; the last line set is the writer's.
    found = re.findall(r"^(\d+) bytes", proc.stderr, re.MULTILINE)
    if not found:
        raise BenchError(f"cannot parse dd output of {cmd!r}: {proc.stderr!r}")
    return int(found[-1]), elapsed


def dd_read(
    src: Path, *, count_mib: int | None = None, timeout: float = 600.0
) -> tuple[int, float]:
    """``dd if=src of=/dev/null bs=1M``: the read-alone rate."""
    count = f" count={count_mib}" if count_mib is not None else ""
    return _dd(f"dd if={src} of=/dev/null bs=1M{count}", timeout)


def dd_write(
    src: Path | str, dst: Path, *, count_mib: int | None = None, timeout: float = 600.0
) -> tuple[int, float]:
    """``dd if=src of=dst bs=1M`` from a file in memory (or /dev/zero): the write-alone rate."""
    count = f" count={count_mib}" if count_mib is not None else ""
    return _dd(f"dd if={src} of={dst} bs=1M{count}", timeout)


def dd_pipe(src: Path, dst: Path, *, timeout: float = 600.0) -> tuple[int, float]:
    """``dd if=src bs=1M | dd of=dst bs=1M iflag=fullblock``: read and write overlapped.

    ``iflag=fullblock`` makes the writer issue 1 MiB writes (without it, it writes
    the pipe's 64 KiB pieces, a much slower and unfair baseline).
    """
    return _dd(f"dd if={src} bs=1M | dd of={dst} bs=1M iflag=fullblock", timeout)


def rate(op: Callable[[], object], seconds: float) -> float:
    """Calls of ``op`` per second, over at least ``seconds`` (batches of 32)."""
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(32):
            op()
        n += 32
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def pread_op(path: Path) -> tuple[Callable[[], object], Callable[[], None]]:
    """(a 4-byte ``pread`` at offset 0 of ``path`` kept open, its closer)."""
    fd = os.open(path, os.O_RDWR)

    def op() -> None:
        if len(os.pread(fd, 4, 0)) != 4:
            raise BenchError(f"4-byte pread of {path} returned less")

    return op, lambda: os.close(fd)


def open_read_close(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


_floors = itertools.count()
#: The serving process of each mounted floor (mountpoint -> pid), for CPU accounting.
FLOOR_PIDS: dict[Path, int] = {}


@contextlib.contextmanager
def floor_mounted(base: Path, size: int, *, ready_timeout: float = 60.0) -> Iterator[Path]:
    """The FUSE floor (:class:`fakevfio._fuse.FloorFs`) on a new mountpoint: ``data``, ``small``."""
    mnt = base / f"floor{next(_floors)}"
    mnt.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", str(mnt), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = read_line(proc.stdout, time.monotonic() + ready_timeout)
        if not line or not line.startswith(b"fakevfio-floor: mounted"):
            raise BenchError(f"the FUSE floor did not mount at {mnt}: {line!r}")
        FLOOR_PIDS[mnt] = proc.pid
        yield mnt
    finally:
        FLOOR_PIDS.pop(mnt, None)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


IOCTL_RATE_SOURCE = Path(__file__).resolve().parent / "c" / "ioctl_rate.c"


def build_ioctl_rate(base: Path) -> Path | None:
    """Compile benchmarks/c/ioctl_rate.c; None (with a log line) when gcc is missing."""
    if shutil.which("gcc") is None:
        log("gcc is missing: the ioctl rates are skipped (apt-get install -y gcc)")
        return None
    exe = base / "ioctl_rate"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(IOCTL_RATE_SOURCE)], check=True)
    return exe


def ioctl_rates(
    exe: Path, mnt: Mount, cdev: str, seconds: float, *, channel: bool = True
) -> dict[str, float]:
    """``ioctl_rate`` under ``fakevfio run --mount``: name -> operations per second.

    ``channel=False``: device states through ``migration/state``, not the mount's
    control channel (``FAKEVFIO_RUN_CHANNEL=off``).
    """
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mnt.path), "--"]
    proc = subprocess.run(
        [*cmd, str(exe), f"/dev/vfio/devices/{cdev}", str(seconds)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FAKEVFIO_RUN_CHANNEL": "on" if channel else "off"},
    )
    if proc.returncode != 0:
        raise BenchError(f"ioctl_rate under fakevfio run failed: {proc.stderr.strip()[-1500:]}")
    return {k: float(v) for k, v in (line.split() for line in proc.stdout.splitlines())}


def missing_tools() -> list[str]:
    return [tool for tool in ("dd",) if shutil.which(tool) is None]


# -- machine details --------------------------------------------------------------------
def machine_details(base: Path) -> list[tuple[str, str]]:
    import platform
    from importlib import metadata

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError):
        found = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        if found:
            mem = f"{int(found.group(1)) / (1 << 20):.1f} GiB"

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    libfuse = "unknown"
    tool = shutil.which("fusermount3")
    if tool:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=5)
            libfuse = (out.stdout + out.stderr).strip().splitlines()[0]
    return [
        ("cpu", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", platform.python_version()),
        ("pyfuse3", version("pyfuse3")),
        ("trio", version("trio")),
        ("libfuse", libfuse),
        ("fuse max request", fuse_max_request(base)),
    ]


def fuse_max_request(base: Path) -> str:
    """What the kernel allows and what libfuse negotiated (from a --debug mount's FUSE_INIT)."""
    parts = []
    with contextlib.suppress(OSError, ValueError):
        pages = int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text())
        kib = pages * os.sysconf("SC_PAGE_SIZE") // 1024
        parts.append(f"kernel max_pages_limit {pages} ({kib} KiB)")
    try:
        with mounted(base, ["probe=ram:size=4K"], debug=True, ready_timeout=60) as m:
            time.sleep(0.2)
            text = m.stderr()
        found = re.findall(r"^\s+max_write=0x([0-9a-f]+)", text, re.MULTILINE)
        if found:
            parts.insert(0, f"max_write {int(found[-1], 16) // 1024} KiB (negotiated)")
    except HarnessError as exc:
        parts.append(f"probe failed: {exc}")
    return "; ".join(parts) or "unknown"
