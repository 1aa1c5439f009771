"""A current Linux uAPI header set (``linux-libc-dev`` >= 7.1) for the ABI test.

Rules:

1. ``FAKEVFIO_UAPI_INCLUDE`` names an include directory to use as it is (a
   user's own kernel's ``make headers_install`` output); it must hold
   ``linux/vfio.h``, ``linux/iommufd.h`` and ``linux/version.h``.
2. Otherwise the system's ``/usr/include`` is used when its header is 7.1 or
   newer; else the newest ``linux-libc-dev`` >= 7.1 of Debian trixie-backports
   (or, failing that, unstable) is fetched with ``apt-get download`` through a temporary
   sources list and apt state directory (nothing is installed, the system's apt
   state is not touched) and unpacked once into
   ``~/.cache/fakevfio/uapi-headers/<version>/`` (``XDG_CACHE_HOME`` is honoured).
3. :func:`find_headers` never raises for a missing network or apt: it returns
   None and the reason, which the test turns into a skip, or under ``CI=true``
   into a failure.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import attrs

MIN_VERSION = (7, 1)
#: Archives that carry a new enough linux-libc-dev for a Debian 12 or 13 machine, tried
#: in order: trixie-backports first (its index is 0.3 MB; unstable's is 11 MB).
SOURCES = tuple(
    f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    f"http://deb.debian.org/debian {suite} main\n"
    for suite in ("trixie-backports", "sid")
)
_TIMEOUT_S = 300


@attrs.frozen
class Headers:
    """An include directory and the kernel release its uAPI headers come from."""

    include: Path
    #: Where they came from ("linux-libc-dev 7.2.13-1", "/usr/include", ...).
    origin: str
    version: tuple[int, int, int]

    @property
    def cflags(self) -> list[str]:
        """gcc flags that put these headers (and their ``asm/``) before the system's."""
        flags = ["-I", str(self.include)]
        multiarch = self.include / "x86_64-linux-gnu"
        if multiarch.is_dir():
            flags += ["-I", str(multiarch)]
        return flags


def _version(include: Path) -> tuple[int, int, int] | None:
    try:
        text = (include / "linux" / "version.h").read_text()
    except OSError:
        return None
    match = re.search(r"#define\s+LINUX_VERSION_CODE\s+(\d+)", text)
    if match is None:
        return None
    code = int(match.group(1))
    return code >> 16, (code >> 8) & 0xFF, code & 0xFF


def _complete(include: Path) -> bool:
    return all((include / "linux" / name).is_file() for name in ("vfio.h", "iommufd.h"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fakevfio" / "uapi-headers"


def _cached() -> Headers | None:
    root = cache_dir()
    best: Headers | None = None
    for entry in sorted(root.glob("*/usr/include")) if root.is_dir() else []:
        version = _version(entry)
        if version is None or version[:2] < MIN_VERSION or not _complete(entry):
            continue
        if best is None or version > best.version:
            best = Headers(entry, f"linux-libc-dev {entry.parent.parent.name}", version)
    return best


def _apt(state: Path, *argv: str) -> str:
    options = [
        f"-oDir::Etc::SourceList={state / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={state / 'lists'}",
        f"-oDir::Cache={state / 'cache'}",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root",
    ]
    tool, *rest = argv
    done = subprocess.run(
        [tool, *options, *rest],
        cwd=state,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if done.returncode:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip()[-400:]}")
    return done.stdout


def _newest(madison: str) -> str | None:
    """The newest version >= MIN_VERSION in ``apt-cache madison`` output."""
    found: list[tuple[tuple[int, ...], str]] = []
    for line in madison.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 2:
            continue
        numbers = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", parts[1])
        if numbers is None:
            continue
        key = tuple(int(n or 0) for n in numbers.groups())
        if key[:2] >= MIN_VERSION:
            found.append((key, parts[1]))
    return max(found)[1] if found else None


def _fetch() -> Headers:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise OSError("no apt-get/dpkg-deb on this machine (a Debian or Ubuntu apt is needed)")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".apt-") as tmp:
        state = Path(tmp)
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        version = None
        for source in SOURCES:
            (state / "sources.list").write_text(source)
            _apt(state, "apt-get", "update")
            version = _newest(_apt(state, "apt-cache", "madison", "linux-libc-dev"))
            if version is not None:
                break
        if version is None:
            raise OSError(f"no linux-libc-dev >= {MIN_VERSION[0]}.{MIN_VERSION[1]} in the archives")
        _apt(state, "apt-get", "download", f"linux-libc-dev={version}")
        (deb,) = state.glob("linux-libc-dev_*.deb")
        unpacked = state / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, timeout=_TIMEOUT_S)
        dest = root / version
        if not dest.exists():
            unpacked.rename(dest)
    include = root / version / "usr" / "include"
    got = _version(include)
    if got is None or not _complete(include):
        raise OSError(f"linux-libc-dev {version} unpacked without the VFIO/iommufd headers")
    return Headers(include, f"linux-libc-dev {version}", got)


def find_headers() -> tuple[Headers | None, str]:
    """The headers to check against (Rules 1-3), or None and why there are none."""
    override = os.environ.get("FAKEVFIO_UAPI_INCLUDE")
    if override:
        include = Path(override)
        version = _version(include)
        if version is None or not _complete(include):
            return (
                None,
                f"FAKEVFIO_UAPI_INCLUDE={override} lacks linux/vfio.h, linux/iommufd.h "
                "or linux/version.h",
            )
        return Headers(include, f"FAKEVFIO_UAPI_INCLUDE={override}", version), ""
    system = Path("/usr/include")
    version = _version(system)
    if version is not None and version[:2] >= MIN_VERSION and _complete(system):
        return Headers(system, "/usr/include", version), ""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with open(cache_dir() / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time (pytest-xdist workers)
            cached = _cached()
            return (cached if cached is not None else _fetch()), ""
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, (
            f"no Linux >= {MIN_VERSION[0]}.{MIN_VERSION[1]} uAPI headers: {exc}; set "
            "FAKEVFIO_UAPI_INCLUDE to a headers_install directory, or let apt reach the "
            "Debian archive"
        )
