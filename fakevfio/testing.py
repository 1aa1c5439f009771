"""Helpers for using fakevfio in other projects' tests and CI, with or without pytest.

:func:`mount` serves devices with ``python -m fakevfio mount`` in a subprocess
(one FUSE mount per process, and a hung server must never hang the caller) and
returns a :class:`Mount` handle with small helpers for the device files.
:func:`migrate` runs ``migrator incoming`` and ``migrator migrate --json``
between two mounts. :func:`fuse_problems` says what is missing when FUSE
mounts cannot work here, and how to fix it.

Cleanup is the point of this module: leaving a mount context (normally, by an
exception, or by ``KeyboardInterrupt``) stops the server with SIGTERM (it
unmounts itself), kills it if it does not exit, and then force-unmounts the
mountpoint if it is still mounted or stale. The server also gets SIGTERM if
the process that started it dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so
a killed test run leaves no server behind. Known shortcoming: the death signal
fires when the *thread* that started the server exits, so start mounts from a
thread that outlives them (pytest fixtures do).

Nothing here imports pyfuse3 or pytest; :mod:`fakevfio.pytest_plugin` builds
fixtures on top of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import itertools
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import attrs

from fakevfio.errors import FakeVfioError

#: The line ``fakevfio mount`` prints on stdout once the filesystem is served.
READY_PREFIX = "fakevfio: mounted "
#: The line ``migrator incoming`` prints on stderr once it listens.
LISTENING_PREFIX = "migrator: listening on "
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_MIGRATION_TIMEOUT_S = 120.0
#: How long a server gets to unmount itself after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 15.0
#: CAP_SYS_ADMIN's bit in /proc/self/status capability masks.
_CAP_SYS_ADMIN_BIT = 21
_PR_SET_PDEATHSIG = 1
_counter = itertools.count()

Devices = Mapping[str, str] | Sequence[str]


class MountError(FakeVfioError):
    """``fakevfio mount`` exited or did not get ready; holds the server's stderr."""

    def __init__(self, mountpoint: Path, reason: str, stderr: str) -> None:
        self.mountpoint = mountpoint
        self.reason = reason
        self.stderr = stderr
        detail = stderr.strip() or "(no output)"
        super().__init__(f"fakevfio mount {mountpoint} {reason}: {detail}")


class MigrationFailed(FakeVfioError):
    """A migration run by :func:`migrate` with ``check=True`` did not complete."""

    def __init__(self, result: MigrationResult) -> None:
        self.result = result
        super().__init__(
            f"migration failed (source exit {result.source_returncode}, destination exit "
            f"{result.dest_returncode}): source: {_last_line(result.source_stderr)}; "
            f"destination: {_last_line(result.dest_stderr)}"
        )


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# -- FUSE availability ------------------------------------------------------------------
def _fusermount() -> str | None:
    # libfuse tries /usr/bin/fusermount3 before $PATH; which() is close enough.
    return shutil.which("fusermount3") or shutil.which("fusermount")


def _capability_bounding_set() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def _user_allow_other(fuse_conf: str) -> bool:
    try:
        with open(fuse_conf, encoding="utf-8", errors="replace") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def fuse_problems(
    mountpoint: str | os.PathLike[str] | None = None,
    *,
    allow_other: bool = False,
    dev_fuse: str = "/dev/fuse",
    fusermount: str | None = "",
    euid: int | None = None,
    cap_bounding_set: int | None = -1,
    fuse_conf: str = "/etc/fuse.conf",
) -> list[str]:
    """Say why ``fakevfio mount`` cannot work here; an empty list means it should.

    Each entry names what is missing and how to fix it, in one line. The checks
    are the common causes, not a proof: an AppArmor or SELinux policy that
    denies ``mount`` (Docker's default AppArmor profile does) is not detected.

    Args:
        mountpoint: also check that this user may mount there (fusermount3 wants
            write access to the mountpoint).
        allow_other: also check that ``--allow-other`` is permitted.
        dev_fuse, fusermount, euid, cap_bounding_set, fuse_conf: for tests; the
            defaults probe this machine (``fusermount=""`` means look it up,
            ``None`` means not installed; ``cap_bounding_set=-1`` means read
            ``/proc/self/status``).
    """
    problems: list[str] = []
    uid = os.geteuid() if euid is None else euid
    try:
        st = os.stat(dev_fuse)
    except FileNotFoundError:
        problems.append(
            f"{dev_fuse} does not exist: load the FUSE module (sudo modprobe fuse); in a "
            "container, start it with --device /dev/fuse"
        )
    except OSError as exc:
        problems.append(f"cannot stat {dev_fuse}: {exc.strerror}")
    else:
        if not os.access(dev_fuse, os.R_OK | os.W_OK):
            mode = stat.S_IMODE(st.st_mode)
            problems.append(
                f"{dev_fuse} (mode {mode:04o}, owner uid {st.st_uid} gid {st.st_gid}) is not "
                f"readable and writable by uid {uid}: make it 0666, the usual mode "
                f"(sudo chmod 0666 {dev_fuse}), or run as root"
            )
    bounding = _capability_bounding_set() if cap_bounding_set == -1 else cap_bounding_set
    if bounding is not None and not bounding >> _CAP_SYS_ADMIN_BIT & 1:
        problems.append(
            "CAP_SYS_ADMIN is not in this process's capability bounding set, so nothing "
            "here can mount, not even the setuid fusermount3: in Docker add "
            "--cap-add SYS_ADMIN (see docs/ci.md)"
        )
    if uid != 0:
        tool = _fusermount() if fusermount == "" else fusermount
        if tool is None:
            problems.append(
                "fusermount3 is not installed: ordinary users mount through the setuid "
                "fusermount3 helper (sudo apt-get install fuse3), or run as root"
            )
        else:
            try:
                tool_st = os.stat(tool)
            except OSError as exc:
                problems.append(f"cannot stat {tool}: {exc.strerror}")
            else:
                if not (tool_st.st_mode & stat.S_ISUID and tool_st.st_uid == 0):
                    problems.append(
                        f"{tool} is not setuid root (mode "
                        f"{stat.S_IMODE(tool_st.st_mode):04o}, owner uid {tool_st.st_uid}): "
                        f"sudo chown root {tool} && sudo chmod u+s {tool} (the fuse3 package "
                        "installs it so)"
                    )
        if (
            mountpoint is not None
            and os.path.isdir(mountpoint)
            and not os.access(mountpoint, os.W_OK)
        ):
            problems.append(
                f"uid {uid} has no write access to the mountpoint {os.fspath(mountpoint)}: "
                "fusermount3 only mounts on directories the user may write (use one you "
                "own, e.g. under $TMPDIR)"
            )
        if allow_other and not _user_allow_other(fuse_conf):
            problems.append(
                f"--allow-other needs 'user_allow_other' in {fuse_conf} for non-root users "
                f"(echo user_allow_other | sudo tee -a {fuse_conf})"
            )
    if importlib.util.find_spec("pyfuse3") is None:
        problems.append(
            "pyfuse3 is not installed: pip install pyfuse3 (building it needs libfuse3-dev "
            "and pkg-config: sudo apt-get install libfuse3-dev pkg-config)"
        )
    return problems


def fuse_missing_reason() -> str | None:
    """The first of :func:`fuse_problems`, or None when mounts should work."""
    problems = fuse_problems()
    return problems[0] if problems else None


def fuse_required() -> bool:
    """Whether a missing FUSE setup is a failure rather than a skip.

    ``FAKEVFIO_REQUIRE_FUSE=1`` or ``0`` decides; otherwise it is required when
    ``CI=true`` (GitHub Actions, GitLab CI and most others set it).
    """
    explicit = os.environ.get("FAKEVFIO_REQUIRE_FUSE", "").strip()
    if explicit:
        return explicit not in ("0", "false", "no")
    return os.environ.get("CI", "").strip().lower() == "true"


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
        fd = os.open(self.device(name) / rel, os.O_RDONLY)
        try:
            out = bytearray()
            while data := os.read(fd, chunk):
                out += data
            return bytes(out)
        finally:
            os.close(fd)

    def read(self, name: str, rel: str) -> str:
        return self.read_bytes(name, rel).decode()

    def write(self, name: str, rel: str, data: str | bytes) -> None:
        """One ``write()`` of ``data`` to a device file; raises ``OSError``."""
        _write_once(self.device(name) / rel, data)

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
        lines = [rules] if isinstance(rules, str) else list(rules)
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines if line)
        self.write(name, "faults", text)

    def clear_faults(self, name: str) -> None:
        self.write(name, "faults", "")

    def reset(self, name: str) -> None:
        self.write(name, "reset", "1\n")

    def create(self, name: str, driver: str = "ram", **options: str | int) -> None:
        """Create a device at run time through ``drivers/<driver>/create``."""
        line = " ".join([name, *(f"{k}={v}" for k, v in options.items())]) + "\n"
        _write_once(self.path / "drivers" / driver / "create", line)

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


def _write_once(path: Path, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        written = os.write(fd, raw)
    finally:
        os.close(fd)
    if written != len(raw):
        raise OSError(errno.EIO, f"short write to {path}: {written} of {len(raw)} bytes")


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
    tool = _fusermount()
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
def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks for SIGTERM when our thread dies (Linux only).

    libc is loaded here, in the parent: the child only makes one prctl() call
    between fork and exec, and never runs the dynamic loader.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


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
            preexec_fn=_parent_death_signal(),
        )
    handle = Mount(path, proc, log)
    try:
        _wait_ready(handle, ready_timeout)
    except BaseException:
        handle.unmount()
        raise
    return handle


def _wait_ready(handle: Mount, timeout: float) -> None:
    proc = handle.process
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise MountError(handle.path, f"not ready after {timeout} s", handle.stderr())
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                status = proc.wait()
                raise MountError(handle.path, f"exited with status {status}", handle.stderr())
            line += chunk
    if not line.decode(errors="replace").startswith(READY_PREFIX):
        raise MountError(handle.path, f"printed {line!r} instead of its ready line", "")


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
        base_dir: where to create the mountpoint (default: a new temporary
            directory, removed afterwards).
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


# -- migration ---------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class MigrationResult:
    """Both sides of one migration: exit codes, parsed ``--json`` objects, stderr."""

    source: dict[str, Any]
    dest: dict[str, Any]
    source_returncode: int
    dest_returncode: int
    source_stderr: str
    dest_stderr: str

    @property
    def ok(self) -> bool:
        return self.source_returncode == 0 and self.dest_returncode == 0


def _parse_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return {}


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _start_incoming(cmd: list[str], timeout: float) -> tuple[subprocess.Popen[str], str, str]:
    """Start ``migrator incoming``; return it, the address it listens on, and its stderr so far.

    The address is empty when it exited or did not listen within ``timeout``
    (then it is already dead).
    """
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen = bytearray()
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            line = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    proc.kill()  # the caller collects it
                    seen += f"migrator incoming did not listen within {timeout} s\n".encode()
                    return proc, "", seen.decode(errors="replace")
                ch = os.read(proc.stderr.fileno(), 1)  # one byte: leave the rest in the pipe
                if not ch:
                    seen += line
                    return proc, "", seen.decode(errors="replace")
                line += ch
                if ch == b"\n":
                    text = line.decode(errors="replace")
                    if text.startswith(LISTENING_PREFIX):
                        return proc, text[len(LISTENING_PREFIX):].strip(), seen.decode()
                    seen += line
                    line.clear()
    except BaseException:
        _kill(proc)
        raise


def migrate_devices(
    source: Sequence[str | os.PathLike[str]],
    dest: Sequence[str | os.PathLike[str]],
    *,
    options: Sequence[str] = (),
    dest_options: Sequence[str] = (),
    listen: str = "tcp:127.0.0.1:0",
    timeout: float = DEFAULT_MIGRATION_TIMEOUT_S,
    check: bool = True,
    python: str = sys.executable,
) -> MigrationResult:
    """``migrator incoming`` on ``dest``, then ``migrator migrate`` from ``source``.

    DEVICE arguments are as the migrator takes them (device directories, with an
    optional ``,id=IDSTR``). ``options`` go to both sides (``--multifd-channels``
    and ``--switchover-ack`` must agree), ``dest_options`` only to the destination.
    Both sides run with ``--json``.

    Raises:
        MigrationFailed: with ``check=True``, when either side exits non-zero.
    """
    migrator = [python, "-m", "migrator"]
    src_args = [os.fspath(d) for d in source]
    dst_args = [os.fspath(d) for d in dest]
    incoming, addr, early = _start_incoming(
        [*migrator, "incoming", "--listen", listen, "--json", *options, *dest_options, *dst_args],
        timeout,
    )
    if not addr:  # it exited before listening: bad arguments, busy device, ...
        out, err = incoming.communicate()
        result = MigrationResult(
            source={}, dest=_parse_json(out), source_returncode=-1,
            dest_returncode=incoming.returncode, source_stderr="source not started",
            dest_stderr=early + err,
        )
        if check:
            raise MigrationFailed(result)
        return result
    try:
        src = subprocess.run(
            [*migrator, "migrate", "--to", addr, "--json", *options, *src_args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            check=False,
        )
        out, err = incoming.communicate(timeout=timeout)
    except BaseException:
        _kill(incoming)
        raise
    result = MigrationResult(
        source=_parse_json(src.stdout), dest=_parse_json(out),
        source_returncode=src.returncode, dest_returncode=incoming.returncode,
        source_stderr=src.stderr, dest_stderr=early + err,
    )
    if check and not result.ok:
        raise MigrationFailed(result)
    return result


def migrate(
    source: Mount,
    dest: Mount,
    names: Sequence[str] | None = None,
    **kwargs: Any,
) -> MigrationResult:
    """Migrate devices ``names`` (default: all of ``source``'s) to same-named devices.

    Keyword arguments are :func:`migrate_devices`'s.
    """
    chosen = source.device_names() if names is None else list(names)
    return migrate_devices(
        [source.device(n) for n in chosen], [dest.device(n) for n in chosen], **kwargs
    )


__all__ = [
    "READY_PREFIX",
    "Devices",
    "MigrationFailed",
    "MigrationResult",
    "Mount",
    "MountError",
    "device_args",
    "force_unmount",
    "fuse_missing_reason",
    "fuse_problems",
    "fuse_required",
    "migrate",
    "migrate_devices",
    "mount",
    "start_mount",
]
