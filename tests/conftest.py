"""Shared fixtures: FUSE availability, deadline guards and real fakevfio mounts.

Tests marked ``fuse`` need ``/dev/fuse``, ``fusermount3`` (or ``fusermount``)
and pyfuse3. Without them they skip with the reason, except under ``CI=true``,
where a missing FUSE setup is a failure (CI must run them): the pytest
plugin's :func:`~fakevfio.pytest_plugin.require_fuse` decides.

Mounts are :func:`fakevfio.testing.mount` (a subprocess per mount, always
unmounted), seen through :class:`MountHandle`. Use the
``fakevfio_mount`` fixture (function scope) or ``fakevfio_mount_module``
(shared by a test module); both return a factory::

    def test_x(fakevfio_mount):
        with fakevfio_mount(["src=ram:size=1M,seed=1", "dst=ram:size=1M"]) as m:
            (m.device("src") / "migration" / "state").write_text("STOP\\n")
"""

from __future__ import annotations

import contextlib
import inspect
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from fakevfio import testing
from fakevfio.pytest_plugin import require_fuse

DEFAULT_DEADLINE_S = 60


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): fail a test that runs longer (default 60 s)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        require_fuse()  # skips with the reason; fails under CI=true


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


#: Run ``fn``; the errno of the OSError it raised, or None.
oserror_errno = testing.errno_of


class MountHandle:
    """A :class:`fakevfio.testing.Mount` whose write helpers return the errno (None: success).

    The project's own tests compare errnos a lot; this view saves them a
    ``pytest.raises`` per write. Reads still raise ``OSError``.
    """

    errno_of = staticmethod(testing.errno_of)
    read_bytes = staticmethod(testing.read_file)

    def __init__(self, mount: testing.Mount) -> None:
        self.mount = mount
        self.path = mount.path
        self.proc = mount.process
        self.log = mount.stderr_path

    @staticmethod
    def write_bytes(path: Path, data: bytes) -> int | None:
        """One ``write()`` to ``path`` (opened O_WRONLY|O_TRUNC); the errno, or None."""
        return testing.errno_of(testing.write_file, path, data)

    def device(self, name: str) -> Path:
        return self.mount.device(name)

    def file(self, name: str, rel: str) -> Path:
        return self.device(name) / rel

    def read(self, name: str, rel: str) -> str:
        return self.mount.read(name, rel)

    def write(self, name: str, rel: str, text: str | bytes) -> int | None:
        return testing.errno_of(self.mount.write, name, rel, text)

    def state(self, name: str) -> str:
        return self.mount.state(name)

    def set_state(self, name: str, state: str) -> int | None:
        return testing.errno_of(self.mount.set_state, name, state)

    def info(self, name: str) -> dict[str, Any]:
        return self.mount.info(name)

    def log_lines(self, name: str) -> list[str]:
        return self.mount.log(name)

    def create(self, name: str, driver: str = "ram", options: str = "") -> int | None:
        return testing.errno_of(self.mount.create_line, driver, f"{name} {options}".strip())

    def remove(self, name: str) -> int | None:
        return testing.errno_of(self.mount.remove, name)

    def reset(self, name: str) -> None:
        self.mount.reset(name)


@contextlib.contextmanager
def mount_fakevfio(
    base: Path,
    devices: Sequence[str],
    *,
    extra_args: Sequence[str] = (),
    ready_timeout: float = testing.DEFAULT_READY_TIMEOUT_S,
) -> Iterator[MountHandle]:
    """Mount ``devices`` (``NAME=DRIVER[:k=v,...]``) under a new dir in ``base``.

    :func:`fakevfio.testing.mount`: always stopped and unmounted on the way
    out; a server that does not get ready raises ``MountError``.
    """
    with testing.mount(
        devices, base_dir=base, extra_args=extra_args, ready_timeout=ready_timeout
    ) as m:
        yield MountHandle(m)


MountFactory = Callable[..., contextlib.AbstractContextManager[MountHandle]]


@pytest.fixture
def fakevfio_mount(tmp_path: Path) -> MountFactory:
    """Factory: ``with fakevfio_mount(["a=ram:size=1M"]) as m: ...`` (function scope)."""
    return _factory(tmp_path)


@pytest.fixture(scope="module")
def fakevfio_mount_module(tmp_path_factory: pytest.TempPathFactory) -> MountFactory:
    """Like ``fakevfio_mount``, for mounts a whole test module shares."""
    return _factory(tmp_path_factory.mktemp("fakevfio"))


def _factory(base: Path) -> MountFactory:
    def factory(
        devices: Sequence[str], **kwargs: Any
    ) -> contextlib.AbstractContextManager[MountHandle]:
        return mount_fakevfio(base, devices, **kwargs)

    return factory
