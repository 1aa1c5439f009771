"""vfio_uapi.abi against the system's <linux/vfio.h> (and <linux/iommufd.h> if present).

A small C program is compiled into tmp_path; it prints every ioctl number, constant,
``sizeof`` and ``offsetof`` the installed header defines (guarded by ``#ifdef`` so an
older header simply prints less), and the header's ``LINUX_VERSION_CODE``. Each printed
value must equal ours.

Every item newer than Linux 6.1 (the Debian 12 header, the oldest supported) has the
kernel release that added it in ``SINCE``/``FIELD_SINCE``. The coverage test requires
every item the header's release should have; an item from a later release may be
missing and is reported (skip reason of ``test_uapi_abi_items_newer_than_header``: the
header's release, how many items were checked, each missing item and its release).
Debian 12's 6.1 header lacks the 6.2+ items (PRE_COPY, MIG_DATA_SIZE, iommufd, the cdev
ioctls, ``vfio_device_info.pad``: 20 bytes there, 24 now); Debian 13's 6.12 header
lacks the 6.15+ items (PASID attach/detach, the bind token, DMA_BUF, PRECOPY REINIT).
A struct that gained a trailing member is checked at its older size when the header
predates the member.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vfio_uapi import abi as uapi

HEADER = Path("/usr/include/linux/vfio.h")


def _words(text: str) -> list[str]:
    return text.split()


# Constants: C name -> our value (the C program prints them when defined).
CONSTANTS: dict[str, int] = {
    name: getattr(uapi, name)
    for name in _words(
        "VFIO_API_VERSION VFIO_GET_API_VERSION VFIO_CHECK_EXTENSION VFIO_SET_IOMMU "
        "VFIO_GROUP_GET_STATUS VFIO_GROUP_SET_CONTAINER VFIO_GROUP_UNSET_CONTAINER "
        "VFIO_GROUP_GET_DEVICE_FD VFIO_DEVICE_GET_INFO VFIO_DEVICE_GET_REGION_INFO "
        "VFIO_DEVICE_GET_IRQ_INFO VFIO_DEVICE_SET_IRQS VFIO_DEVICE_RESET "
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO VFIO_DEVICE_PCI_HOT_RESET "
        "VFIO_DEVICE_QUERY_GFX_PLANE VFIO_DEVICE_GET_GFX_DMABUF VFIO_DEVICE_IOEVENTFD "
        "VFIO_DEVICE_FEATURE VFIO_DEVICE_BIND_IOMMUFD VFIO_DEVICE_ATTACH_IOMMUFD_PT "
        "VFIO_DEVICE_DETACH_IOMMUFD_PT VFIO_MIG_GET_PRECOPY_INFO VFIO_IOMMU_GET_INFO "
        "VFIO_IOMMU_MAP_DMA VFIO_IOMMU_UNMAP_DMA VFIO_IOMMU_ENABLE VFIO_IOMMU_DISABLE "
        "VFIO_IOMMU_DIRTY_PAGES VFIO_EEH_PE_OP "
        "IOMMU_DESTROY IOMMU_IOAS_ALLOC IOMMU_IOAS_ALLOW_IOVAS IOMMU_IOAS_COPY "
        "IOMMU_IOAS_IOVA_RANGES IOMMU_IOAS_MAP IOMMU_IOAS_UNMAP IOMMU_OPTION IOMMU_VFIO_IOAS "
        "IOMMU_HWPT_ALLOC IOMMU_GET_HW_INFO IOMMU_HWPT_SET_DIRTY_TRACKING "
        "IOMMU_HWPT_GET_DIRTY_BITMAP "
        "VFIO_TYPE1_IOMMU VFIO_SPAPR_TCE_IOMMU VFIO_TYPE1v2_IOMMU VFIO_DMA_CC_IOMMU VFIO_EEH "
        "VFIO_TYPE1_NESTING_IOMMU VFIO_SPAPR_TCE_v2_IOMMU VFIO_NOIOMMU_IOMMU VFIO_UNMAP_ALL "
        "VFIO_UPDATE_VADDR VFIO_GROUP_FLAGS_VIABLE VFIO_GROUP_FLAGS_CONTAINER_SET "
        "VFIO_DEVICE_FLAGS_RESET VFIO_DEVICE_FLAGS_PCI VFIO_DEVICE_FLAGS_PLATFORM "
        "VFIO_DEVICE_FLAGS_AMBA VFIO_DEVICE_FLAGS_CCW VFIO_DEVICE_FLAGS_AP "
        "VFIO_DEVICE_FLAGS_FSL_MC VFIO_DEVICE_FLAGS_CAPS VFIO_DEVICE_FLAGS_CDX "
        "VFIO_REGION_INFO_FLAG_READ VFIO_REGION_INFO_FLAG_WRITE VFIO_REGION_INFO_FLAG_MMAP "
        "VFIO_REGION_INFO_FLAG_CAPS VFIO_IRQ_INFO_EVENTFD VFIO_IRQ_INFO_MASKABLE "
        "VFIO_IRQ_INFO_AUTOMASKED VFIO_IRQ_INFO_NORESIZE VFIO_IRQ_SET_DATA_NONE "
        "VFIO_IRQ_SET_DATA_BOOL VFIO_IRQ_SET_DATA_EVENTFD VFIO_IRQ_SET_ACTION_MASK "
        "VFIO_IRQ_SET_ACTION_UNMASK VFIO_IRQ_SET_ACTION_TRIGGER "
        "VFIO_DEVICE_FEATURE_MASK VFIO_DEVICE_FEATURE_GET VFIO_DEVICE_FEATURE_SET "
        "VFIO_DEVICE_FEATURE_PROBE VFIO_DEVICE_FEATURE_PCI_VF_TOKEN "
        "VFIO_DEVICE_FEATURE_MIGRATION VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE "
        "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP "
        "VFIO_DEVICE_FEATURE_LOW_POWER_EXIT VFIO_DEVICE_FEATURE_DMA_LOGGING_START "
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT "
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE VFIO_DEVICE_FEATURE_BUS_MASTER "
        "VFIO_DEVICE_FEATURE_DMA_BUF "
        "VFIO_MIGRATION_STOP_COPY VFIO_MIGRATION_P2P VFIO_MIGRATION_PRE_COPY "
        "VFIO_PRECOPY_INFO_REINIT VFIO_DEVICE_BIND_FLAG_TOKEN VFIO_DEVICE_ATTACH_PASID "
        "VFIO_DEVICE_DETACH_PASID VFIO_PCI_BAR0_REGION_INDEX VFIO_PCI_BAR5_REGION_INDEX "
        "VFIO_PCI_ROM_REGION_INDEX VFIO_PCI_CONFIG_REGION_INDEX VFIO_PCI_VGA_REGION_INDEX "
        "VFIO_PCI_NUM_REGIONS VFIO_PCI_INTX_IRQ_INDEX VFIO_PCI_MSI_IRQ_INDEX "
        "VFIO_PCI_MSIX_IRQ_INDEX VFIO_PCI_ERR_IRQ_INDEX VFIO_PCI_REQ_IRQ_INDEX "
        "VFIO_PCI_NUM_IRQS "
        "VFIO_DEVICE_STATE_ERROR VFIO_DEVICE_STATE_STOP VFIO_DEVICE_STATE_RUNNING "
        "VFIO_DEVICE_STATE_STOP_COPY VFIO_DEVICE_STATE_RESUMING VFIO_DEVICE_STATE_RUNNING_P2P "
        "VFIO_DEVICE_STATE_PRE_COPY VFIO_DEVICE_STATE_PRE_COPY_P2P "
        "VFIO_IOMMU_INFO_PGSIZES VFIO_IOMMU_INFO_CAPS VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE "
        "VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL "
        "VFIO_DMA_MAP_FLAG_READ VFIO_DMA_MAP_FLAG_WRITE VFIO_DMA_MAP_FLAG_VADDR "
        "VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP VFIO_DMA_UNMAP_FLAG_ALL VFIO_DMA_UNMAP_FLAG_VADDR "
        "VFIO_IOMMU_DIRTY_PAGES_FLAG_START VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP "
        "VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP"
    )
}
# Enumerators (not macros): printed unconditionally when the header is new enough; the
# C side guards them with a macro that appeared in the same kernel release.
ENUMS_61 = _words(
    "VFIO_PCI_BAR0_REGION_INDEX VFIO_PCI_BAR5_REGION_INDEX VFIO_PCI_ROM_REGION_INDEX "
    "VFIO_PCI_CONFIG_REGION_INDEX VFIO_PCI_VGA_REGION_INDEX VFIO_PCI_NUM_REGIONS "
    "VFIO_PCI_INTX_IRQ_INDEX VFIO_PCI_MSI_IRQ_INDEX VFIO_PCI_MSIX_IRQ_INDEX "
    "VFIO_PCI_ERR_IRQ_INDEX VFIO_PCI_REQ_IRQ_INDEX VFIO_PCI_NUM_IRQS "
    "VFIO_DEVICE_STATE_ERROR VFIO_DEVICE_STATE_STOP VFIO_DEVICE_STATE_RUNNING "
    "VFIO_DEVICE_STATE_STOP_COPY VFIO_DEVICE_STATE_RESUMING VFIO_DEVICE_STATE_RUNNING_P2P"
)
ENUMS_PRECOPY = ("VFIO_DEVICE_STATE_PRE_COPY", "VFIO_DEVICE_STATE_PRE_COPY_P2P")

# Structures: C struct, our layout, field names in order, guard macro (None = in 6.1).
# A trailing field name None marks padding in our layout with no C field to check.
STRUCTS: list[tuple[str, struct.Struct, tuple[str, ...], str | None]] = [
    ("vfio_group_status", uapi.GROUP_STATUS, ("argsz", "flags"), None),
    ("vfio_info_cap_header", uapi.INFO_CAP_HEADER, ("id", "version", "next"), None),
    (
        "vfio_device_info",
        uapi.DEVICE_INFO,
        ("argsz", "flags", "num_regions", "num_irqs", "cap_offset", "pad"),
        None,
    ),
    (
        "vfio_region_info",
        uapi.REGION_INFO,
        ("argsz", "flags", "index", "cap_offset", "size", "offset"),
        None,
    ),
    ("vfio_irq_info", uapi.IRQ_INFO, ("argsz", "flags", "index", "count"), None),
    ("vfio_irq_set", uapi.IRQ_SET, ("argsz", "flags", "index", "start", "count"), None),
    ("vfio_device_feature", uapi.DEVICE_FEATURE, ("argsz", "flags"), None),
    ("vfio_device_feature_migration", uapi.FEATURE_MIGRATION, ("flags",), None),
    ("vfio_device_feature_mig_state", uapi.FEATURE_MIG_STATE, ("device_state", "data_fd"), None),
    (
        "vfio_device_feature_dma_logging_control",
        uapi.DMA_LOGGING_CONTROL,
        ("page_size", "num_ranges", "__reserved", "ranges"),
        None,
    ),
    ("vfio_device_feature_dma_logging_range", uapi.DMA_LOGGING_RANGE, ("iova", "length"), None),
    (
        "vfio_device_feature_dma_logging_report",
        uapi.DMA_LOGGING_REPORT,
        ("iova", "length", "page_size", "bitmap"),
        None,
    ),
    (
        "vfio_device_feature_mig_data_size",
        uapi.FEATURE_MIG_DATA_SIZE,
        ("stop_copy_length",),
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    ),
    (
        "vfio_precopy_info",
        uapi.PRECOPY_INFO,
        ("argsz", "flags", "initial_bytes", "dirty_bytes"),
        "VFIO_MIG_GET_PRECOPY_INFO",
    ),
    (
        "vfio_device_bind_iommufd",
        uapi.BIND_IOMMUFD,
        ("argsz", "flags", "iommufd", "out_devid", "token_uuid_ptr"),
        "VFIO_DEVICE_BIND_IOMMUFD",
    ),
    (
        "vfio_device_attach_iommufd_pt",
        uapi.ATTACH_IOMMUFD_PT,
        ("argsz", "flags", "pt_id", "pasid"),
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    ),
    (
        "vfio_device_detach_iommufd_pt",
        uapi.DETACH_IOMMUFD_PT,
        ("argsz", "flags", "pasid"),
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    ),
    (
        "iommu_ioas_alloc",
        uapi.IOMMU_IOAS_ALLOC_STRUCT,
        ("size", "flags", "out_ioas_id"),
        "IOMMU_IOAS_ALLOC",
    ),
    ("iommu_destroy", uapi.IOMMU_DESTROY_STRUCT, ("size", "id"), "IOMMU_DESTROY"),
    # the type1 container (fakevfio run's IOMMU side)
    (
        "vfio_iommu_type1_dma_map",
        uapi.IOMMU_TYPE1_DMA_MAP,
        ("argsz", "flags", "vaddr", "iova", "size"),
        None,
    ),
    (
        "vfio_iommu_type1_dma_unmap",
        uapi.IOMMU_TYPE1_DMA_UNMAP,
        ("argsz", "flags", "iova", "size"),
        None,
    ),
    ("vfio_bitmap", uapi.VFIO_BITMAP, ("pgsize", "size", "data"), None),
    ("vfio_iommu_type1_dirty_bitmap", uapi.IOMMU_TYPE1_DIRTY_BITMAP, ("argsz", "flags"), None),
    (
        "vfio_iommu_type1_dirty_bitmap_get",
        uapi.IOMMU_TYPE1_DIRTY_BITMAP_GET,
        ("iova", "size", "bitmap.pgsize", "bitmap.size", "bitmap.data"),
        None,
    ),
    (
        "vfio_iommu_type1_info_dma_avail",
        uapi.IOMMU_TYPE1_CAP_DMA_AVAIL,
        ("header.id", "header.version", "header.next", "avail"),
        None,
    ),
    (
        "vfio_iommu_type1_info_cap_iova_range",
        uapi.IOMMU_TYPE1_CAP_IOVA_RANGE,
        ("header.id", "header.version", "header.next", "nr_iovas", "reserved"),
        None,
    ),
    ("vfio_iova_range", uapi.IOVA_RANGE, ("start", "end"), None),
    # iommufd structs whose layout has not changed since they appeared
    (
        "iommu_ioas_map",
        uapi.IOMMU_IOAS_MAP_STRUCT,
        ("size", "flags", "ioas_id", "__reserved", "user_va", "length", "iova"),
        "IOMMU_IOAS_MAP",
    ),
    (
        "iommu_ioas_unmap",
        uapi.IOMMU_IOAS_UNMAP_STRUCT,
        ("size", "ioas_id", "iova", "length"),
        "IOMMU_IOAS_UNMAP",
    ),
    (
        "iommu_ioas_copy",
        uapi.IOMMU_IOAS_COPY_STRUCT,
        ("size", "flags", "dst_ioas_id", "src_ioas_id", "length", "dst_iova", "src_iova"),
        "IOMMU_IOAS_COPY",
    ),
    (
        "iommu_ioas_iova_ranges",
        uapi.IOMMU_IOAS_IOVA_RANGES_STRUCT,
        ("size", "ioas_id", "num_iovas", "__reserved", "allowed_iovas", "out_iova_alignment"),
        "IOMMU_IOAS_IOVA_RANGES",
    ),
    ("iommu_iova_range", uapi.IOMMU_IOVA_RANGE, ("start", "last"), "IOMMU_IOAS_IOVA_RANGES"),
    (
        "iommu_hwpt_set_dirty_tracking",
        uapi.IOMMU_HWPT_SET_DIRTY_TRACKING_STRUCT,
        ("size", "flags", "hwpt_id", "__reserved"),
        "IOMMU_HWPT_SET_DIRTY_TRACKING",
    ),
    (
        "iommu_hwpt_get_dirty_bitmap",
        uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_STRUCT,
        ("size", "hwpt_id", "flags", "__reserved", "iova", "length", "page_size", "data"),
        "IOMMU_HWPT_GET_DIRTY_BITMAP",
    ),
]
# Trailing struct members newer than their struct: guard macro (a macro of the same
# release) and our size of the struct without the member (checked when the header
# predates it).
NEWER_FIELDS: dict[tuple[str, str], tuple[str, int]] = {
    ("vfio_device_info", "pad"): ("VFIO_DEVICE_FLAGS_CDX", uapi.DEVICE_INFO_LEGACY_SIZE),
    ("vfio_device_bind_iommufd", "token_uuid_ptr"): (
        "VFIO_DEVICE_BIND_FLAG_TOKEN",
        uapi.BIND_IOMMUFD_MINSZ,
    ),
    ("vfio_device_attach_iommufd_pt", "pasid"): (
        "VFIO_DEVICE_ATTACH_PASID",
        uapi.ATTACH_IOMMUFD_PT_MINSZ,
    ),
    ("vfio_device_detach_iommufd_pt", "pasid"): (
        "VFIO_DEVICE_DETACH_PASID",
        uapi.DETACH_IOMMUFD_PT_MINSZ,
    ),
}

# The Linux release that added each item newer than 6.1 (anything not listed is in the
# 6.1 header and required of every header). Checked on the headers CI meets: Debian 12
# (6.1) lacks all of them, Debian 13 (6.12) has exactly those up to 6.12. The releases
# after 6.12 are from the upstream patches (QEMU's linux-headers updates, the kernel
# series that added them); the test fails if a header of that release or later lacks one.
Version = tuple[int, int]
_SINCE_BY_RELEASE: dict[Version, str] = {
    (6, 2): "VFIO_MIGRATION_PRE_COPY VFIO_DEVICE_STATE_PRE_COPY VFIO_DEVICE_STATE_PRE_COPY_P2P "
    "VFIO_MIG_GET_PRECOPY_INFO vfio_precopy_info "
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE vfio_device_feature_mig_data_size "
    "IOMMU_DESTROY IOMMU_IOAS_ALLOC IOMMU_IOAS_ALLOW_IOVAS IOMMU_IOAS_COPY "
    "IOMMU_IOAS_IOVA_RANGES IOMMU_IOAS_MAP IOMMU_IOAS_UNMAP IOMMU_OPTION IOMMU_VFIO_IOAS "
    "iommu_ioas_alloc iommu_destroy iommu_ioas_map iommu_ioas_unmap iommu_ioas_copy "
    "iommu_ioas_iova_ranges iommu_iova_range",
    (6, 5): "vfio_device_info.pad",
    (6, 6): "VFIO_DEVICE_FLAGS_CDX VFIO_DEVICE_BIND_IOMMUFD VFIO_DEVICE_ATTACH_IOMMUFD_PT "
    "VFIO_DEVICE_DETACH_IOMMUFD_PT vfio_device_bind_iommufd vfio_device_attach_iommufd_pt "
    "vfio_device_detach_iommufd_pt IOMMU_HWPT_ALLOC IOMMU_GET_HW_INFO",
    (6, 7): "IOMMU_HWPT_SET_DIRTY_TRACKING IOMMU_HWPT_GET_DIRTY_BITMAP "
    "iommu_hwpt_set_dirty_tracking iommu_hwpt_get_dirty_bitmap",
    (6, 8): "VFIO_DEVICE_FEATURE_BUS_MASTER",
    (6, 15): "VFIO_DEVICE_ATTACH_PASID VFIO_DEVICE_DETACH_PASID "
    "vfio_device_attach_iommufd_pt.pasid vfio_device_detach_iommufd_pt.pasid",
    (6, 17): "VFIO_DEVICE_BIND_FLAG_TOKEN vfio_device_bind_iommufd.token_uuid_ptr",
    (6, 19): "VFIO_DEVICE_FEATURE_DMA_BUF",
    (7, 1): "VFIO_PRECOPY_INFO_REINIT",
}
#: item (constant name, struct name or ``struct.field``) -> release that added it
SINCE: dict[str, Version] = {
    item: release for release, items in _SINCE_BY_RELEASE.items() for item in _words(items)
}


def _since(key: str) -> Version | None:
    """The release that added the item behind an expected key (None: in 6.1)."""
    kind, _, name = key.rpartition(":")
    if kind == "sizeof":
        return SINCE.get(name)
    if kind == "offsetof":
        releases = [r for r in (SINCE.get(name.split(".")[0]), SINCE.get(name)) if r]
        return max(releases) if releases else None
    return SINCE.get(name)


def _release(version: Version) -> str:
    return ".".join(map(str, version))


def _offsets(layout: struct.Struct) -> list[int]:
    fmt = layout.format
    order, codes = fmt[0], fmt[1:]
    return [struct.calcsize(order + codes[:i]) for i in range(len(codes))]


def _c_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/vfio.h>",
        "#if __has_include(<linux/iommufd.h>)",
        "#include <linux/iommufd.h>",
        "#endif",
        "#if __has_include(<linux/version.h>)",
        "#include <linux/version.h>",
        "#endif",
        '#define P(x) printf("%s %llu\\n", #x, (unsigned long long)(x))',
        "int main(void) {",
        "#ifdef LINUX_VERSION_CODE",
        '  printf("version:LINUX_VERSION_CODE %u\\n", (unsigned)LINUX_VERSION_CODE);',
        "#endif",
    ]
    for name in CONSTANTS:
        if name in ENUMS_61 or name in ENUMS_PRECOPY:
            continue
        lines += [f"#ifdef {name}", f"  P({name});", "#endif"]
    lines += [f"  P({name});" for name in ENUMS_61]
    lines += ["#ifdef VFIO_MIGRATION_PRE_COPY"]
    lines += [f"  P({name});" for name in ENUMS_PRECOPY]
    lines += ["#endif"]
    for cname, _layout, fields, guard in STRUCTS:
        if guard:
            lines.append(f"#ifdef {guard}")
        lines.append(f'  printf("sizeof:{cname} %zu\\n", sizeof(struct {cname}));')
        for field in fields:
            fguard = NEWER_FIELDS.get((cname, field), (None,))[0]
            if fguard:
                lines.append(f"#ifdef {fguard}")
            lines.append(
                f'  printf("offsetof:{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));'
            )
            if fguard:
                lines.append("#endif")
        if guard:
            lines.append("#endif")
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def _expected(header_values: dict[str, int] | None = None) -> dict[str, int]:
    """Our value for every key the C program can print; with ``header_values``, a struct
    whose newer trailing member the header lacks is expected at its older size."""
    exp = dict(CONSTANTS)
    for cname, layout, fields, _guard in STRUCTS:
        exp[f"sizeof:{cname}"] = layout.size
        for field, off in zip(fields, _offsets(layout), strict=True):
            exp[f"offsetof:{cname}.{field}"] = off
    if header_values is not None:
        for (cname, field), (_guard, older_size) in NEWER_FIELDS.items():
            if f"offsetof:{cname}.{field}" not in header_values:
                exp[f"sizeof:{cname}"] = older_size
    return exp


class Header:
    """What the C program printed: the values and the header's kernel release."""

    def __init__(self, out: str) -> None:
        self.values: dict[str, int] = {}
        self.version: Version | None = None
        for line in out.splitlines():
            key, value = line.split()
            if key == "version:LINUX_VERSION_CODE":
                code = int(value)
                self.version = (code >> 16, (code >> 8) & 0xFF)
            else:
                self.values[key] = int(value)

    @property
    def release(self) -> str:
        return "unknown" if self.version is None else _release(self.version)


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> Header:
    gcc = shutil.which("gcc")
    if gcc is None or not HEADER.exists():
        reason = "gcc missing" if gcc is None else f"{HEADER} missing (install linux-libc-dev)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"ABI test cannot run under CI: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("abi")
    src = tmp / "abi.c"
    src.write_text(_c_source())
    exe = tmp / "abi"
    subprocess.run([gcc, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return Header(out)


@pytest.fixture(scope="module")
def header_values(header: Header) -> dict[str, int]:
    return header.values


def test_uapi_abi_matches_header(header_values: dict[str, int]) -> None:
    expected = _expected(header_values)
    mismatches = {
        key: (value, expected[key])
        for key, value in header_values.items()
        if expected[key] != value
    }
    assert mismatches == {}, "header value != vfio_uapi.abi value"


def _missing(header: Header) -> dict[str, Version | None]:
    """Expected keys the header did not print, each with the release that added it."""
    return {key: _since(key) for key in sorted(set(_expected()) - set(header.values))}


def test_uapi_abi_header_coverage(header: Header) -> None:
    """Every item of the header's release (and all of 6.1) is checked; only items from
    later releases may be missing (they are reported by the next test)."""
    missing = _missing(header)
    in_61 = [key for key, since in missing.items() if since is None]
    assert in_61 == [], f"the header lacks items every header since Linux 6.1 has: {in_61}"
    assert header.version is not None, f"no LINUX_VERSION_CODE in {HEADER}'s <linux/version.h>"
    assert header.version >= (6, 1), f"header is Linux {header.release}; 6.1 is the oldest"
    should_have = {
        key: _release(since)
        for key, since in missing.items()
        if since is not None and since <= header.version
    }
    assert should_have == {}, (
        f"the Linux {header.release} header lacks items of its release or older "
        "(key: release in SINCE)"
    )
    # The release table agrees with the header the other way too: an item present in
    # the header is not from a later release.
    too_new = {
        key: _release(since)
        for key in header.values
        if (since := _since(key)) is not None and since > header.version
    }
    assert too_new == {}, f"SINCE says these are newer than the Linux {header.release} header"


def _item(key: str, missing: dict[str, Version | None]) -> str:
    """A readable item for an expected key: a constant, a whole struct, or a member."""
    kind, _, name = key.rpartition(":")
    cname = name.split(".")[0]
    whole = kind == "offsetof" and name not in SINCE and f"sizeof:{cname}" in missing
    if kind == "sizeof" or whole:
        return f"struct {cname}"
    return name


def test_uapi_abi_items_newer_than_header(header: Header) -> None:
    """Reports (as the skip reason) what the header could not check, with releases."""
    missing = _missing(header)
    if not missing:
        return
    by_release: dict[Version, list[str]] = {}
    for key, since in missing.items():
        items = by_release.setdefault(since or (0, 0), [])
        if (item := _item(key, missing)) not in items:
            items.append(item)
    report = "; ".join(
        f"Linux {_release(rel) if rel != (0, 0) else '6.1 (?)'}: {', '.join(items)}"
        for rel, items in sorted(by_release.items())
    )
    checked = len(header.values)
    pytest.skip(
        f"<linux/vfio.h> is Linux {header.release}: checked {checked} of "
        f"{checked + len(missing)} values; not in this header, so unchecked: {report}"
    )


def test_uapi_older_struct_sizes_are_offsets_of_the_newer_member() -> None:
    """Each older size in NEWER_FIELDS is where the newer trailing member starts."""
    layouts = {cname: (layout, fields) for cname, layout, fields, _ in STRUCTS}
    for (cname, field), (_guard, older_size) in NEWER_FIELDS.items():
        layout, fields = layouts[cname]
        assert fields[-1] == field, cname
        assert _offsets(layout)[-1] == older_size, cname
        assert _since(f"offsetof:{cname}.{field}") is not None, cname


def test_uapi_device_info_size_matches_header_generation(header_values: dict[str, int]) -> None:
    if "offsetof:vfio_device_info.pad" in header_values:
        assert header_values["sizeof:vfio_device_info"] == uapi.DEVICE_INFO.size
    else:
        assert header_values["sizeof:vfio_device_info"] == uapi.DEVICE_INFO_LEGACY_SIZE


def test_uapi_ioctl_numbers_are_size_less_io() -> None:
    for number, name in uapi.IOCTL_NAMES.items():
        assert number >> 16 == 0, name
        assert number >> 8 == 0x3B, name
        assert uapi.is_vfio_request(number)
    assert uapi.VFIO_DEVICE_FEATURE == 0x3B75
    assert uapi.VFIO_MIG_GET_PRECOPY_INFO == 0x3B79
    assert uapi.IOMMU_IOAS_ALLOC == 0x3B81
    assert not uapi.is_vfio_request(0x5401)  # TCGETS
    assert uapi.is_vfio_request(0xFFFFFFFF00003B75)  # the kernel ignores the high bits
