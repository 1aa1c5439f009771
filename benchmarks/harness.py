"""Mounts, migrator runs, raw copies and timing for the benchmark scenarios.

Everything runs the real command lines (``python -m fakevfio mount``,
``python -m migrator incoming|migrate``, ``dd``, ``socat``) as subprocesses,
the way a user would, and times them from here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

PY = sys.executable
READY_PREFIX = "fakevfio: mounted "
LISTEN_PREFIX = "migrator: listening on "
MiB = 1 << 20
GiB = 1 << 30


class BenchError(RuntimeError):
    """A benchmark step failed (the message says which)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size_text(n: int) -> str:
    """``n`` bytes as a ram-driver size option (K/M/G suffixes, powers of 1024)."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


# -- mounts ----------------------------------------------------------------------------
def _wait_line(stream: Any, prefix: str, timeout: float, what: str, log_path: Path | None) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                extra = log_path.read_text(errors="replace") if log_path else ""
                raise BenchError(f"{what} not ready after {timeout:.0f} s {extra}".strip())
            ch = os.read(stream.fileno(), 1)
            if not ch:
                extra = log_path.read_text(errors="replace") if log_path else line.decode()
                raise BenchError(f"{what} exited before it was ready: {extra}".strip())
            line += ch
    text = line.decode()
    if not text.startswith(prefix):
        raise BenchError(f"{what}: unexpected first line {text!r}")
    return text[len(prefix):].strip()


def _is_mounted(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN


class Mount:
    """A live ``fakevfio mount`` with a few file helpers."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.path = path
        self.proc = proc
        self.log_path = log_path

    def dev(self, name: str) -> Path:
        return self.path / "devices" / name

    def read(self, name: str, rel: str) -> str:
        fd = os.open(self.dev(name) / rel, os.O_RDONLY)
        try:
            out = b""
            while chunk := os.read(fd, 1 << 20):
                out += chunk
            return out.decode()
        finally:
            os.close(fd)

    def set_state(self, name: str, state: str) -> None:
        fd = os.open(self.dev(name) / "migration" / "state", os.O_WRONLY)
        try:
            os.write(fd, f"{state}\n".encode())
        finally:
            os.close(fd)

    def state(self, name: str) -> str:
        return self.read(name, "migration/state").strip()

    def info(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.read(name, "info"))
        return result

    def digest(self, name: str) -> str:
        return str(self.info(name)["state_digest"])

    def rss_kib(self) -> int:
        """Current VmRSS of the mount's server process."""
        return _status_kib(self.proc.pid, "VmRSS")


def _status_kib(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


@contextlib.contextmanager
def mounted(base: Path, devices: Sequence[str], *, debug: bool = False,
            ready_timeout: float = 300.0) -> Iterator[Mount]:
    """``fakevfio mount`` with ``devices`` (``NAME=ram:...``); always unmounted on exit."""
    mountpoint = Path(tempfile.mkdtemp(prefix="mnt", dir=base))
    log_path = mountpoint.with_suffix(".stderr")
    cmd = [PY, "-m", "fakevfio"] + (["--debug"] if debug else []) + ["mount", str(mountpoint)]
    for spec in devices:
        cmd += ["--device", spec]
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        what = f"fakevfio mount {mountpoint}"
        _wait_line(proc.stdout, READY_PREFIX, ready_timeout, what, log_path)
        yield Mount(mountpoint, proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if _is_mounted(mountpoint):
            tool = shutil.which("fusermount3") or shutil.which("fusermount")
            if tool:
                subprocess.run([tool, "-u", "-z", str(mountpoint)],
                               capture_output=True, check=False)
            if _is_mounted(mountpoint):
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


# -- migrator runs ----------------------------------------------------------------------
@attrs.frozen
class MigrationRun:
    source: dict[str, Any]
    dest: dict[str, Any]
    wall_s: float
    dest_maxrss_kib: int
    source_maxrss_kib: int


class _Child:
    """A subprocess whose output is drained by threads and whose rusage we collect."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""
        self.err = b""
        self.maxrss_kib = 0
        self._threads: list[threading.Thread] = []

    def drain(self, first_err: bytes = b"") -> None:
        self.err = first_err

        def pump(stream: Any, attr: str) -> None:
            chunks = []
            while chunk := os.read(stream.fileno(), 65536):
                chunks.append(chunk)
            setattr(self, attr, getattr(self, attr) + b"".join(chunks))

        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        for stream, attr in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            t = threading.Thread(target=pump, args=(stream, attr), daemon=True)
            t.start()
            self._threads.append(t)

    def wait(self, timeout: float) -> int:
        """Wait (reaping with wait4 for ru_maxrss); kill after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                _, status, ru = os.wait4(self.proc.pid, 0)
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                for t in self._threads:
                    t.join(5)
                raise BenchError(f"{' '.join(self.argv[2:5])} timed out after {timeout:.0f} s")
            time.sleep(0.005)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss_kib = ru.ru_maxrss
        for t in self._threads:
            t.join(10)
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()
        return self.proc.returncode

    def json(self, what: str) -> dict[str, Any]:
        lines = self.out.decode(errors="replace").strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise BenchError(
                f"{what} failed (exit {self.proc.returncode}): "
                f"{self.err.decode(errors='replace').strip()[-2000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result


#: Migrations that failed and were retried, as (what, error) pairs, for the report.
FAILURES: list[tuple[str, str]] = []


def migrate(
    src: Sequence[Path | str],
    dst: Sequence[Path | str],
    args: Sequence[str] = (),
    *,
    timeout: float = 600.0,
    retries: int = 1,
) -> MigrationRun:
    """:func:`migrate_once`, retried after a failure (each failure is kept in FAILURES)."""
    for attempt in range(retries + 1):
        try:
            return migrate_once(src, dst, args, timeout=timeout)
        except BenchError as exc:
            what = f"{len(src)} device(s) {' '.join(args)}".strip()
            FAILURES.append((what, str(exc)))
            log(f"migration failed ({what}): {exc}")
            if attempt == retries:
                raise
            log("retrying once")
    raise AssertionError("unreachable")


def migrate_once(
    src: Sequence[Path | str],
    dst: Sequence[Path | str],
    args: Sequence[str] = (),
    *,
    timeout: float = 600.0,
) -> MigrationRun:
    """``migrator incoming`` + ``migrator migrate`` over tcp loopback; both JSON results."""
    incoming = _Child([PY, "-m", "migrator", "incoming", "--listen", "tcp:127.0.0.1:0", "--json",
                       *args, *map(str, dst)])
    try:
        assert incoming.proc.stderr is not None
        addr = _wait_line(incoming.proc.stderr, LISTEN_PREFIX, 60, "migrator incoming", None)
    except BaseException:
        incoming.proc.kill()
        incoming.proc.wait()
        raise
    incoming.drain()
    t0 = time.perf_counter()
    source = _Child([PY, "-m", "migrator", "migrate", "--to", addr, "--json",
                     *args, *map(str, src)])
    source.drain()
    try:
        source.wait(timeout)
    finally:
        with contextlib.suppress(BenchError):
            incoming.wait(60 if source.proc.returncode is not None else 5)
    wall = time.perf_counter() - t0
    try:
        src_json = source.json("migrator migrate")
    except BenchError as exc:
        dest_err = incoming.err.decode(errors="replace").strip()[-1000:]
        raise BenchError(f"{exc}; destination: {dest_err or '(nothing on stderr)'}") from None
    dst_json = incoming.json("migrator incoming")
    return MigrationRun(src_json, dst_json, wall, incoming.maxrss_kib, source.maxrss_kib)


# -- raw copies -------------------------------------------------------------------------
def dd_direct(src_data: Path, dst_data: Path, *, timeout: float = 600.0) -> tuple[int, float]:
    """``dd bs=1M`` from one data file to the other; (bytes, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["dd", f"if={src_data}", f"of={dst_data}", "bs=1M"],
        capture_output=True, text=True, timeout=timeout, check=False,
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
        ["sh", "-c",
         f"socat -u TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr STDOUT"
         f" | dd of={dst_data} bs=1M iflag=fullblock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
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
            capture_output=True, text=True, timeout=timeout, check=False,
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
            text = m.log_path.read_text(errors="replace")
        found = re.findall(r"^\s+max_write=0x([0-9a-f]+)", text, re.MULTILINE)
        if found:
            parts.insert(0, f"max_write {int(found[-1], 16) // 1024} KiB (negotiated)")
    except BenchError as exc:
        parts.append(f"probe failed: {exc}")
    return "; ".join(parts) or "unknown"
