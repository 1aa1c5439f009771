"""pytest fixtures for testing VFIO migration code against fakevfio devices.

Installed as the ``pytest11`` entry point ``fakevfio``, so a project that has
fakevfio installed gets these fixtures without a ``conftest.py``:

``vfio_fuse``
    Skips the test, saying why, when FUSE mounts cannot work here. Under
    ``CI=true`` (or ``FAKEVFIO_REQUIRE_FUSE=1``) it fails instead: a CI job
    that silently skips every migration test is worse than a red one.
``vfio_mount``
    A factory: ``vfio_mount({"gpu0": "ram:size=64M,seed=1"})`` mounts those
    devices and returns a :class:`fakevfio.testing.Mount`. Every mount is
    unmounted at teardown, also when the test failed or was interrupted with
    Ctrl-C; a mount whose server died is force-unmounted.
``vfio_migrate``
    ``vfio_migrate(src, dst)`` runs ``migrator incoming`` and ``migrator
    migrate --json`` between two mounts and returns a
    :class:`fakevfio.testing.MigrationResult` (both parsed JSON objects, exit
    codes and stderr). It raises :class:`fakevfio.testing.MigrationFailed` if
    the migration fails, unless you pass ``check=False``.

Example::

    def test_gpu_migrates(vfio_mount, vfio_migrate):
        src = vfio_mount({"gpu0": "ram:size=64M,seed=1"})
        dst = vfio_mount({"gpu0": "ram:size=64M"})
        result = vfio_migrate(src, dst)
        assert result.source["status"] == "completed"
        assert dst.digest("gpu0") == src.digest("gpu0")

``vfio_guest``
    A :class:`fakevfio.guest.GuestSession`: ``vfio_guest.boot(script_or_image,
    mount, ["gpu0"])`` boots a small Linux guest in QEMU with the mount's
    devices as ``-device vfio-pci`` and returns a :class:`fakevfio.guest.Guest`
    (``wait_for_line``, ``expect_success``, QMP ``cmd``);
    ``vfio_guest.migrate(src, dst, multifd=True)`` live-migrates. Every guest
    ends at teardown; ask for it after ``vfio_mount``, so that guests end
    before their devices' mounts. Skips, saying why, without QEMU or apt
    (fails under ``CI=true``); see docs/guests.md.

The fixture names start with ``vfio_`` so they do not clash with fakevfio's
own ``tests/conftest.py`` (``fakevfio_mount``). This module imports neither
pyfuse3 nor trio: it loads, and skips cleanly, on machines without libfuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import GuestSession, qemu_missing_reason
from fakevfio.testing import (
    DEFAULT_READY_TIMEOUT_S,
    Devices,
    MigrationResult,
    Mount,
    fuse_missing_reason,
    fuse_required,
    migrate,
    migrate_devices,
    mount,
)

MountFactory = Callable[..., Mount]
MigrateFunction = Callable[..., MigrationResult]


def require_fuse() -> None:
    """Skip the calling test when FUSE mounts cannot work; fail instead in CI."""
    reason = fuse_missing_reason()
    if reason is None:
        return
    if fuse_required():
        pytest.fail(
            f"fakevfio needs FUSE in CI (CI=true or FAKEVFIO_REQUIRE_FUSE=1), but {reason}",
            pytrace=False,
        )
    pytest.skip(f"needs FUSE: {reason}")


def pytest_report_header(config: pytest.Config) -> str:
    reason = fuse_missing_reason()
    return "fakevfio: FUSE mounts available" if reason is None else f"fakevfio: no FUSE: {reason}"


@pytest.fixture
def vfio_fuse() -> None:
    """Skip (or, in CI, fail) the test when FUSE mounts cannot work here."""
    require_fuse()


@pytest.fixture
def vfio_mount(vfio_fuse: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountFactory]:
    """Factory: ``vfio_mount(devices, extra_args=(), ready_timeout=60) -> Mount``.

    ``devices`` is ``{"NAME": "DRIVER[:key=value,...]"}`` or a list of
    ``"NAME=DRIVER[:key=value,...]"`` strings. All mounts are unmounted at
    teardown, in reverse order; a failing unmount does not stop the others.
    """
    base = tmp_path_factory.mktemp("vfio")
    with contextlib.ExitStack() as stack:

        def factory(
            devices: Devices,
            *,
            extra_args: Sequence[str] = (),
            ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
        ) -> Mount:
            return stack.enter_context(
                mount(devices, base_dir=base, extra_args=extra_args, ready_timeout=ready_timeout)
            )

        yield factory


@pytest.fixture
def vfio_migrate(vfio_fuse: None) -> MigrateFunction:
    """``vfio_migrate(src, dst, names=None, **options) -> MigrationResult``.

    ``src`` and ``dst`` are :class:`Mount` handles (devices are matched by
    name; default: all of ``src``'s) or sequences of migrator DEVICE arguments.
    Keyword arguments: ``options`` (both sides, e.g. ``["--multifd-channels",
    "4"]``), ``dest_options``, ``listen`` (default ``tcp:127.0.0.1:0``),
    ``timeout``, ``check`` (default True: raise ``MigrationFailed``).
    """

    def run(
        source: Mount | Sequence[str | os.PathLike[str]],
        dest: Mount | Sequence[str | os.PathLike[str]],
        names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> MigrationResult:
        if isinstance(source, Mount) and isinstance(dest, Mount):
            return migrate(source, dest, names, **kwargs)
        if isinstance(source, Mount) or isinstance(dest, Mount):
            raise TypeError("pass two Mount handles or two sequences of DEVICE arguments")
        if names is not None:
            raise TypeError("names only applies to Mount handles")
        return migrate_devices([Path(d) for d in source], [Path(d) for d in dest], **kwargs)

    return run


def guest_missing_reason() -> str | None:
    """Why guests cannot be built and booted here (None: they can)."""
    reason = qemu_missing_reason()
    if reason is not None:
        return reason
    for tool, package in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"the guest kit builds from Debian packages and needs {tool} ({package})"
    return None


def require_guest() -> None:
    """Skip the calling test when guests cannot boot here; fail instead under CI=true."""
    reason = guest_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"guest tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(f"needs the guest kit: {reason}")


@pytest.fixture
def vfio_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestSession]:
    """A :class:`fakevfio.guest.GuestSession` whose guests all end at teardown."""
    require_guest()
    with GuestSession(workdir=tmp_path_factory.mktemp("guest")) as session:
        yield session


__all__ = [
    "guest_missing_reason",
    "require_fuse",
    "require_guest",
    "vfio_fuse",
    "vfio_guest",
    "vfio_migrate",
    "vfio_mount",
]
