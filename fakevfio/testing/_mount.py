"""The one mount lifecycle: start ``fakevfio mount``, wait until it serves, always unmount.

:func:`mount` (a context manager) and :func:`start_mount` (the caller unmounts)
run ``python -m fakevfio mount`` in a subprocess (one FUSE mount per process,
and a hung server must never hang the caller) and return a :class:`Mount`
handle with small helpers for the device files.

Cleanup is the point: leaving a mount (normally, by an exception, or by
``KeyboardInterrupt``) stops the server with SIGTERM (it unmounts itself),
kills it if it does not exit, and then force-unmounts the mountpoint if it is
still mounted or stale. The server also gets SIGTERM if the thread that
started it dies, even by SIGKILL (see :func:`parent_death_signal`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import attrs

from fakevfio._environment import find_fusermount
from fakevfio.testing._process import HarnessError, parent_death_signal, read_line

#: The line ``fakevfio mount`` prints on stdout once the filesystem is served.
READY_PREFIX = "fakevfio: mounted "
DEFAULT_READY_TIMEOUT_S = 60.0
#: How long a server gets to unmount itself after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 15.0
_counter = itertools.count()

Devices = Mapping[str, str] | Sequence[str]


class MountError(HarnessError):
    """``fakevfio mount`` exited or did not get ready; holds the server's stderr."""

    def __init__(self, mountpoint: Path, reason: str, stderr: str) -> None:
        self.mountpoint = mountpoint
        self.reason = reason
        self.stderr = stderr
        detail = stderr.strip() or "(no output)"
        super().__init__(f"fakevfio mount {mountpoint} {reason}: {detail}")


# -- files ------------------------------------------------------------------------------
def read_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> bytes:
    """Read a whole device file with ``read()`` calls of ``chunk`` bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while data := os.read(fd, chunk):
            out += data
        return bytes(out)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: str | bytes) -> None:
    """One ``write()`` of ``data`` (opened ``O_WRONLY|O_TRUNC``); raises ``OSError``.

    The files are direct I/O, so the driver sees exactly that one write.
    """
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        written = os.write(fd, raw)
    finally:
        os.close(fd)
    if written != len(raw):
        raise OSError(errno.EIO, f"short write to {path}: {written} of {len(raw)} bytes")


def errno_of(fn: Callable[..., object], *args: Any) -> int | None:
    """Call ``fn(*args)``; the errno of the ``OSError`` it raised, or None if it succeeded."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


# -- device specs -------------------------------------------------------------------------
def device_args(devices: Devices) -> list[str]:
    """``--device`` values for ``fakevfio mount``.

    ``devices`` is either a mapping ``{"gpu0": "ram:size=64M,seed=1"}`` (name to
    ``DRIVER[:key=value,...]``) or CLI spec strings ``["gpu0=ram:size=64M"]``.
    """
    if isinstance(devices, str):
        raise TypeError("devices must be a mapping or a sequence of NAME=DRIVER[:...] strings")
    if isinstance(devices, Mapping):
        return [f"{name}={spec}" for name, spec in devices.items()]
    return list(devices)


# -- the mount handle ---------------------------------------------------------------------
@attrs.define(eq=False)
class Mount:
    """A live fakevfio mount served by a subprocess, with helpers for device files.

    Reads and writes use plain ``os`` calls: one ``write()`` per write helper
    (the files are direct I/O, so the driver sees exactly that write). Errors
    from the device arrive as ``OSError`` with the kernel's errno.
    """

    path: Path
    process: subprocess.Popen[bytes]
    stderr_path: Path
    #: What the server printed once it served (``fakevfio: mounted ...``).
    ready_line: str = ""
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def devices_dir(self) -> Path:
        return self.path / "devices"

    def device(self, name: str) -> Path:
        """The device directory, as the migrator's DEVICE argument takes it."""
        return self.devices_dir / name

    def device_names(self) -> list[str]:
        return sorted(p.name for p in self.devices_dir.iterdir())

    def stderr(self) -> str:
        """What the server printed on stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # raw files
    def read_bytes(self, name: str, rel: str, chunk: int = 1 << 20) -> bytes:
        return read_file(self.device(name) / rel, chunk)

    def read(self, name: str, rel: str) -> str:
        return self.read_bytes(name, rel).decode()

    def write(self, name: str, rel: str, data: str | bytes) -> None:
        """One ``write()`` of ``data`` to a device file; raises ``OSError``."""
        write_file(self.device(name) / rel, data)

    # typed helpers
    def info(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.read(name, "info"))
        return result

    def digest(self, name: str) -> str:
        """``state_digest`` from ``info`` (stable while the device is not RUNNING)."""
        return str(self.info(name)["state_digest"])

    def config(self, name: str) -> bytes:
        return self.read_bytes(name, "config")

    def state(self, name: str) -> str:
        return self.read(name, "migration/state").strip()

    def set_state(self, name: str, state: str) -> None:
        """Write ``migration/state``; a refused or failed arc raises ``OSError``."""
        self.write(name, "migration/state", state + "\n")

    def log(self, name: str) -> list[str]:
        """``migration/log``: one ``FROM TO [ERRNO]`` line per arc, oldest first."""
        return self.read(name, "migration/log").splitlines()

    def faults(self, name: str) -> list[str]:
        return self.read(name, "faults").splitlines()

    def set_faults(self, name: str, rules: str | Iterable[str]) -> None:
        """Replace the device's fault rules, e.g. ``["arc STOP STOP_COPY EIO"]``."""
        self.write(name, "faults", fault_text(rules))

    def clear_faults(self, name: str) -> None:
        self.write(name, "faults", "")

    def reset(self, name: str) -> None:
        self.write(name, "reset", "1\n")

    def create(self, name: str, driver: str = "ram", **options: str | int) -> None:
        """Create a device at run time through ``drivers/<driver>/create``."""
        self.create_line(driver, " ".join([name, *(f"{k}={v}" for k, v in options.items())]))

    def create_line(self, driver: str, line: str) -> None:
        """Write ``line`` (``NAME [key=value ...]``) to ``drivers/<driver>/create``."""
        write_file(self.path / "drivers" / driver / "create", line + "\n")

    def remove(self, name: str) -> None:
        self.write(name, "remove", "1\n")

    # lifecycle
    def is_mounted(self) -> bool:
        """True while the mountpoint is mounted, stale mounts included."""
        return _is_mounted_or_stale(self.path)

    def unmount(self) -> None:
        """Stop the server and make sure nothing stays mounted. Idempotent.

        A second ``KeyboardInterrupt`` during the cleanup restarts the cleanup
        and is then re-raised, so an impatient Ctrl-C does not leave a mount.
        """
        if self._closed:
            return
        try:
            _stop_server(self.process, self.path)
        except KeyboardInterrupt:
            _stop_server(self.process, self.path)
            raise
        finally:
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()


def fault_text(rules: str | Iterable[str]) -> str:
    """Fault rules as the ``faults`` file takes them: one rule a line."""
    lines = [rules] if isinstance(rules, str) else list(rules)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines if line)


def _is_mounted_or_stale(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError as exc:
        # A dead server's mount answers ENOTCONN; os.path.ismount() would say
        # False for it (it swallows every OSError).
        return exc.errno == errno.ENOTCONN
    return os.path.ismount(path)


def force_unmount(path: str | os.PathLike[str]) -> bool:
    """Lazily unmount ``path`` (live or stale); True when it is no longer mounted."""
    target = Path(path)
    tool = find_fusermount()
    commands = ([[tool, "-u", "-z", str(target)]] if tool else []) + [["umount", "-l", str(target)]]
    for cmd in commands:
        if not _is_mounted_or_stale(target):
            break
        with contextlib.suppress(OSError):
            subprocess.run(cmd, capture_output=True, check=False, timeout=30)
    return not _is_mounted_or_stale(target)


def _stop_server(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the server unmounts itself
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if _is_mounted_or_stale(mountpoint):
        force_unmount(mountpoint)


# -- starting a server ----------------------------------------------------------------------
def start_mount(
    mountpoint: str | os.PathLike[str],
    devices: Devices,
    *,
    extra_args: Sequence[str] = (),
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    stderr_path: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> Mount:
    """Start ``fakevfio mount`` on an existing empty directory; wait until it serves.

    The caller owns the returned :class:`Mount` and must call ``unmount()``
    (or use it as a context manager). On any failure here, including
    ``KeyboardInterrupt``, the server is already stopped.

    Raises:
        MountError: the server exited or did not print its ready line in time.
    """
    path = Path(mountpoint).absolute()
    log = Path(stderr_path) if stderr_path is not None else path.with_name(path.name + ".stderr")
    cmd = [python, "-m", "fakevfio", "mount", str(path)]
    for spec in device_args(devices):
        cmd += ["--device", spec]
    cmd += list(extra_args)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=parent_death_signal(),
        )
    handle = Mount(path, proc, log)
    try:
        handle.ready_line = _wait_ready(handle, ready_timeout)
    except BaseException:
        handle.unmount()
        raise
    return handle


def _wait_ready(handle: Mount, timeout: float) -> str:
    assert handle.process.stdout is not None
    line = read_line(handle.process.stdout, time.monotonic() + timeout)
    if line is None:
        raise MountError(handle.path, f"not ready after {timeout} s", handle.stderr())
    if not line.endswith(b"\n"):
        status = handle.process.wait()
        raise MountError(handle.path, f"exited with status {status}", handle.stderr())
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY_PREFIX):
        raise MountError(handle.path, f"printed {text!r} instead of its ready line", "")
    return text


@contextlib.contextmanager
def mount(
    devices: Devices,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
) -> Iterator[Mount]:
    """Mount ``devices`` on a new directory; unmount on the way out, whatever happens.

    Example::

        with mount({"gpu0": "ram:size=64M,seed=1"}) as m:
            m.set_state("gpu0", "STOP")
            print(m.digest("gpu0"))

    Args:
        devices: ``{"NAME": "DRIVER[:key=value,...]"}`` or ``["NAME=DRIVER[:...]"]``.
        base_dir: where to create the mountpoint ``mntN`` and the server's
            stderr ``mntN.stderr`` (default: a new temporary directory,
            removed afterwards).
        extra_args: more ``fakevfio mount`` arguments, e.g. ``["--driver", "x=m:C"]``.
    """
    with contextlib.ExitStack() as stack:
        if base_dir is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fakevfio-")))
        else:
            base = Path(base_dir)
        mountpoint = base / f"mnt{next(_counter)}"
        mountpoint.mkdir(parents=True)
        handle = start_mount(
            mountpoint, devices, extra_args=extra_args, ready_timeout=ready_timeout
        )
        stack.callback(handle.unmount)
        yield handle


__all__ = [
    "DEFAULT_READY_TIMEOUT_S",
    "READY_PREFIX",
    "Devices",
    "Mount",
    "MountError",
    "device_args",
    "errno_of",
    "fault_text",
    "force_unmount",
    "mount",
    "read_file",
    "start_mount",
    "write_file",
]
