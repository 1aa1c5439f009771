"""Build a small x86-64 guest (kernel + busybox initramfs) from Debian's packages.

Theory of operation: two binary packages make a guest that boots in a few
seconds under TCG: the kernel image package that ``linux-image-amd64`` depends
on (e.g. ``linux-image-6.1.0-57-amd64``) and ``busybox-static``. They are fetched
with ``apt-get download`` (nothing is installed) into the cache and unpacked
with ``dpkg-deb --fsys-tarfile``; only ``boot/vmlinuz-*``, ``boot/config-*`` and
``bin/busybox`` (``usr/bin/busybox`` on merged-/usr Debian 13) are taken.
The initramfs is a newc cpio written by
:mod:`fakevfio.guest._cpio` (no ``cpio`` binary needed): busybox with its applet
links, ``/dev/console``, the init of :data:`INIT` and the test's script at
``/guest/script``.

Rule 1: the cache (``$FAKEVFIO_GUEST_CACHE``, else ``$XDG_CACHE_HOME/fakevfio/guest``,
else ``~/.cache/fakevfio/guest``) holds ``debs/`` (the downloaded packages),
``kernel/PKG_VERSION/`` (the unpacked kernel and its config) and ``images/KEY/``
(an initramfs). KEY is a hash of every input: both package names and versions,
the init, the script and the extra files. An image is rebuilt only when KEY changes.
Rule 2: every cache entry is written under a temporary name and renamed into
place, so an interrupted build leaves no half entry and two builds do not clash.
Rule 3: package versions come from ``apt-cache`` (local, no network); only a
missing ``.deb`` is downloaded. ``$FAKEVFIO_GUEST_KERNEL_PACKAGE`` names another
kernel package (e.g. a backports one).
Rule 4: what fails says which command failed with its output and how to fix it
(:class:`GuestBuildError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from fakevfio.guest._cpio import Entry, newc_archive

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
FORMAT = 1  # bump when the image layout changes

#: Lines the init prints on the console (the kit waits on them).
READY_LINE = "fakevfio-guest: ready"
EXIT_PREFIX = "fakevfio-guest: exit "

#: The initramfs's /init: mounts, then runs /guest/script with sh, then idles.
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "{READY_LINE}"
sh /guest/script
echo "{EXIT_PREFIX}$?"
while :; do sleep 3600; done
"""


class GuestBuildError(RuntimeError):
    """The guest image could not be built (the message says what failed and the fix)."""


@attrs.frozen(kw_only=True)
class Package:
    """A Debian binary package at one version."""

    name: str
    version: str

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


@attrs.frozen(kw_only=True)
class GuestImage:
    """A bootable guest: pass ``kernel`` as ``-kernel`` and ``initrd`` as ``-initrd``."""

    kernel: Path
    initrd: Path
    kernel_config: Path
    kernel_package: Package
    busybox_package: Package
    key: str
    cached: bool  # True: found in the cache, nothing was built

    def config_option(self, name: str) -> str | None:
        """The value of ``CONFIG_NAME`` in the kernel's config (``y``, ``m``, ...), or None."""
        prefix = f"{name}="
        for line in self.kernel_config.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        return None


def default_cache_dir() -> Path:
    """Where images are cached (Rule 1)."""
    if explicit := os.environ.get("FAKEVFIO_GUEST_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fakevfio" / "guest"


def _run(argv: list[str], fix: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError:
        raise GuestBuildError(f"building the guest needs {argv[0]!r}, not found; {fix}") from None
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed with exit status {done.returncode}: "
            f"{done.stderr.strip() or done.stdout.strip()}; {fix}"
        )
    return done.stdout


_APT_FIX = (
    "the guest kit needs a Debian/Ubuntu apt with the main archive configured (apt-get update)"
)


def _candidate(name: str) -> Package:
    out = _run(["apt-cache", "show", "--no-all-versions", name], _APT_FIX)
    for line in out.splitlines():
        if line.startswith("Version: "):
            return Package(name=name, version=line.split(None, 1)[1])
    raise GuestBuildError(f"apt-cache show {name} printed no Version line; {_APT_FIX}")


def _apt_signature(kernel: str) -> str:
    """What apt's answer depends on: its package lists and configuration, by stat."""
    parts = [kernel]
    for top in ("/var/lib/apt/lists", "/etc/apt"):
        for dirpath, _dirs, names in sorted(os.walk(top)):
            for name in sorted(names):
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(dirpath, name))
                    parts.append(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def resolve_packages(cache_dir: str | os.PathLike[str] | None = None) -> tuple[Package, Package]:
    """The kernel and busybox packages to use, at their candidate versions (Rule 3).

    apt-cache takes about a second per call here, so the answer is kept in the
    cache's ``packages.json`` until apt's lists or configuration change.
    """
    kernel = os.environ.get("FAKEVFIO_GUEST_KERNEL_PACKAGE", "")
    memo = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "packages.json"
    signature = _apt_signature(kernel)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["signature"] == signature:
            return Package(**saved["kernel"]), Package(**saved["busybox"])
    found = _resolve(kernel)
    memo.parent.mkdir(parents=True, exist_ok=True)
    record = {"signature": signature, "kernel": attrs.asdict(found[0])}
    record["busybox"] = attrs.asdict(found[1])
    fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".packages-")
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
    os.replace(tmp, memo)
    return found


def _resolve(kernel: str) -> tuple[Package, Package]:
    if not kernel:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], _APT_FIX)
        names = [
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.strip().startswith("Depends: linux-image-")
        ]
        if not names:
            raise GuestBuildError(
                f"{KERNEL_META_PACKAGE} depends on no linux-image-* package:\n{out}{_APT_FIX}"
            )
        kernel = names[0]
    return _candidate(kernel), _candidate(BUSYBOX_PACKAGE)


def _deb(cache: Path, package: Package) -> Path:
    """The package's .deb in the cache, downloaded when missing."""
    debs = cache / "debs"
    target = debs / package.deb_name
    if target.exists():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    system = Path("/var/cache/apt/archives") / package.deb_name
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        if system.exists():
            shutil.copyfile(system, Path(tmp) / package.deb_name)
        else:
            _run(
                ["apt-get", "download", f"{package.name}={package.version}"],
                f"check the network and apt sources, or put {package.deb_name} in {debs}",
                cwd=Path(tmp),
            )
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestBuildError(f"apt-get download {package.name} left {got} in {tmp}")
        os.chmod(got[0], 0o644)
        got[0].rename(target)
    return target


def _members(deb: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise GuestBuildError("building the guest needs dpkg-deb (package dpkg)") from None
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield tar, member
    except tarfile.TarError as exc:
        raise GuestBuildError(
            f"dpkg-deb --fsys-tarfile {deb} gave no readable tar ({exc}); delete {deb} "
            "so that the next build downloads it again"
        ) from None
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def _extract(deb: Path, wanted: Mapping[str, str], dest: Path) -> None:
    """Copy the members whose names start with each key to dest/value (Rule 2)."""
    found: dict[str, bytes] = {}
    for tar, member in _members(deb):
        name = member.name.removeprefix("./")
        for prefix in wanted:
            if name.startswith(prefix) and member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                found[prefix] = handle.read()
        if len(found) == len(wanted):
            break
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise GuestBuildError(f"{deb.name} holds no {missing}: is it the right package?")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    for prefix, out in wanted.items():
        (tmp / out).write_bytes(found[prefix])
    try:
        tmp.rename(dest)
    except OSError:  # another build got there first
        shutil.rmtree(tmp)


def _kernel(cache: Path, package: Package) -> Path:
    dest = cache / "kernel" / f"{package.name}_{package.version}"
    if not (dest / "vmlinuz").exists():
        _extract(_deb(cache, package), {"boot/vmlinuz-": "vmlinuz", "boot/config-": "config"}, dest)
    return dest


def _busybox(cache: Path, package: Package) -> Path:
    dest = cache / "busybox" / f"{package.name}_{package.version}"
    if not (dest / "busybox").exists():
        extract_busybox(_deb(cache, package), dest)
    return dest / "busybox"


def extract_busybox(deb: Path, dest: Path) -> None:
    """dest/busybox from busybox-static's ``bin/busybox``, or ``usr/bin/busybox`` where
    the package follows merged /usr (Debian 13)."""
    try:
        _extract(deb, {"bin/busybox": "busybox"}, dest)
    except GuestBuildError:
        _extract(deb, {"usr/bin/busybox": "busybox"}, dest)


def initramfs(busybox: bytes, script: str, files: Mapping[str, bytes] = {}) -> bytes:
    """The initramfs: busybox, /dev/console, INIT as /init, the script, extra files."""
    entries = [Entry.directory(d) for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin")]
    entries += [Entry.directory(d) for d in ("dev", "proc", "sys", "tmp", "root", "etc")]
    entries += [
        Entry.directory("guest"),
        Entry.char_device("dev/console", 5, 1),
        Entry.file("bin/busybox", busybox, 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.file("init", INIT.encode(), 0o755),
        Entry.file("guest/script", script.encode(), 0o755),
    ]
    for name, data in sorted(files.items()):
        entries.append(Entry.file(f"guest/{name}", data, 0o755))
    return newc_archive(entries)


def image_key(kernel: Package, busybox: Package, script: str, files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    head = {"format": FORMAT, "kernel": attrs.asdict(kernel), "busybox": attrs.asdict(busybox)}
    for part in (json.dumps(head, sort_keys=True), INIT, script):
        digest.update(part.encode() + b"\0")
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:24]


def build_image(
    script: str = "",
    *,
    files: Mapping[str, bytes] = {},
    cache_dir: str | os.PathLike[str] | None = None,
) -> GuestImage:
    """The guest whose init runs ``script`` (sh) after mounting proc, sys, dev and /tmp.

    ``files`` go to ``/guest/NAME`` in the guest (mode 0755). Cached (Rule 1):
    the first build downloads about 70 MB; later ones with other scripts take
    well under a second, and an unchanged one only stats files.
    """
    for name in files:
        if not name or "/" in name or name == "script":
            raise GuestBuildError(
                f"guest file name {name!r}: expected a plain file name other than 'script'"
            )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel_pkg, busybox_pkg = resolve_packages(cache)
    kernel_dir = _kernel(cache, kernel_pkg)
    key = image_key(kernel_pkg, busybox_pkg, script, files)
    image_dir = cache / "images" / key
    initrd = image_dir / "initrd.cpio"
    cached = initrd.exists()
    if not cached:
        data = initramfs(_busybox(cache, busybox_pkg).read_bytes(), script, files)
        image_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=image_dir, prefix=".initrd-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, initrd)
    return GuestImage(
        kernel=kernel_dir / "vmlinuz",
        initrd=initrd,
        kernel_config=kernel_dir / "config",
        kernel_package=kernel_pkg,
        busybox_package=busybox_pkg,
        key=key,
        cached=cached,
    )


__all__ = [
    "EXIT_PREFIX",
    "INIT",
    "READY_LINE",
    "GuestBuildError",
    "GuestImage",
    "Package",
    "build_image",
    "default_cache_dir",
    "image_key",
    "initramfs",
    "resolve_packages",
]
