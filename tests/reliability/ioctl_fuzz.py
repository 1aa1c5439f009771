"""The ioctl fuzzer's runner and the kernel's errno set of every VFIO and iommufd ioctl.

``tests/c/ioctl_fuzz.c`` is compiled with gcc and run under ``fakevfio run``
against a mount with one device; it prints one ``res KIND 0xREQ ERRNO COUNT``
line per outcome. :func:`check` holds those against :data:`KERNEL`, the
errnos the kernel itself can return for that ioctl on that kind of fd. The
sets were read off the kernel sources (v6.1 to v6.12; the function named
beside each entry is where the errnos come from), for vfio-pci
(``drivers/vfio/pci/vfio_pci_core.c``) over the type1 IOMMU driver or
iommufd; errnos that only hardware can produce (EIO from a config read,
EAGAIN from a PCI reset) are left out, so the supervisor's "unexpected
error" answer (EIO, Rule 4 of ``fakevfio/_run/_supervisor.py``) and a dead
listener's ENOSYS are always violations.

Rules:

1. A (kind, request) not in :data:`KERNEL` may only fail ENOTTY, except on a
   container without an IOMMU, where the kernel answers EINVAL
   (``vfio_fops_unl_ioctl``: ``ret = -EINVAL`` with no ``iommu_driver``).
2. :data:`DEVIATIONS` lists, with the reason, where the supervisor knowingly
   answers outside the kernel's set; :func:`check` allows exactly those.
3. After a run the device must still obey its FSM (:func:`device_invariants`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import attrs

from vfio_uapi import abi

SOURCE = Path(__file__).resolve().parents[1] / "c" / "ioctl_fuzz.c"
E = errno

#: Every ioctl that takes a user pointer can fail EFAULT; every struct one EINVAL (argsz, flags).
_PTR = frozenset({E.EFAULT, E.EINVAL})
#: copy_struct_from_user (iommufd/main.c iommufd_fops_ioctl): short size EINVAL, unknown
#: trailing bytes non-zero E2BIG, plus EOPNOTSUPP for unknown flags in every op.
_IOMMUFD = _PTR | {E.E2BIG, E.EOPNOTSUPP}

# The device fd (cdev bound to an iommufd, or opened through the group). Before
# VFIO_DEVICE_BIND_IOMMUFD every ioctl of a cdev is EINVAL (vfio_device_fops_unl_ioctl:
# !df->access_granted), which every entry below includes.
_DEVICE: dict[int, frozenset[int]] = {
    # vfio_pci_ioctl_get_info, _get_region_info (vfio_info_add_capability: ENOMEM)
    abi.VFIO_DEVICE_GET_INFO: _PTR | {E.ENOMEM},
    abi.VFIO_DEVICE_GET_REGION_INFO: _PTR | {E.ENOMEM},
    abi.VFIO_DEVICE_GET_IRQ_INFO: _PTR,
    # vfio_pci_ioctl_set_irqs -> vfio_set_irqs_validate_and_prepare (EINVAL), memdup_user
    # (EFAULT, ENOMEM), vfio_pci_set_irqs_ioctl (ENOTTY: no handler for index/action),
    # eventfd_ctx_fdget (EBADF; EINVAL for a non-eventfd), vfio_msi_enable (ENOMEM, ENOSPC)
    abi.VFIO_DEVICE_SET_IRQS: _PTR | {E.ENOMEM, E.ENOTTY, E.EBADF, E.ENOSPC},
    # vfio_pci_ioctl_reset: !reset_works EINVAL
    abi.VFIO_DEVICE_RESET: frozenset({E.EINVAL}),
    # vfio_pci_ioctl_get_pci_hot_reset_info: ENODEV (no slot/bus reset), ENOSPC (count)
    abi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: _PTR | {E.ENODEV, E.ENOSPC, E.ENOMEM},
    # vfio_pci_ioctl_pci_hot_reset: EBADF/EINVAL for group fds, ENODEV, EBUSY, EPERM
    abi.VFIO_DEVICE_PCI_HOT_RESET: _PTR | {E.EBADF, E.ENODEV, E.EBUSY, E.EPERM, E.ENOMEM},
    # vfio_pci_ioctl_ioeventfd -> vfio_pci_ioeventfd: EINVAL, ENODEV (bar), EEXIST,
    # ENOSPC (VFIO_PCI_IOEVENTFD_MAX), ENOMEM, and eventfd errors (EBADF)
    abi.VFIO_DEVICE_IOEVENTFD: _PTR | {E.ENODEV, E.EEXIST, E.ENOSPC, E.ENOMEM, E.EBADF},
    # vfio_ioctl_device_feature: EINVAL for the header, ENOTTY for an unknown feature
    # (vfio_pci_core_ioctl_feature default), EFAULT; the migration features:
    # vfio_ioctl_device_feature_mig_device_state (EINVAL for an illegal state, ENOMEM, the
    # driver's arc errno: none for a fault-free device) and the logging features (ENOTTY
    # without log_ops, E2BIG for too many ranges, EOVERFLOW)
    abi.VFIO_DEVICE_FEATURE: _PTR | {E.ENOTTY, E.ENOMEM, E.E2BIG, E.EOVERFLOW},
    # device_cdev.c vfio_df_ioctl_bind_iommufd: EINVAL (flags, bound, the group path),
    # iommufd_ctx_from_fd (EBADF; EBADFD for a non-iommufd), EBUSY, ENOMEM, EPERM (noiommu)
    abi.VFIO_DEVICE_BIND_IOMMUFD: _PTR | {E.EBADF, E.EBADFD, E.EBUSY, E.ENOMEM, E.EPERM},
    # vfio_df_ioctl_attach_pt -> iommufd_device_attach: ENOENT (no such pt), EINVAL,
    # EBUSY, ENOMEM, EOPNOTSUPP (PASID flag without pasid support)
    abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: _PTR | {E.ENOENT, E.EBUSY, E.ENOMEM, E.EOPNOTSUPP},
    abi.VFIO_DEVICE_DETACH_IOMMUFD_PT: _PTR,
}

# The legacy container (container.c vfio_fops_unl_ioctl), and its type1 driver
# (vfio_iommu_type1.c vfio_iommu_type1_ioctl; default -ENOTTY).
_CONTAINER: dict[int, frozenset[int]] = {
    abi.VFIO_GET_API_VERSION: frozenset(),
    abi.VFIO_CHECK_EXTENSION: frozenset(),  # 0 or 1, never an error
    # vfio_ioctl_set_iommu: EINVAL (no group, or already set), ENODEV (no driver), ENOMEM
    abi.VFIO_SET_IOMMU: frozenset({E.EINVAL, E.ENODEV, E.ENOMEM, E.EBUSY}),
    abi.VFIO_IOMMU_GET_INFO: _PTR | {E.ENOMEM},
    # vfio_dma_do_map: EINVAL, EEXIST (overlap), ENOSPC (dma_avail), ENOMEM, EFAULT, EPERM
    abi.VFIO_IOMMU_MAP_DMA: _PTR | {E.EEXIST, E.ENOSPC, E.ENOMEM, E.EPERM, E.EBUSY},
    # vfio_dma_do_unmap: EINVAL, EPERM (task mismatch), EBUSY (vaddr invalid)
    abi.VFIO_IOMMU_UNMAP_DMA: _PTR | {E.EPERM, E.EBUSY},
    # vfio_iommu_type1_dirty_pages: EINVAL, ENOMEM, EACCES? no: v1 containers have no
    # dirty tracking and vfio_iommu_type1_dirty_pages answers EACCES ("!iommu->v2")
    abi.VFIO_IOMMU_DIRTY_PAGES: _PTR | {E.ENOMEM, E.EACCES},
}

# The group (group.c vfio_group_fops_unl_ioctl; default -ENOTTY).
_GROUP: dict[int, frozenset[int]] = {
    abi.VFIO_GROUP_GET_STATUS: _PTR | {E.ENODEV},
    # vfio_group_ioctl_set_container: fdget EBADF, EINVAL (already set), EBADFD (neither a
    # container nor an iommufd), EPERM (noiommu), EBUSY, ENODEV
    abi.VFIO_GROUP_SET_CONTAINER: _PTR | {E.EBADF, E.EBADFD, E.EPERM, E.EBUSY, E.ENODEV},
    abi.VFIO_GROUP_UNSET_CONTAINER: frozenset({E.EINVAL, E.EBUSY, E.ENODEV}),
    # vfio_group_ioctl_get_device_fd: strndup_user (EFAULT, EINVAL), ENODEV (no such
    # name), EINVAL (no container/IOMMU), EBUSY, ENOMEM, EMFILE, EPERM
    abi.VFIO_GROUP_GET_DEVICE_FD: _PTR | {E.ENODEV, E.EBUSY, E.ENOMEM, E.EMFILE, E.EPERM},
}

# /dev/iommu (iommufd/main.c iommufd_fops_ioctl: a number outside the table goes to
# vfio_compat.c iommufd_vfio_ioctl, whose default is -ENOIOCTLCMD, i.e. ENOTTY).
_IOMMU: dict[int, frozenset[int]] = {
    abi.IOMMU_DESTROY: _IOMMUFD | {E.ENOENT, E.EBUSY},
    abi.IOMMU_IOAS_ALLOC: _IOMMUFD | {E.ENOMEM},
    abi.IOMMU_IOAS_ALLOW_IOVAS: _IOMMUFD | {E.ENOENT, E.ENOMEM, E.EBUSY, E.EOVERFLOW},
    abi.IOMMU_IOAS_COPY: _IOMMUFD
    | {E.ENOENT, E.ENOMEM, E.EOVERFLOW, E.EEXIST, E.ENOSPC, E.EPERM, E.ERANGE},
    abi.IOMMU_IOAS_IOVA_RANGES: _IOMMUFD | {E.ENOENT, E.EMSGSIZE},
    abi.IOMMU_IOAS_MAP: _IOMMUFD
    | {E.ENOENT, E.ENOMEM, E.EOVERFLOW, E.EEXIST, E.ENOSPC, E.EPERM, E.ERANGE},
    abi.IOMMU_IOAS_UNMAP: _IOMMUFD | {E.ENOENT, E.EOVERFLOW, E.EBUSY, E.ERANGE},
    abi.IOMMU_OPTION: _IOMMUFD | {E.ENOENT, E.EBUSY},
    abi.IOMMU_VFIO_IOAS: _IOMMUFD | {E.ENOENT},
    abi.IOMMU_HWPT_ALLOC: _IOMMUFD | {E.ENOENT, E.ENOMEM, E.EBUSY},
    abi.IOMMU_GET_HW_INFO: _IOMMUFD | {E.ENOENT, E.ENODEV},
    abi.IOMMU_HWPT_SET_DIRTY_TRACKING: _IOMMUFD | {E.ENOENT},
    abi.IOMMU_HWPT_GET_DIRTY_BITMAP: _IOMMUFD | {E.ENOENT, E.EOVERFLOW, E.ENOMEM},
    abi.VFIO_GET_API_VERSION: frozenset(),
    abi.VFIO_CHECK_EXTENSION: frozenset(),
    # iommufd_vfio_set_iommu: ENOENT (no IOAS to attach), EINVAL (type), EPERM
    abi.VFIO_SET_IOMMU: frozenset({E.EINVAL, E.ENOENT, E.EPERM, E.ENOMEM}),
    abi.VFIO_IOMMU_GET_INFO: _PTR | {E.ENOENT, E.ENOMEM},
    abi.VFIO_IOMMU_MAP_DMA: _PTR | {E.ENOENT, E.EEXIST, E.ENOSPC, E.ENOMEM, E.EPERM},
    abi.VFIO_IOMMU_UNMAP_DMA: _PTR | {E.ENOENT, E.EBUSY, E.EOPNOTSUPP},
}

# The data_fd: vfio-pci variant drivers' migration file ioctl (mlx5vf_precopy_ioctl,
# hisi_acc_vf_precopy_ioctl): PRECOPY_INFO only, default -ENOTTY; EINVAL outside
# PRE_COPY*, ENOMSG at the end of the pre-copy data ("reference/linux-vfio-uapi.md").
_DATA: dict[int, frozenset[int]] = {
    abi.VFIO_MIG_GET_PRECOPY_INFO: _PTR | {E.ENOMSG, E.ENODEV},
}

#: (fd kind, request) -> the errnos the kernel can answer. ENOTTY is added to each kind
#: for requests it does not know (Rule 1).
KERNEL: dict[str, dict[int, frozenset[int]]] = {
    "container": _CONTAINER,
    "group": _GROUP,
    "iommu": _IOMMU,
    "cdev": _DEVICE,
    "gdev": _DEVICE,
    "data": _DATA,
}

#: Where the supervisor knowingly answers outside the kernel's set (Rule 2), with why.
DEVIATIONS: dict[tuple[str, int], tuple[frozenset[int], str]] = {}
for _kind in ("cdev", "gdev"):
    for _req in (
        abi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
        abi.VFIO_DEVICE_PCI_HOT_RESET,
        abi.VFIO_DEVICE_IOEVENTFD,
    ):
        DEVIATIONS[(_kind, _req)] = (
            frozenset({E.ENOTTY}),
            "not emulated: _device_ioctls.device_ioctl answers ENOTTY (vfio-pci handles it)",
        )
for _req in (
    abi.VFIO_SET_IOMMU,
    abi.VFIO_IOMMU_GET_INFO,
    abi.VFIO_IOMMU_MAP_DMA,
    abi.VFIO_IOMMU_UNMAP_DMA,
):
    DEVIATIONS[("iommu", _req)] = (
        frozenset({E.ENOTTY}),
        "iommufd's VFIO compatibility (vfio_compat.c) is not emulated on /dev/iommu",
    )

DEVIATIONS[("iommu", abi.IOMMU_VFIO_IOAS)] = (
    frozenset({E.ENOTTY}),
    "IOMMU_VFIO_IOAS (the compat IOAS of iommufd_vfio_ioas) is not emulated",
)


def allowed(kind: str, request: int, *, container_iommu: bool = True) -> frozenset[int]:
    """The errnos ``request`` on a ``kind`` fd may fail with, deviations included."""
    table = KERNEL[kind]
    base = table.get(request)
    if base is None:
        base = frozenset({E.ENOTTY})
        if kind == "container":
            base |= {E.EINVAL}  # Rule 1: no IOMMU driver yet
    if kind == "cdev":
        base |= {E.EINVAL}  # before BIND_IOMMUFD everything is EINVAL
    extra, _why = DEVIATIONS.get((kind, request), (frozenset(), ""))
    return base | extra


@attrs.frozen(kw_only=True)
class FuzzResult:
    seed: int
    total: int
    elapsed_ms: int
    #: (kind, request, errno) -> count; errno 0 is success
    results: Counter[tuple[str, int, int]]
    hang: str  # the watchdog's line, "" if none
    returncode: int
    stderr: str

    def errno_histogram(self) -> Counter[int]:
        hist: Counter[int] = Counter()
        for (_k, _r, err), n in self.results.items():
            hist[err] += n
        return hist

    def violations(self) -> list[str]:
        """Every answer outside the kernel's set, as 'kind REQUEST: ERRNO xN'."""
        bad = []
        for (kind, req, err), n in sorted(self.results.items()):
            if err and err not in allowed(kind, req):
                name = abi.ioctl_name(req)
                bad.append(f"{kind} {name} ({req:#x}): {errno.errorcode.get(err, err)} x{n}")
        return bad


_RES = re.compile(r"^res (\w+) (0x[0-9a-f]+) (\d+) (\d+)$")


def compile_fuzzer(out_dir: Path) -> Path:
    """gcc the harness into ``out_dir``; its path."""
    exe = out_dir / "ioctl_fuzz"
    subprocess.run(
        ["gcc", "-Wall", "-Wextra", "-Werror", "-O1", "-o", str(exe), str(SOURCE)], check=True
    )
    return exe


def missing() -> str | None:
    """Why the fuzzer cannot run here, or None."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "fakevfio run needs Linux on x86-64"
    if os.geteuid() != 0:
        return "fakevfio run needs root"
    if shutil.which("gcc") is None:
        return "gcc is missing"
    return None


def run_fuzzer(
    exe: Path, mountpoint: Path, device: str, *, seed: int, count: int, timeout: float
) -> FuzzResult:
    """Run ``count`` fuzzed ioctls under ``fakevfio run`` against the mount's ``device``."""
    info = (mountpoint / "devices" / device / "info").read_text()
    group = re.search(r'"iommu_group":\s*"?(\d+)', info)
    cdev = re.search(r'"cdev":\s*"(vfio\d+)"', info)
    group_name = group.group(1) if group else "100"
    cdev_name = cdev.group(1) if cdev else "vfio0"
    cmd = [
        sys.executable,
        "-m",
        "fakevfio",
        "run",
        "--mount",
        str(mountpoint),
        "--",
        str(exe),
        str(seed),
        str(count),
        group_name,
        device,
        f"/dev/vfio/devices/{cdev_name}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    results: Counter[tuple[str, int, int]] = Counter()
    total = elapsed = 0
    hang = ""
    for line in done.stdout.splitlines():
        m = _RES.match(line)
        if m:
            results[(m.group(1), int(m.group(2), 16), int(m.group(3)))] += int(m.group(4))
        elif line.startswith("total "):
            total = int(line.split()[1])
        elif line.startswith("elapsed_ms "):
            elapsed = int(line.split()[1])
        elif line.startswith("hang "):
            hang = line
    return FuzzResult(
        seed=seed,
        total=total,
        elapsed_ms=elapsed,
        results=results,
        hang=hang,
        returncode=done.returncode,
        stderr=done.stderr,
    )


def device_invariants(device_dir: Path) -> list[str]:
    """The FSM invariants of a device after a fuzz run, through its files; what failed.

    The state is readable and one the device's flags allow; the log's last state is
    it; a legal arc (to RUNNING, the kernel's path from any state but ERROR) works and
    is logged; a reset returns the device to RUNNING.
    """
    problems = []
    mig = device_dir / "migration"
    state = (mig / "state").read_text().strip()
    log = (mig / "log").read_text().splitlines()
    if state == "ERROR":
        problems.append("the device is in ERROR after fuzzing a fault-free driver")
    # the log's last arc ("CUR NEW") ends in the state, or a later RESET means RUNNING
    moves = [line.split() for line in log if not line.startswith("REFUSED")]
    logged = "RUNNING" if not moves or moves[-1] == ["RESET"] else moves[-1][-1]
    if logged != state:
        problems.append(f"state {state} but the log says {logged} ({moves[-1:]})")
    try:
        (mig / "state").write_text("RUNNING")
    except OSError as exc:
        problems.append(f"the arc {state} -> RUNNING failed: {exc}")
    after = (mig / "state").read_text().strip()
    if after != "RUNNING":
        problems.append(f"after {state} -> RUNNING the state is {after}")
    (device_dir / "reset").write_text("1")
    if (mig / "state").read_text().strip() != "RUNNING":
        problems.append("a reset did not return RUNNING")
    return problems
