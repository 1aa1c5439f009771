"""vfio_uapi.abi against a current Linux uAPI header (``linux/vfio.h``, ``linux/iommufd.h``).

The headers are Linux 7.1 or newer (:mod:`tests.vfio_uapi.headers`: the system's,
``FAKEVFIO_UAPI_INCLUDE``, or ``linux-libc-dev`` from Debian unstable or
trixie-backports, cached). A C program is generated from what abi.py defines and
compiled with gcc against them; it prints ``sizeof`` of every struct, ``offsetof``
and ``sizeof`` of every field, and the value of every constant. So:

- every :class:`~vfio_uapi.abi.Layout` in abi.py is checked, field by field, by
  name: a struct or field the header lacks fails the compile (so the test), and
  two same-width fields declared in the wrong order fail on their offsets;
- every integer constant of abi.py is checked against the C name (or C
  expression) it stands for; the few that are not uAPI are listed with why;
- the test prints what it checked (headers, counts of structs, fields, constants).

Without such headers the test skips with the reason, and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import pytest

from tests.vfio_uapi.headers import Headers, find_headers
from vfio_uapi import abi
from vfio_uapi.abi import Layout

#: Our names whose C name differs.
C_NAMES: Mapping[str, str] = {
    "IOMMUFD_BASE": "IOMMUFD_CMD_BASE",
    "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2": "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2",
    "VFIO_TYPE1_NESTING_IOMMU": "__VFIO_RESERVED_TYPE1_NESTING_IOMMU",
    "VFIO_DEVICE_FEATURE_ALL_FLAGS": (
        "(VFIO_DEVICE_FEATURE_MASK | VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET"
        " | VFIO_DEVICE_FEATURE_PROBE)"
    ),
    "VFIO_DEVICE_STATE_NR": "(VFIO_DEVICE_STATE_PRE_COPY_P2P + 1)",
    "VFIO_IOCTL_FIRST": "_IO(VFIO_TYPE, VFIO_BASE)",
    "VFIO_IOCTL_LAST": "_IO(VFIO_TYPE, 0xff)",
    # minimum argsz the kernel accepts: offsetofend of its last required field
    "DEVICE_INFO_MINSZ": "OFFSETOFEND(struct vfio_device_info, num_irqs)",
    "DEVICE_INFO_LEGACY_SIZE": "OFFSETOFEND(struct vfio_device_info, cap_offset)",
    "BIND_IOMMUFD_MINSZ": "OFFSETOFEND(struct vfio_device_bind_iommufd, out_devid)",
    "ATTACH_IOMMUFD_PT_MINSZ": "OFFSETOFEND(struct vfio_device_attach_iommufd_pt, pt_id)",
    "DETACH_IOMMUFD_PT_MINSZ": "OFFSETOFEND(struct vfio_device_detach_iommufd_pt, flags)",
    "IOMMU_TYPE1_INFO_MINSZ": "OFFSETOFEND(struct vfio_iommu_type1_info, iova_pgsizes)",
    "IOMMU_HWPT_ALLOC_MINSZ": "OFFSETOFEND(struct iommu_hwpt_alloc, __reserved)",
    "IOMMU_HW_INFO_MINSZ": "OFFSETOFEND(struct iommu_hw_info, __reserved)",
}
#: abi.py constants that are not in the uAPI headers, and why.
NOT_UAPI: Mapping[str, str] = {
    "VFIO_PCI_OFFSET_SHIFT": "vfio-pci's region offset encoding (include/linux/vfio_pci_core.h)",
}

_PROLOGUE = """\
#include <stddef.h>
#include <stdio.h>
#include <linux/ioctl.h>
#include <linux/version.h>
#include <linux/vfio.h>
#include <linux/iommufd.h>
#define OFFSETOFEND(t, m) (offsetof(t, m) + sizeof(((t *)0)->m))
#define FIELD(t, m) printf("F %s %s %zu %zu\\n", #t, #m, offsetof(t, m), sizeof(((t *)0)->m))
int main(void)
{
\tprintf("V %d\\n", LINUX_VERSION_CODE);
"""


def layouts() -> dict[str, Layout]:
    """Every Layout abi.py defines, by our name."""
    return {name: v for name, v in vars(abi).items() if isinstance(v, Layout)}


def constants() -> dict[str, int]:
    """Every integer constant abi.py defines (upper-case names), by our name."""
    return {
        name: v
        for name, v in vars(abi).items()
        if name.isupper() and isinstance(v, int) and not isinstance(v, bool)
    }


def c_program(structs: Mapping[str, Layout], consts: Mapping[str, int]) -> str:
    lines = [_PROLOGUE]
    for layout in structs.values():
        c = f"struct {layout.c_name}"
        lines.append(f'\tprintf("S %s %zu\\n", "{layout.c_name}", sizeof({c}));')
        lines += [f"\tFIELD({c}, {name});" for name in layout.offsets()]
    for name in consts:
        if name in NOT_UAPI:
            continue
        expr = C_NAMES.get(name, name)
        lines.append(f'\tprintf("C %s %lld\\n", "{name}", (long long)({expr}));')
    lines.append("\treturn 0;\n}\n")
    return "\n".join(lines)


@attrs.frozen
class CFacts:
    version_code: int
    sizes: dict[str, int]
    fields: dict[tuple[str, str], tuple[int, int]]
    values: dict[str, int]


class CompileError(Exception):
    """gcc refused the program: something abi.py names is missing from the header."""


def c_facts(headers: Headers, program: str, work: Path) -> CFacts:
    """Compile and run ``program`` against ``headers``; parse what it printed."""
    src, exe = work / "abi_dump.c", work / "abi_dump"
    src.write_text(program)
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", *headers.cflags, "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if cc.returncode:
        errors = [ln for ln in cc.stderr.splitlines() if "error" in ln][:12]
        raise CompileError("\n".join(errors) or cc.stderr[-2000:])
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    facts = CFacts(0, {}, {}, {})
    version = 0
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "V":
            version = int(rest[0])
        elif kind == "S":
            facts.sizes[rest[0]] = int(rest[1])
        elif kind == "F":
            struct_name = rest[1]  # "struct" "NAME" "FIELD" OFF SIZE
            facts.fields[(struct_name, rest[2])] = (int(rest[3]), int(rest[4]))
        elif kind == "C":
            facts.values[rest[0]] = int(rest[1])
    return attrs.evolve(facts, version_code=version)


def mismatches(
    structs: Mapping[str, Layout], consts: Mapping[str, int], facts: CFacts
) -> list[str]:
    """Every difference between abi.py and the C facts, one readable line each."""
    out = []
    for name, layout in structs.items():
        c_size = facts.sizes.get(layout.c_name)
        if c_size != layout.size:
            out.append(f"{name}: sizeof(struct {layout.c_name}) is {c_size}, ours {layout.size}")
        for field, ours in layout.offsets().items():
            theirs = facts.fields.get((layout.c_name, field))
            if theirs != ours:
                out.append(
                    f"{name}.{field}: C (offset, size) {theirs}, ours {ours} "
                    f"(struct {layout.c_name})"
                )
    for name, value in consts.items():
        if name in NOT_UAPI:
            continue
        if facts.values.get(name) != value:
            out.append(
                f"{name}: C {C_NAMES.get(name, name)} = {facts.values.get(name)}, ours {value}"
            )
    return out


@pytest.fixture(scope="module")
def headers() -> Headers:
    if shutil.which("gcc") is None:
        pytest.fail("the ABI test needs gcc (apt-get install gcc)")
    found, why = find_headers()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the current uAPI headers: {why}")
        pytest.skip(why)
    return found


def test_abi_matches_a_current_header(
    headers: Headers,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    structs, consts = layouts(), constants()
    try:
        facts = c_facts(headers, c_program(structs, consts), tmp_path)
    except CompileError as exc:
        pytest.fail(f"the {headers.origin} headers lack what abi.py names:\n{exc}")
    major, minor, sub = (
        facts.version_code >> 16,
        (facts.version_code >> 8) & 0xFF,
        facts.version_code & 0xFF,
    )
    assert (major, minor) >= (7, 1), f"{headers.origin} is Linux {major}.{minor}"
    bad = mismatches(structs, consts, facts)
    assert not bad, "\n".join(bad)
    nfields = sum(len(layout.offsets()) for layout in structs.values())
    nconsts = len(consts) - len(NOT_UAPI)
    report = (
        f"uAPI ABI: {len(structs)} structs ({nfields} fields) and {nconsts} constants of "
        f"vfio_uapi.abi match Linux {major}.{minor}.{sub} ({headers.origin})"
    )
    print(report)  # shown with -rP or -s; also a JUnit property
    record_property("uapi_abi", report)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(report)
    assert len(structs) >= 40  # every struct abi.py uses, iommufd's too
    assert nconsts >= 160


def test_the_check_catches_swapped_fields_a_missing_struct_and_a_wrong_value(
    headers: Headers, tmp_path: Path
) -> None:
    swapped = Layout("vfio_precopy_info", "flags:I argsz:I initial_bytes:Q dirty_bytes:Q")
    moved = Layout("vfio_precopy_info", "argsz:I initial_bytes:Q dirty_bytes:Q flags:I")
    facts = c_facts(
        headers,
        c_program({"SWAPPED": swapped, "MOVED": moved}, {"VFIO_PRECOPY_INFO_REINIT": 2}),
        tmp_path,
    )
    bad = mismatches({"SWAPPED": swapped, "MOVED": moved}, {"VFIO_PRECOPY_INFO_REINIT": 2}, facts)
    assert any(line.startswith("SWAPPED.flags:") for line in bad)
    assert any(line.startswith("SWAPPED.argsz:") for line in bad)
    assert any(line.startswith("MOVED.flags:") for line in bad)
    assert any(line.startswith("VFIO_PRECOPY_INFO_REINIT:") for line in bad)
    missing = Layout("vfio_precopy_info_v3", "argsz:I")
    with pytest.raises(CompileError, match="vfio_precopy_info_v3"):
        c_facts(headers, c_program({"MISSING": missing}, {}), tmp_path)
