"""Whether FUSE mounts can work on this machine, and what to fix when they cannot.

``fakevfio mount`` prints :func:`fuse_problems` after a failed mount;
``fakevfio doctor`` prints :func:`doctor` (mounting, ``fakevfio run``, the QEMU
tests, the guest kit); the testing toolkit (:mod:`fakevfio.testing`) and the pytest plugin use
:func:`fuse_missing_reason` and :func:`fuse_required` to skip or fail tests.
Plain standard library: nothing here imports pyfuse3, trio or pytest.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import stat
import subprocess

#: CAP_SYS_ADMIN's bit in /proc/self/status capability masks.
_CAP_SYS_ADMIN_BIT = 21


def find_fusermount() -> str | None:
    """The fusermount3 (or fusermount) on $PATH, or None."""
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
        tool = find_fusermount() if fusermount == "" else fusermount
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


#: The oldest kernel ``fakevfio run`` works on: seccomp ADDFD (5.9), pidfd_getfd (5.6).
RUN_MIN_KERNEL = (5, 9)
#: The oldest QEMU whose VFIO migration the QEMU tests drive.
QEMU_MIN = (10, 0)


def _version(text: str) -> tuple[int, ...]:
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def run_problems(*, euid: int | None = None, machine: str = "", release: str = "") -> list[str]:
    """Say why ``fakevfio run`` cannot work here (empty: it should)."""
    problems: list[str] = []
    machine = machine or platform.machine()
    release = release or platform.release()
    if machine != "x86_64":
        problems.append(f"fakevfio run supports x86-64 only (this machine is {machine})")
    if _version(release) < RUN_MIN_KERNEL:
        problems.append(
            f"fakevfio run needs Linux >= {RUN_MIN_KERNEL[0]}.{RUN_MIN_KERNEL[1]} "
            f"(seccomp ADDFD, pidfd_getfd); this kernel is {release}"
        )
    if (os.geteuid() if euid is None else euid) != 0:
        problems.append(
            "fakevfio run needs root (a private mount namespace, and pidfd_getfd/"
            "process_vm_writev on the program it runs): run it with sudo"
        )
    return problems


def qemu_problems(qemu: str = "qemu-system-x86_64") -> list[str]:
    """Say why the QEMU tests cannot run here (empty: they can)."""
    path = shutil.which(qemu)
    if path is None:
        return [
            f"{qemu} is not installed: bash .ci/setup-qemu installs QEMU >= 10 "
            "(Debian 12: bookworm-backports; Debian 13: its own archive)"
        ]
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"{path} --version failed: {exc}"]
    if _version(out) < QEMU_MIN:
        return [
            f"{path} is {out.splitlines()[0] if out else 'of unknown version'}; the QEMU "
            f"tests need >= {QEMU_MIN[0]}.{QEMU_MIN[1]} (bash .ci/setup-qemu)"
        ]
    return []


def guest_problems() -> list[str]:
    """Say why the guest kit cannot build a guest here (empty: it can)."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        return [
            f"the guest kit fetches Debian's kernel and busybox-static with apt-get and "
            f"unpacks them with dpkg-deb: {', '.join(missing)} not found (a Debian or "
            "Ubuntu machine has both)"
        ]
    return []


def doctor() -> dict[str, list[str]]:
    """Every area ``fakevfio doctor`` reports, each with its problems (empty: fine)."""
    return {
        "mount": fuse_problems(),
        "run": run_problems(),
        "qemu": qemu_problems(os.environ.get("FAKEVFIO_QEMU", "qemu-system-x86_64")),
        "guest": guest_problems(),
    }


__all__ = [
    "doctor",
    "find_fusermount",
    "fuse_missing_reason",
    "fuse_problems",
    "fuse_required",
    "guest_problems",
    "qemu_problems",
    "run_problems",
]
