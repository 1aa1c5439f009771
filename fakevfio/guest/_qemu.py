"""Boot a guest image in QEMU, optionally under ``fakevfio run`` with a mount's devices.

Theory of operation: :func:`boot` starts ``qemu-system-x86_64`` (``$FAKEVFIO_QEMU``
overrides) with the image as ``-kernel``/``-initrd``, the serial console to
``WORKDIR/NAME.console`` and QMP on a socket in a short temporary directory (a
socket path has at most 107 bytes). With devices, QEMU runs
under ``python -m fakevfio run --mount MOUNT`` and gets each device through the
iommufd cdev path: a shell inside the namespace opens ``/dev/iommu`` as fd 3 and
``/dev/vfio/devices/vfioN`` (the device's ``info`` names N) as fd 4, 5, ..., then
execs QEMU with ``-object iommufd,fd=3`` and ``-device vfio-pci,id=NAME,fd=4,...``.
QEMU's and the supervisor's output go to ``WORKDIR/NAME.log``. QMP is the
:class:`~fakevfio.guest.Qmp` (on the ``qemu.qmp`` library's synchronous client).

Rule 1: :meth:`Guest.wait_for_line` looks at complete console lines after the
line of its previous match (so successive waits walk the console forward) and
returns the ``re.Match``. It fails at once when QEMU exits or the guest's script
exits first, and after ``timeout`` seconds otherwise.
Rule 2: every failure is a :class:`GuestError` whose message ends with the
console's last lines and QEMU's log tail, so a failing test shows what the guest
printed.
Rule 3: leaving :func:`boot` always ends QEMU (``quit`` over QMP, then SIGKILL of
its process group) and never leaves a process behind.
Rule 4: ``accel="auto"`` is KVM when KVM works, else TCG. "Works" is tried, not
assumed: a ``/dev/kvm`` that opens can still fail to run a guest (nested
virtualisation refusing an MSR, or a guest that never prints), so the first
auto boot boots the image once under KVM without devices and keeps the answer
in ``accel.json`` beside the cached kernel, keyed by QEMU's binary and the host
kernel. ``$FAKEVFIO_GUEST_ACCEL`` (``kvm``/``tcg``) overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import attrs

from fakevfio.guest._errors import GuestError, GuestTimeout
from fakevfio.guest._image import EXIT_PREFIX, READY_LINE, GuestImage
from fakevfio.guest._qmp import Qmp

DEFAULT_QEMU = "qemu-system-x86_64"
TAIL_LINES = 40
#: QEMU's default enable-migration=auto applies: the devices offer DMA logging.
DEFAULT_VFIO_OPTIONS = "rombar=0"
_POLL_S = 0.05


class _HasPath(Protocol):
    @property
    def path(self) -> Path: ...


def qemu_binary() -> str:
    """The QEMU to run: ``$FAKEVFIO_QEMU`` or ``qemu-system-x86_64``."""
    return os.environ.get("FAKEVFIO_QEMU", DEFAULT_QEMU)


def qemu_missing_reason(qemu: str | None = None) -> str | None:
    """Why guests cannot boot here (None: they can)."""
    binary = qemu or qemu_binary()
    if shutil.which(binary) is None:
        return f"{binary} is not installed (apt-get install qemu-system-x86)"
    return None


def kvm_usable() -> bool:
    """Whether ``/dev/kvm`` opens read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


KVM_PROBE_TIMEOUT_S = 20.0


def choose_accel(image: GuestImage, qemu: str | None = None) -> str:
    """``kvm`` when this image boots under KVM here, else ``tcg`` (Rule 4)."""
    forced = os.environ.get("FAKEVFIO_GUEST_ACCEL")
    if forced:
        return forced
    if not kvm_usable():
        return "tcg"
    binary = shutil.which(qemu or qemu_binary()) or (qemu or qemu_binary())
    try:
        st = os.stat(binary)
    except OSError:
        return "tcg"
    key = f"{os.path.realpath(binary)}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}"
    memo = image.kernel.parent / "accel.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["key"] == key:
            return str(saved["accel"])
    accel = "tcg"
    with tempfile.TemporaryDirectory(prefix="fakevfio-kvm-probe-") as tmp:
        try:
            with boot(image, workdir=tmp, accel="kvm", ready_timeout=KVM_PROBE_TIMEOUT_S):
                accel = "kvm"
        except GuestError:
            pass
    fd, tmp_name = tempfile.mkstemp(dir=memo.parent, prefix=".accel-")
    with os.fdopen(fd, "w") as out:
        json.dump({"key": key, "accel": accel}, out)
    os.replace(tmp_name, memo)
    return accel


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError as exc:
        return f"({path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@attrs.define(eq=False)
class Guest:
    """A running QEMU with its console file and QMP connection (see :func:`boot`)."""

    name: str
    console_path: Path
    log_path: Path
    workdir: Path
    sockets: Path  # a short directory for the QMP and migration sockets
    process: subprocess.Popen[bytes]
    qmp: Qmp
    _cursor: int = 0

    # -- the console ---------------------------------------------------------------
    def console_lines(self) -> list[str]:
        """The console's complete lines so far (without ``\\r``)."""
        try:
            raw = self.console_path.read_bytes()
        except FileNotFoundError:
            return []
        text = raw.decode(errors="replace").replace("\r", "")
        return text.split("\n")[:-1]

    def console(self) -> str:
        """Everything the guest printed so far."""
        return "\n".join(self.console_lines())

    def tails(self, lines: int = TAIL_LINES) -> str:
        """The console's last lines and the QEMU log's, for an error message."""
        return (
            f"--- console tail ({self.console_path}, last {lines} lines) ---\n"
            f"{_tail(self.console_path, lines)}\n"
            f"--- QEMU log tail ({self.log_path}) ---\n{_tail(self.log_path, 15)}"
        )

    def fail(self, message: str, *, timeout: bool = False) -> NoReturn:
        """Raise a :class:`GuestError` (or GuestTimeout) with the tails (Rule 2)."""
        error = GuestTimeout if timeout else GuestError
        raise error(f"guest {self.name}: {message}\n{self.tails()}")

    def wait_for_line(self, regex: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for a console line matching ``regex`` (``re.search``) after the last match.

        Returns the match; raises :class:`GuestError` when QEMU or the guest's
        script exits first and :class:`GuestTimeout` after ``timeout`` s (Rule 1).
        """
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll()
            lines = self.console_lines()
            for index in range(self._cursor, len(lines)):
                found = pattern.search(lines[index])
                if found:
                    self._cursor = index + 1
                    return found
                if lines[index].startswith(EXIT_PREFIX):
                    self._cursor = index + 1
                    self.fail(
                        f"the guest script ended ({lines[index]!r}) before a line "
                        f"matching {pattern.pattern!r}"
                    )
            if exited is not None:
                self.fail(
                    f"QEMU exited with status {exited} before a console line "
                    f"matching {pattern.pattern!r}"
                )
            if time.monotonic() > deadline:
                self.fail(
                    f"no console line matching {pattern.pattern!r} within {timeout:g} s",
                    timeout=True,
                )
            time.sleep(_POLL_S)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait until the guest's script ends; its exit status (the init prints it)."""
        found = self.wait_for_line(re.compile("^" + re.escape(EXIT_PREFIX) + r"(\d+)$"), timeout)
        return int(found.group(1))

    def expect_success(self, timeout: float = 60.0) -> None:
        """Wait for the script to end and fail (with the tails) unless it exited 0."""
        status = self.wait_exit(timeout)
        if status != 0:
            self.fail(f"the guest script exited with status {status}, expected 0")

    # -- QMP -----------------------------------------------------------------------
    def cmd(self, name: str, **arguments: Any) -> Any:
        """One QMP command; its ``return`` value (:class:`QmpCommandError` on QEMU's refusal)."""
        return self.qmp.cmd(name, **arguments)

    def status(self) -> str:
        """``query-status``'s status: ``running``, ``inmigrate``, ``postmigrate``, ..."""
        return str(self.cmd("query-status")["status"])

    def wait_status(self, status: str, timeout: float = 30.0) -> None:
        """Wait until ``query-status`` says ``status``."""
        deadline = time.monotonic() + timeout
        while (now := self.status()) != status:
            if time.monotonic() > deadline:
                self.fail(f"VM status is {now!r} after {timeout:g} s, expected {status!r}")
            time.sleep(_POLL_S * 2)

    def quit(self, timeout: float = 30.0) -> int:
        """Ask QEMU to quit; its exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit")
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"QEMU did not exit within {timeout:g} s of quit")

    def _stop(self) -> None:
        self.qmp.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _cdev(mount: Path, device: str) -> str:
    info_path = mount / "devices" / device / "info"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise GuestError(
            f"device {device!r}: cannot read {info_path} ({exc}); is {mount} a fakevfio "
            "mount with that device?"
        ) from None
    return str(info["cdev"]).rsplit("/", 1)[-1]


def qemu_argv(
    image: GuestImage,
    *,
    console: Path,
    qmp: Path,
    devices: Sequence[str] = (),
    memory: str = "256M",
    accel: str = "auto",
    incoming: bool = False,
    vfio_options: str = DEFAULT_VFIO_OPTIONS,
    cmdline: str = "",
    qemu: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """QEMU's command line; device i is ``-device vfio-pci,fd=4+i`` with fd 3 the iommufd."""
    if accel == "auto":
        accel = choose_accel(image, qemu)
    argv = [qemu or qemu_binary(), "-accel", accel, "-machine", "q35", "-nodefaults"]
    argv += ["-cpu", os.environ.get("FAKEVFIO_GUEST_CPU", "max"), "-m", memory, "-smp", "1"]
    argv += ["-display", "none", "-no-reboot", "-kernel", str(image.kernel)]
    argv += ["-initrd", str(image.initrd), "-serial", f"file:{console}"]
    argv += ["-append", f"console=ttyS0 panic=-1 quiet {cmdline}".strip()]
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if devices:
        argv += ["-object", "iommufd,id=iommufd0,fd=3"]
    for index, name in enumerate(devices):
        options = f",{vfio_options}" if vfio_options else ""
        argv += ["-device", f"vfio-pci,id={name},iommufd=iommufd0,fd={4 + index}{options}"]
    if incoming:
        argv += ["-incoming", "defer"]
    return [*argv, *extra_args]


@contextlib.contextmanager
def boot(
    image: GuestImage,
    mount: str | os.PathLike[str] | _HasPath | None = None,
    devices: Sequence[str] = (),
    *,
    workdir: str | os.PathLike[str],
    name: str = "guest",
    memory: str = "256M",
    accel: str = "auto",
    incoming: bool = False,
    wait_ready: bool = True,
    ready_timeout: float = 60.0,
    vfio_options: str = DEFAULT_VFIO_OPTIONS,
    cmdline: str = "",
    qemu: str | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Guest]:
    """Boot ``image``; with ``mount``, under ``fakevfio run`` with ``devices`` passed through.

    ``incoming=True`` starts a migration destination (``-incoming defer``, see
    :func:`fakevfio.guest.migrate`). Otherwise it waits for the init's ready line
    unless ``wait_ready=False``. Files go to ``workdir``: ``NAME.console`` and
    ``NAME.log``. Leaving the block ends QEMU (Rule 3).
    """
    if devices and mount is None:
        raise GuestError(f"devices {list(devices)} need the mount they live on (mount=...)")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    console, log = work / f"{name}.console", work / f"{name}.log"
    console.unlink(missing_ok=True)
    # A socket path has at most 107 bytes; pytest's tmp_path is often longer.
    sockets = Path(tempfile.mkdtemp(prefix="fakevfio-guest-"))
    qmp_path = sockets / "qmp"
    argv = qemu_argv(
        image,
        console=console,
        qmp=qmp_path,
        devices=devices,
        memory=memory,
        accel=accel,
        incoming=incoming,
        vfio_options=vfio_options,
        cmdline=cmdline,
        qemu=qemu,
        extra_args=extra_args,
    )
    if mount is not None:
        mount_path = Path(mount if isinstance(mount, (str, os.PathLike)) else mount.path)
        opens = ["exec 3<>/dev/iommu"]
        opens += [
            f"{4 + i}<>/dev/vfio/devices/{_cdev(mount_path, d)}" for i, d in enumerate(devices)
        ]
        script = " ".join(opens) + ' && exec "$@"'
        run = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount_path), "--"]
        argv = [*run, "sh", "-c", script, "sh", *argv]
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    guest: Guest | None = None
    try:
        qmp = Qmp.connect(qmp_path, process, log, timeout=30)
        guest = Guest(
            name=name,
            console_path=console,
            log_path=log,
            workdir=work,
            sockets=sockets,
            process=process,
            qmp=qmp,
        )
        if wait_ready and not incoming:
            guest.wait_for_line("^" + re.escape(READY_LINE) + "$", ready_timeout)
        yield guest
        guest.quit()
    finally:
        if guest is not None:
            guest._stop()
        elif process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(sockets, ignore_errors=True)


__all__ = [
    "DEFAULT_QEMU",
    "DEFAULT_VFIO_OPTIONS",
    "Guest",
    "GuestError",
    "GuestTimeout",
    "boot",
    "choose_accel",
    "kvm_usable",
    "qemu_argv",
    "qemu_binary",
    "qemu_missing_reason",
]
