"""The guest kit: boot a small Linux guest with fakevfio devices passed through, in tests.

An edge room like :mod:`fakevfio.testing`: it starts processes (apt-get,
dpkg-deb, QEMU, ``fakevfio run``); no product module imports it. Three steps:

* :func:`build_image` makes a guest from Debian's packages (the kernel image
  package ``linux-image-amd64`` depends on, and ``busybox-static``; downloaded,
  never installed) whose init mounts proc, sys, devtmpfs and /tmp, prints
  :data:`READY_LINE`, runs your shell script and prints ``fakevfio-guest: exit N``.
  Cached under ``~/.cache/fakevfio/guest`` (``$XDG_CACHE_HOME``,
  ``$FAKEVFIO_GUEST_CACHE``), rebuilt only when an input changes.
* :func:`boot` runs it in QEMU (TCG, or KVM when it works), under ``fakevfio
  run`` with a mount's devices as ``-device vfio-pci``; the :class:`Guest` has
  the console (:meth:`Guest.wait_for_line`, :meth:`Guest.expect_success`) and
  QMP (:meth:`Guest.cmd`, through :class:`Qmp`, the one QMP client here, on ``qemu.qmp``;
  the QEMU tests and benchmark use it too).
* :func:`migrate` live-migrates a guest into a destination booted with
  ``incoming=True`` and returns QEMU's statistics (:class:`MigrationStats`).

Every failure is a :class:`GuestError` whose message ends with the guest's
console tail and QEMU's log tail. Example (``tmp`` a directory, ``mnt`` a
fakevfio mount with ``gpu0``)::

    from fakevfio.guest import boot, build_image, migrate

    script = "cat /sys/bus/pci/devices/0000:00:01.0/vendor; while :; do echo tick; sleep 1; done"
    image = build_image(script)
    with boot(image, mnt.path, ["gpu0"], workdir=tmp, name="src") as src, \\
            boot(image, dst_mnt.path, ["gpu0"], workdir=tmp, name="dst", incoming=True) as dst:
        src.wait_for_line("0x1af4")
        stats = migrate(src, dst, multifd=True)
        dst.wait_for_line("tick", timeout=10)
        print(stats.downtime_ms, stats.total_time_ms)

:class:`GuestSession` holds the guests of one test and ends them all at its
end; the pytest plugin's ``vfio_guest`` fixture is one, with the skip rules
(no QEMU or no apt: skip, but fail under ``CI=true``).
"""

from __future__ import annotations

from fakevfio.guest._cpio import Entry, newc_archive
from fakevfio.guest._errors import GuestError, GuestTimeout
from fakevfio.guest._image import (
    BUSYBOX_PACKAGE,
    EXIT_PREFIX,
    INIT,
    KERNEL_META_PACKAGE,
    READY_LINE,
    GuestBuildError,
    GuestImage,
    Package,
    build_image,
    default_cache_dir,
    resolve_packages,
)
from fakevfio.guest._migrate import MigrationError, MigrationStats, migrate
from fakevfio.guest._qemu import (
    DEFAULT_VFIO_OPTIONS,
    Guest,
    boot,
    choose_accel,
    kvm_usable,
    qemu_argv,
    qemu_binary,
    qemu_missing_reason,
)
from fakevfio.guest._qmp import Qmp, QmpCommandError, QmpConnectionError
from fakevfio.guest._session import GuestSession, MountLike

__all__ = [
    "BUSYBOX_PACKAGE",
    "DEFAULT_VFIO_OPTIONS",
    "EXIT_PREFIX",
    "INIT",
    "KERNEL_META_PACKAGE",
    "READY_LINE",
    "Entry",
    "Guest",
    "GuestBuildError",
    "GuestError",
    "GuestImage",
    "GuestSession",
    "GuestTimeout",
    "MigrationError",
    "MigrationStats",
    "MountLike",
    "Package",
    "Qmp",
    "QmpCommandError",
    "QmpConnectionError",
    "boot",
    "build_image",
    "choose_accel",
    "default_cache_dir",
    "kvm_usable",
    "migrate",
    "newc_archive",
    "qemu_argv",
    "qemu_binary",
    "qemu_missing_reason",
    "resolve_packages",
]
