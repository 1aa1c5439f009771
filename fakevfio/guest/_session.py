"""A guest session: builds, boots and migrates guests, and ends them all at the end.

Theory of operation: :class:`GuestSession` is what the ``vfio_guest`` pytest
fixture hands a test (and what a script can use with ``with``): ``build`` is
:func:`~fakevfio.guest.build_image`, ``boot`` is :func:`~fakevfio.guest.boot`
entered on the session's exit stack with the workdir filled in and names
``guest0``, ``guest1``, ... by default, ``migrate`` is
:func:`~fakevfio.guest.migrate`.

Rule 1: :meth:`GuestSession.close` (or leaving the ``with``) ends every guest it
booted, in reverse order, even when the test failed.
Rule 2: a mount is a path or anything with a ``path`` attribute (a
``fakevfio.testing.Mount``, the project's ``MountHandle``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import attrs

from fakevfio.guest._image import GuestImage, build_image
from fakevfio.guest._migrate import MigrationStats, migrate
from fakevfio.guest._qemu import Guest, boot


class HasPath(Protocol):
    @property
    def path(self) -> Path: ...


MountLike = str | os.PathLike[str] | HasPath


def mount_path(mount: MountLike) -> Path:
    """A mount's directory (Rule 2)."""
    if isinstance(mount, (str, os.PathLike)):
        return Path(mount)
    return Path(mount.path)


@attrs.define(eq=False)
class GuestSession:
    """Guests of one test; see the module docstring."""

    workdir: Path
    cache_dir: Path | None = None
    _stack: contextlib.ExitStack = attrs.field(factory=contextlib.ExitStack, init=False)
    _count: int = attrs.field(default=0, init=False)

    def build(self, script: str = "", *, files: Mapping[str, bytes] = {}) -> GuestImage:
        """A guest whose init runs ``script`` (see :func:`fakevfio.guest.build_image`)."""
        return build_image(script, files=files, cache_dir=self.cache_dir)

    def boot(
        self,
        image: GuestImage | str,
        mount: MountLike | None = None,
        devices: Sequence[str] = (),
        *,
        name: str | None = None,
        **options: Any,
    ) -> Guest:
        """Boot ``image`` (or a script, built first) with ``mount``'s ``devices``.

        Options are :func:`fakevfio.guest.boot`'s (``incoming``, ``memory``,
        ``accel``, ``vfio_options``, ``ready_timeout``, ...).
        """
        if isinstance(image, str):
            image = self.build(image)
        if name is None:
            name = f"guest{self._count}"
        self._count += 1
        path = None if mount is None else mount_path(mount)
        return self._stack.enter_context(
            boot(image, path, devices, workdir=self.workdir, name=name, **options)
        )

    def migrate(self, source: Guest, destination: Guest, **options: Any) -> MigrationStats:
        """:func:`fakevfio.guest.migrate` (``uri``, ``multifd``, ``return_path``, ...)."""
        return migrate(source, destination, **options)

    def close(self) -> None:
        """End every guest booted here (Rule 1)."""
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["GuestSession", "HasPath", "MountLike", "mount_path"]
