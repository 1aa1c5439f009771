"""Shared fixtures: FUSE availability, deadline guards and real fakevfio mounts.

Tests marked ``fuse`` need ``/dev/fuse``, ``fusermount3`` (or ``fusermount``)
and pyfuse3. Without them they skip with the reason, except under ``CI=true``,
where a missing FUSE setup is a failure (CI must run them).

Mounts run ``python -m fakevfio mount`` in a subprocess (one FUSE mount per
process, and a hung mount must never hang pytest itself). Use the
``fakevfio_mount`` fixture (function scope) or ``fakevfio_mount_module``
(shared by a test module); both return a factory::

    def test_x(fakevfio_mount):
        with fakevfio_mount(["src=ram:size=1M,seed=1", "dst=ram:size=1M"]) as m:
            (m.device("src") / "migration" / "state").write_text("STOP\\n")
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from fakevfio.testing import force_unmount

READY_PREFIX = "fakevfio: mounted "
DEFAULT_DEADLINE_S = 60
_counter = itertools.count()


def fuse_missing_reason() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "neither fusermount3 nor fusermount is installed"
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): fail a test that runs longer (default 60 s)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is None:
        return
    reason = fuse_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"FUSE tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(f"needs FUSE: {reason}")


class DeadlineExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """A SIGALRM guard for synchronous tests (trio tests use ``trio.fail_after``)."""
    marker = request.node.get_closest_marker("deadline")
    if inspect.iscoroutinefunction(getattr(request, "function", None)) and marker is None:
        yield
        return
    seconds = int(marker.args[0]) if marker else DEFAULT_DEADLINE_S

    def expired(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"test exceeded its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def oserror_errno(fn: Callable[[], object]) -> int | None:
    """Run ``fn``; return the errno of the OSError it raised, or None."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


class MountHandle:
    """A live fakevfio mount with small helpers for its files (raw os calls)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.path = path
        self.proc = proc
        self.log = log

    @staticmethod
    def errno_of(fn: Callable[..., object], *args: Any) -> int | None:
        """Call ``fn(*args)``; the errno of the OSError it raised, or None if it succeeded."""
        return oserror_errno(lambda: fn(*args))

    def device(self, name: str) -> Path:
        return self.path / "devices" / name

    def file(self, name: str, rel: str) -> Path:
        return self.device(name) / rel

    def read(self, name: str, rel: str) -> str:
        return self.read_bytes(self.file(name, rel)).decode()

    @staticmethod
    def read_bytes(path: Path, size: int = 1 << 20) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            out = b""
            while chunk := os.read(fd, size):
                out += chunk
            return out
        finally:
            os.close(fd)

    @staticmethod
    def write_bytes(path: Path, data: bytes) -> int | None:
        """One ``write()`` to ``path`` (opened O_WRONLY|O_TRUNC); the errno, or None."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            return exc.errno
        try:
            n = os.write(fd, data)
            assert n == len(data)
        except OSError as exc:
            return exc.errno
        finally:
            os.close(fd)
        return None

    def write(self, name: str, rel: str, text: str | bytes) -> int | None:
        data = text.encode() if isinstance(text, str) else text
        return self.write_bytes(self.file(name, rel), data)

    def state(self, name: str) -> str:
        return self.read(name, "migration/state").strip()

    def set_state(self, name: str, state: str) -> int | None:
        return self.write(name, "migration/state", state + "\n")

    def info(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.read(name, "info"))
        return result

    def log_lines(self, name: str) -> list[str]:
        return self.read(name, "migration/log").splitlines()

    def create(self, name: str, driver: str = "ram", options: str = "") -> int | None:
        line = f"{name} {options}".strip() + "\n"
        return self.write_bytes(self.path / "drivers" / driver / "create", line.encode())

    def remove(self, name: str) -> int | None:
        return self.write(name, "remove", "1\n")

    def reset(self, name: str) -> None:
        assert self.write(name, "reset", "1\n") is None


@contextlib.contextmanager
def mount_fakevfio(
    base: Path,
    devices: Sequence[str],
    *,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 60.0,
) -> Iterator[MountHandle]:
    """Mount ``devices`` (``NAME=DRIVER[:k=v,...]``) under a new dir in ``base``.

    Always stops the server and unmounts on the way out, even when the test or
    the startup failed.
    """
    n = next(_counter)
    mountpoint = base / f"mnt{n}"
    mountpoint.mkdir(parents=True)
    log = base / f"mnt{n}.stderr"
    cmd = [sys.executable, "-m", "fakevfio", "mount", str(mountpoint)]
    for spec in devices:
        cmd += ["--device", spec]
    cmd += list(extra_args)
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + ready_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(
                        f"fakevfio mount not ready after {ready_timeout} s: "
                        f"{log.read_text(errors='replace')}"
                    )
                chunk = os.read(proc.stdout.fileno(), 1)
                if not chunk:
                    raise RuntimeError(
                        f"fakevfio mount exited ({proc.wait()}): {log.read_text(errors='replace')}"
                    )
                line += chunk
        assert line.decode().startswith(READY_PREFIX), line
        yield MountHandle(mountpoint, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        force_unmount(mountpoint)  # no-op unless still mounted, or stale


MountFactory = Callable[..., contextlib.AbstractContextManager[MountHandle]]


@pytest.fixture
def fakevfio_mount(tmp_path: Path) -> MountFactory:
    """Factory: ``with fakevfio_mount(["a=ram:size=1M"]) as m: ...`` (function scope)."""

    def factory(
        devices: Sequence[str], **kwargs: Any
    ) -> contextlib.AbstractContextManager[MountHandle]:
        return mount_fakevfio(tmp_path, devices, **kwargs)

    return factory


@pytest.fixture(scope="module")
def fakevfio_mount_module(tmp_path_factory: pytest.TempPathFactory) -> MountFactory:
    """Like ``fakevfio_mount``, for mounts a whole test module shares."""
    base = tmp_path_factory.mktemp("fakevfio")

    def factory(
        devices: Sequence[str], **kwargs: Any
    ) -> contextlib.AbstractContextManager[MountHandle]:
        return mount_fakevfio(base, devices, **kwargs)

    return factory
