"""Mounts, migrator runs, raw copies and timing for the benchmark scenarios.

Everything runs the real command lines (``python -m fakevfio mount``,
``python -m migrator incoming|migrate``, ``dd``, ``socat``) as subprocesses,
the way a user would, and times them from here. Mounts and migrator runs are
:mod:`fakevfio.testing`'s (one lifecycle for tests, benchmarks and the demo).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fakevfio import testing
from fakevfio.testing import HarnessError, MigrationResult, Mount, mount

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
def dd_direct(src_data: Path, dst_data: Path, *, timeout: float = 600.0) -> tuple[int, float]:
    """``dd bs=1M`` from one data file to the other; (bytes, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["dd", f"if={src_data}", f"of={dst_data}", "bs=1M"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"dd failed: {proc.stderr.strip()}")
    return _dd_bytes(proc.stderr), elapsed


def _dd_bytes(stderr: str) -> int:
    m = re.search(r"^(\d+) bytes", stderr, re.MULTILINE)
    if not m:
        raise BenchError(f"cannot parse dd output: {stderr!r}")
    return int(m.group(1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dd_socat(src_data: Path, dst_data: Path, *, timeout: float = 600.0) -> tuple[int, float]:
    """``dd | socat`` -> tcp loopback -> ``socat | dd``; (bytes, seconds)."""
    port = _free_port()
    recv = subprocess.Popen(
        [
            "sh",
            "-c",
            f"socat -u TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr STDOUT"
            f" | dd of={dst_data} bs=1M iflag=fullblock",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not _port_listening(port):
            if time.monotonic() > deadline or recv.poll() is not None:
                raise BenchError("socat receiver did not start listening")
            time.sleep(0.01)
        t0 = time.perf_counter()
        send = subprocess.run(
            ["sh", "-c", f"dd if={src_data} bs=1M | socat -u STDIN TCP:127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        _, err = recv.communicate(timeout=timeout)
        elapsed = time.perf_counter() - t0
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    if send.returncode != 0 or recv.returncode != 0:
        raise BenchError(f"dd|socat failed: {send.stderr.strip()} / {err.strip()}")
    return _dd_bytes(err), elapsed


def _port_listening(port: int) -> bool:
    hexport = f":{port:04X}"
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(hexport) and fields[3] == "0A":
                return True
    except OSError:
        pass
    return False


def missing_tools() -> list[str]:
    return [tool for tool in ("dd", "socat") if shutil.which(tool) is None]


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
