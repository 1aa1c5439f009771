"""vfio_uapi.abi against the system's <linux/vfio.h> (and <linux/iommufd.h> if present).

A small C program is compiled into tmp_path; it prints every ioctl number, constant,
``sizeof`` and ``offsetof`` the installed header defines (guarded by ``#ifdef`` so an
older header simply prints less). Each printed value must equal ours.

The Debian 12 header is Linux 6.1: it lacks PRE_COPY, MIG_DATA_SIZE, PRECOPY_INFO,
the iommufd cdev ioctls and ``vfio_device_info.pad`` (20 bytes there, 24 now), and
there is no <linux/iommufd.h>. Those items are listed in ``NEWER_THAN_6_1`` and are
checked only when the header has them; the test reports which were checked.
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
        "VFIO_DEVICE_STATE_PRE_COPY VFIO_DEVICE_STATE_PRE_COPY_P2P"
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
    ("vfio_device_info", uapi.DEVICE_INFO,
     ("argsz", "flags", "num_regions", "num_irqs", "cap_offset", "pad"), None),
    ("vfio_region_info", uapi.REGION_INFO,
     ("argsz", "flags", "index", "cap_offset", "size", "offset"), None),
    ("vfio_irq_info", uapi.IRQ_INFO, ("argsz", "flags", "index", "count"), None),
    ("vfio_irq_set", uapi.IRQ_SET, ("argsz", "flags", "index", "start", "count"), None),
    ("vfio_device_feature", uapi.DEVICE_FEATURE, ("argsz", "flags"), None),
    ("vfio_device_feature_migration", uapi.FEATURE_MIGRATION, ("flags",), None),
    ("vfio_device_feature_mig_state", uapi.FEATURE_MIG_STATE,
     ("device_state", "data_fd"), None),
    ("vfio_device_feature_dma_logging_control", uapi.DMA_LOGGING_CONTROL,
     ("page_size", "num_ranges", "__reserved", "ranges"), None),
    ("vfio_device_feature_dma_logging_range", uapi.DMA_LOGGING_RANGE, ("iova", "length"), None),
    ("vfio_device_feature_dma_logging_report", uapi.DMA_LOGGING_REPORT,
     ("iova", "length", "page_size", "bitmap"), None),
    ("vfio_device_feature_mig_data_size", uapi.FEATURE_MIG_DATA_SIZE,
     ("stop_copy_length",), "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE"),
    ("vfio_precopy_info", uapi.PRECOPY_INFO,
     ("argsz", "flags", "initial_bytes", "dirty_bytes"), "VFIO_MIG_GET_PRECOPY_INFO"),
    ("vfio_device_bind_iommufd", uapi.BIND_IOMMUFD,
     ("argsz", "flags", "iommufd", "out_devid", "token_uuid_ptr"), "VFIO_DEVICE_BIND_FLAG_TOKEN"),
    ("vfio_device_attach_iommufd_pt", uapi.ATTACH_IOMMUFD_PT,
     ("argsz", "flags", "pt_id", "pasid"), "VFIO_DEVICE_ATTACH_PASID"),
    ("vfio_device_detach_iommufd_pt", uapi.DETACH_IOMMUFD_PT,
     ("argsz", "flags", "pasid"), "VFIO_DEVICE_DETACH_PASID"),
    ("iommu_ioas_alloc", uapi.IOMMU_IOAS_ALLOC_STRUCT, ("size", "flags", "out_ioas_id"),
     "IOMMU_IOAS_ALLOC"),
    ("iommu_destroy", uapi.IOMMU_DESTROY_STRUCT, ("size", "id"), "IOMMU_DESTROY"),
]
# Struct members that appeared after 6.1 inside structs 6.1 already has: guard macro.
NEWER_FIELDS = {
    ("vfio_device_info", "pad"): "VFIO_DEVICE_FLAGS_CDX",
}

#: Everything the 6.1 header lacks (checked only when the installed header has it).
NEWER_THAN_6_1 = (
    "PRE_COPY flag and states, MIG_DATA_SIZE, VFIO_MIG_GET_PRECOPY_INFO and its struct, "
    "BIND/ATTACH/DETACH_IOMMUFD_PT ioctls and structs, DMA_BUF/BUS_MASTER features, "
    "vfio_device_info.pad (20 -> 24 bytes), VFIO_DEVICE_FLAGS_CDX, <linux/iommufd.h>"
)


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
        '#define P(x) printf("%s %llu\\n", #x, (unsigned long long)(x))',
        "int main(void) {",
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
            fguard = NEWER_FIELDS.get((cname, field))
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


def _expected() -> dict[str, int]:
    exp = dict(CONSTANTS)
    for cname, layout, fields, _guard in STRUCTS:
        exp[f"sizeof:{cname}"] = layout.size
        for field, off in zip(fields, _offsets(layout), strict=True):
            exp[f"offsetof:{cname}.{field}"] = off
    return exp


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
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
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, value = line.split()
        values[key] = int(value)
    return values


def test_uapi_abi_matches_header(header_values: dict[str, int]) -> None:
    expected = _expected()
    if "offsetof:vfio_device_info.pad" not in header_values:
        # Pre-2023 header: 20 bytes; checked in test_uapi_device_info_size_...
        expected["sizeof:vfio_device_info"] = uapi.DEVICE_INFO_LEGACY_SIZE
    mismatches = {
        key: (value, expected[key]) for key, value in header_values.items()
        if expected[key] != value
    }
    assert mismatches == {}, "header value != vfio_uapi.abi value"


def test_uapi_abi_header_coverage(header_values: dict[str, int]) -> None:
    """Everything in 6.1 is checked; items newer than the header are reported."""
    expected = _expected()
    missing = sorted(set(expected) - set(header_values))
    newer_items = {
        "VFIO_MIGRATION_PRE_COPY", "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", "VFIO_MIG_GET_PRECOPY_INFO",
        "VFIO_DEVICE_BIND_IOMMUFD", "sizeof:vfio_precopy_info",
    }
    if not newer_items & set(header_values):
        # A 6.1-era header: only the newer items may be missing.
        allowed_prefixes = (
            "IOMMU_", "VFIO_DEVICE_BIND", "VFIO_DEVICE_ATTACH", "VFIO_DEVICE_DETACH",
            "VFIO_MIG_GET_PRECOPY_INFO", "VFIO_PRECOPY", "VFIO_MIGRATION_PRE_COPY",
            "VFIO_DEVICE_STATE_PRE_COPY", "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
            "VFIO_DEVICE_FEATURE_BUS_MASTER", "VFIO_DEVICE_FEATURE_DMA_BUF",
            "VFIO_DEVICE_FLAGS_CDX", "sizeof:vfio_precopy_info", "offsetof:vfio_precopy_info",
            "sizeof:vfio_device_feature_mig_data_size",
            "offsetof:vfio_device_feature_mig_data_size", "sizeof:vfio_device_bind",
            "offsetof:vfio_device_bind", "sizeof:vfio_device_attach", "offsetof:vfio_device_attach",
            "sizeof:vfio_device_detach", "offsetof:vfio_device_detach", "sizeof:iommu_",
            "offsetof:iommu_", "offsetof:vfio_device_info.pad",
        )
        unexpected = [m for m in missing if not m.startswith(allowed_prefixes)]
        assert unexpected == []
        # The one layout that differs on purpose: 6.1 has no pad member.
        assert header_values["sizeof:vfio_device_info"] == uapi.DEVICE_INFO_LEGACY_SIZE
    else:
        assert missing == []


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
