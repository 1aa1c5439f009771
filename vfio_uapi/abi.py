"""The Linux VFIO and iommufd uAPI as Python constants and ``struct`` layouts.

Pure data: ioctl request numbers, structure layouts (little-endian
``struct.Struct``), flag bits and indices from ``include/uapi/linux/vfio.h`` and
``include/uapi/linux/iommufd.h``. It is shared by the real-device backend
(:mod:`migrator.kernel`, client side) and the ``fakevfio run`` supervisor
(:mod:`fakevfio._run`, server side), and checked against the system header by
``tests/test_uapi_abi.py``.

Every VFIO ioctl is ``_IO(';', 100 + n)``: no direction or size bits, so the
structure size is not part of the number and ``argsz`` is the only versioning.
Layouts follow the newest kernels; where older headers differ (``vfio_device_info``
was 20 bytes before 2023) the difference is noted next to the layout.
"""

from __future__ import annotations

import struct

VFIO_TYPE = 0x3B  # ';'
VFIO_BASE = 100
IOMMUFD_BASE = 0x80


class Layout(struct.Struct):
    """A little-endian ``struct.Struct`` whose items are named after the C struct's fields.

    ``spec`` is ``"name:fmt ..."``, one item per field in declaration order:
    ``fmt`` one ``struct`` code (``I``, ``Q``, ``3x`` for padding or reserved
    bytes), ``name`` the C member (``header.id`` for a nested one, ``-`` for
    padding the C struct leaves implicit). ``tests/test_uapi_abi.py`` compares
    every field's offset and size, and the struct's size, with a compiled C
    program's ``offsetof``/``sizeof`` of ``struct c_name``.
    """

    def __init__(self, c_name: str, spec: str) -> None:
        items = [tuple(item.split(":", 1)) for item in spec.split()]
        super().__init__("<" + "".join(fmt for _name, fmt in items))
        self.c_name = c_name
        self.fields: tuple[tuple[str, str], ...] = tuple((n, f) for n, f in items)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """C member -> (offset, size) as this layout places it (padding left out)."""
        out: dict[str, tuple[int, int]] = {}
        prefix = "<"
        for name, fmt in self.fields:
            start = struct.calcsize(prefix)
            prefix += fmt
            if name != "-":
                out[name] = (start, struct.calcsize(prefix) - start)
        return out


def _io(nr: int) -> int:
    return (VFIO_TYPE << 8) | nr


VFIO_API_VERSION = 0

# --- ioctl numbers: container ----------------------------------------------------------------
VFIO_GET_API_VERSION = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_BASE + 2)
# --- group -----------------------------------------------------------------------------------
VFIO_GROUP_GET_STATUS = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _io(VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_BASE + 6)
# --- device ----------------------------------------------------------------------------------
VFIO_DEVICE_GET_INFO = _io(VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _io(VFIO_BASE + 10)
VFIO_DEVICE_RESET = _io(VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _io(VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _io(VFIO_BASE + 13)
VFIO_DEVICE_QUERY_GFX_PLANE = _io(VFIO_BASE + 14)
VFIO_DEVICE_GET_GFX_DMABUF = _io(VFIO_BASE + 15)
VFIO_DEVICE_IOEVENTFD = _io(VFIO_BASE + 16)
VFIO_DEVICE_FEATURE = _io(VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_BASE + 20)
# --- migration data_fd -----------------------------------------------------------------------
VFIO_MIG_GET_PRECOPY_INFO = _io(VFIO_BASE + 21)
# --- container aliases of the same numbers (type1 IOMMU) -------------------------------------
VFIO_IOMMU_GET_INFO = _io(VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io(VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_BASE + 14)
VFIO_IOMMU_ENABLE = _io(VFIO_BASE + 15)
VFIO_IOMMU_DISABLE = _io(VFIO_BASE + 16)
VFIO_IOMMU_DIRTY_PAGES = _io(VFIO_BASE + 17)
VFIO_EEH_PE_OP = _io(VFIO_BASE + 21)

# --- iommufd (/dev/iommu) --------------------------------------------------------------------
IOMMU_DESTROY = _io(IOMMUFD_BASE + 0)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_BASE + 1)
IOMMU_IOAS_ALLOW_IOVAS = _io(IOMMUFD_BASE + 2)
IOMMU_IOAS_COPY = _io(IOMMUFD_BASE + 3)
IOMMU_IOAS_IOVA_RANGES = _io(IOMMUFD_BASE + 4)
IOMMU_IOAS_MAP = _io(IOMMUFD_BASE + 5)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_BASE + 6)
IOMMU_OPTION = _io(IOMMUFD_BASE + 7)
IOMMU_VFIO_IOAS = _io(IOMMUFD_BASE + 8)
IOMMU_HWPT_ALLOC = _io(IOMMUFD_BASE + 9)
IOMMU_GET_HW_INFO = _io(IOMMUFD_BASE + 10)
IOMMU_HWPT_SET_DIRTY_TRACKING = _io(IOMMUFD_BASE + 11)
IOMMU_HWPT_GET_DIRTY_BITMAP = _io(IOMMUFD_BASE + 12)

#: Request numbers in the ``';'`` space: 0x64..0x7f VFIO, 0x80..0xff iommufd
#: (Documentation/userspace-api/ioctl/ioctl-number.rst).
VFIO_IOCTL_FIRST = _io(VFIO_BASE)
VFIO_IOCTL_LAST = _io(0xFF)

# --- extensions / IOMMU types (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) --------------------------
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6  # reserved in newest headers
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

# --- group status ----------------------------------------------------------------------------
GROUP_STATUS = Layout("vfio_group_status", "argsz:I flags:I")
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# --- capability chain header -----------------------------------------------------------------
INFO_CAP_HEADER = Layout("vfio_info_cap_header", "id:H version:H next:I")

# --- device info -----------------------------------------------------------------------------
#: argsz, flags, num_regions, num_irqs, cap_offset, pad (pad since 2023; 6.1 headers: 20 bytes)
DEVICE_INFO = Layout(
    "vfio_device_info", "argsz:I flags:I num_regions:I num_irqs:I cap_offset:I pad:I"
)
DEVICE_INFO_MINSZ = 16
DEVICE_INFO_LEGACY_SIZE = 20
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8

# --- region info -----------------------------------------------------------------------------
REGION_INFO = Layout("vfio_region_info", "argsz:I flags:I index:I cap_offset:I size:Q offset:Q")
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5


def region_offset(index: int) -> int:
    """File offset of PCI region ``index`` in a vfio-pci device fd."""
    return index << VFIO_PCI_OFFSET_SHIFT


# --- irq info / set --------------------------------------------------------------------------
IRQ_INFO = Layout("vfio_irq_info", "argsz:I flags:I index:I count:I")
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3
#: data[] follows
IRQ_SET = Layout("vfio_irq_set", "argsz:I flags:I index:I start:I count:I")
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# --- device feature --------------------------------------------------------------------------
#: data[] follows at offset 8
DEVICE_FEATURE = Layout("vfio_device_feature", "argsz:I flags:I")
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_ALL_FLAGS = (
    VFIO_DEVICE_FEATURE_MASK
    | VFIO_DEVICE_FEATURE_GET
    | VFIO_DEVICE_FEATURE_SET
    | VFIO_DEVICE_FEATURE_PROBE
)

VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9
VFIO_DEVICE_FEATURE_BUS_MASTER = 10
VFIO_DEVICE_FEATURE_DMA_BUF = 11
VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2 = 12

#: payload of MIGRATION (GET): u64 flags
FEATURE_MIGRATION = Layout("vfio_device_feature_migration", "flags:Q")
VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2
#: payload of MIG_DEVICE_STATE (GET/SET): u32 device_state, s32 data_fd
FEATURE_MIG_STATE = Layout("vfio_device_feature_mig_state", "device_state:I data_fd:i")
#: payload of MIG_DATA_SIZE (GET): u64 stop_copy_length
FEATURE_MIG_DATA_SIZE = Layout("vfio_device_feature_mig_data_size", "stop_copy_length:Q")
#: DMA logging payloads
DMA_LOGGING_CONTROL = Layout(
    "vfio_device_feature_dma_logging_control", "page_size:Q num_ranges:I __reserved:I ranges:Q"
)
DMA_LOGGING_RANGE = Layout("vfio_device_feature_dma_logging_range", "iova:Q length:Q")
DMA_LOGGING_REPORT = Layout(
    "vfio_device_feature_dma_logging_report", "iova:Q length:Q page_size:Q bitmap:Q"
)

VFIO_DEVICE_STATE_ERROR = 0
VFIO_DEVICE_STATE_STOP = 1
VFIO_DEVICE_STATE_RUNNING = 2
VFIO_DEVICE_STATE_STOP_COPY = 3
VFIO_DEVICE_STATE_RESUMING = 4
VFIO_DEVICE_STATE_RUNNING_P2P = 5
VFIO_DEVICE_STATE_PRE_COPY = 6
VFIO_DEVICE_STATE_PRE_COPY_P2P = 7
VFIO_DEVICE_STATE_NR = 8

#: VFIO_MIG_GET_PRECOPY_INFO (on the data_fd): argsz, flags, initial_bytes, dirty_bytes
PRECOPY_INFO = Layout("vfio_precopy_info", "argsz:I flags:I initial_bytes:Q dirty_bytes:Q")
VFIO_PRECOPY_INFO_REINIT = 1 << 0

# --- iommufd cdev binding --------------------------------------------------------------------
#: argsz, flags, s32 iommufd, out_devid, u64 token_uuid_ptr (min 16 without the token)
BIND_IOMMUFD = Layout(
    "vfio_device_bind_iommufd", "argsz:I flags:I iommufd:i out_devid:I token_uuid_ptr:Q"
)
BIND_IOMMUFD_MINSZ = 16
VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
#: min 12
ATTACH_IOMMUFD_PT = Layout("vfio_device_attach_iommufd_pt", "argsz:I flags:I pt_id:I pasid:I")
ATTACH_IOMMUFD_PT_MINSZ = 12
#: min 8
DETACH_IOMMUFD_PT = Layout("vfio_device_detach_iommufd_pt", "argsz:I flags:I pasid:I")
DETACH_IOMMUFD_PT_MINSZ = 8
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0
IOMMU_IOAS_ALLOC_STRUCT = Layout("iommu_ioas_alloc", "size:I flags:I out_ioas_id:I")
IOMMU_DESTROY_STRUCT = Layout("iommu_destroy", "size:I id:I")

# --- type1 container (vfio_iommu_type1.c) ---------------------------------------------------
#: argsz, flags, iova_pgsizes, cap_offset, pad (sizeof 24; minsz 16 through iova_pgsizes)
IOMMU_TYPE1_INFO = Layout(
    "vfio_iommu_type1_info", "argsz:I flags:I iova_pgsizes:Q cap_offset:I pad:I"
)
IOMMU_TYPE1_INFO_MINSZ = 16
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3
#: header (id, version, next), nr_iovas, reserved; vfio_iova_range[] follows
IOMMU_TYPE1_CAP_IOVA_RANGE = Layout(
    "vfio_iommu_type1_info_cap_iova_range",
    "header.id:H header.version:H header.next:I nr_iovas:I reserved:I",
)
#: end is inclusive
IOVA_RANGE = Layout("vfio_iova_range", "start:Q end:Q")
#: header, flags, pad, pgsize_bitmap, max_dirty_bitmap_size
IOMMU_TYPE1_CAP_MIGRATION = Layout(
    "vfio_iommu_type1_info_cap_migration",
    "header.id:H header.version:H header.next:I flags:I -:I pgsize_bitmap:Q "
    "max_dirty_bitmap_size:Q",
)
#: header, avail (sizeof 12)
IOMMU_TYPE1_CAP_DMA_AVAIL = Layout(
    "vfio_iommu_type1_info_dma_avail", "header.id:H header.version:H header.next:I avail:I"
)
#: argsz, flags, vaddr, iova, size
IOMMU_TYPE1_DMA_MAP = Layout("vfio_iommu_type1_dma_map", "argsz:I flags:I vaddr:Q iova:Q size:Q")
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
#: argsz, flags, iova, size; a vfio_bitmap follows with GET_DIRTY_BITMAP
IOMMU_TYPE1_DMA_UNMAP = Layout("vfio_iommu_type1_dma_unmap", "argsz:I flags:I iova:Q size:Q")
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2
#: size in bytes; data is a user pointer
VFIO_BITMAP = Layout("vfio_bitmap", "pgsize:Q size:Q data:Q")
#: data[] follows
IOMMU_TYPE1_DIRTY_BITMAP = Layout("vfio_iommu_type1_dirty_bitmap", "argsz:I flags:I")
VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2
#: iova, size, then a vfio_bitmap (pgsize, size, data)
IOMMU_TYPE1_DIRTY_BITMAP_GET = Layout(
    "vfio_iommu_type1_dirty_bitmap_get", "iova:Q size:Q bitmap.pgsize:Q bitmap.size:Q bitmap.data:Q"
)

# --- iommufd structures (include/uapi/linux/iommufd.h, current kernel) ----------------------
#: size, flags, ioas_id, __reserved, user_va, length, iova
IOMMU_IOAS_MAP_STRUCT = Layout(
    "iommu_ioas_map", "size:I flags:I ioas_id:I __reserved:I user_va:Q length:Q iova:Q"
)
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2
#: size, ioas_id, iova, length
IOMMU_IOAS_UNMAP_STRUCT = Layout("iommu_ioas_unmap", "size:I ioas_id:I iova:Q length:Q")
#: size, flags, dst_ioas_id, src_ioas_id, length, dst_iova, src_iova
IOMMU_IOAS_COPY_STRUCT = Layout(
    "iommu_ioas_copy", "size:I flags:I dst_ioas_id:I src_ioas_id:I length:Q dst_iova:Q src_iova:Q"
)
#: size, ioas_id, num_iovas, __reserved, allowed_iovas, out_iova_alignment
IOMMU_IOAS_IOVA_RANGES_STRUCT = Layout(
    "iommu_ioas_iova_ranges",
    "size:I ioas_id:I num_iovas:I __reserved:I allowed_iovas:Q out_iova_alignment:Q",
)
#: last is inclusive
IOMMU_IOAS_ALLOW_IOVAS_STRUCT = Layout(
    "iommu_ioas_allow_iovas", "size:I ioas_id:I num_iovas:I __reserved:I allowed_iovas:Q"
)
IOMMU_OPTION_STRUCT = Layout(
    "iommu_option", "size:I option_id:I op:H __reserved:H object_id:I val64:Q"
)
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1
IOMMU_IOVA_RANGE = Layout("iommu_iova_range", "start:Q last:Q")
#: size, flags, dev_id, pt_id, out_hwpt_id, __reserved, data_type, data_len, data_uptr,
#: fault_id, __reserved2 (48 bytes since 6.11: fault_id with IOMMU_HWPT_FAULT_ID_VALID;
#: 40 before). The kernel requires 24 (through __reserved) and zero-fills the rest.
IOMMU_HWPT_ALLOC_STRUCT = Layout(
    "iommu_hwpt_alloc",
    "size:I flags:I dev_id:I pt_id:I out_hwpt_id:I __reserved:I data_type:I data_len:I "
    "data_uptr:Q fault_id:I __reserved2:I",
)
IOMMU_HWPT_ALLOC_MINSZ = 24
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3
IOMMU_HWPT_DATA_NONE = 0
#: size, flags, dev_id, data_len, data_uptr, in_data_type/out_data_type (a union),
#: u8 out_max_pasid_log2 (byte 28, since 6.13; a u32 __reserved before), u8 __reserved[3],
#: out_capabilities (since 6.8; 32 bytes before). The kernel requires 32.
IOMMU_HW_INFO_STRUCT = Layout(
    "iommu_hw_info",
    "size:I flags:I dev_id:I data_len:I data_uptr:Q out_data_type:I out_max_pasid_log2:B "
    "__reserved:3x out_capabilities:Q",
)
IOMMU_HW_INFO_MINSZ = 32
IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_DEFAULT = 0
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
#: size, flags, hwpt_id, __reserved
IOMMU_HWPT_SET_DIRTY_TRACKING_STRUCT = Layout(
    "iommu_hwpt_set_dirty_tracking", "size:I flags:I hwpt_id:I __reserved:I"
)
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1 << 0
#: size, hwpt_id, flags, __reserved, iova, length, page_size, data (user pointer)
IOMMU_HWPT_GET_DIRTY_BITMAP_STRUCT = Layout(
    "iommu_hwpt_get_dirty_bitmap",
    "size:I hwpt_id:I flags:I __reserved:I iova:Q length:Q page_size:Q data:Q",
)
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1 << 0

#: Names of every ioctl number above (for messages and the supervisor's log).
IOCTL_NAMES: dict[int, str] = {
    VFIO_GET_API_VERSION: "VFIO_GET_API_VERSION",
    VFIO_CHECK_EXTENSION: "VFIO_CHECK_EXTENSION",
    VFIO_SET_IOMMU: "VFIO_SET_IOMMU",
    VFIO_GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    VFIO_GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    VFIO_GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    VFIO_GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
    VFIO_DEVICE_GET_INFO: "VFIO_DEVICE_GET_INFO",
    VFIO_DEVICE_GET_REGION_INFO: "VFIO_DEVICE_GET_REGION_INFO",
    VFIO_DEVICE_GET_IRQ_INFO: "VFIO_DEVICE_GET_IRQ_INFO",
    VFIO_DEVICE_SET_IRQS: "VFIO_DEVICE_SET_IRQS",
    VFIO_DEVICE_RESET: "VFIO_DEVICE_RESET",
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
    VFIO_DEVICE_PCI_HOT_RESET: "VFIO_DEVICE_PCI_HOT_RESET",
    VFIO_DEVICE_QUERY_GFX_PLANE: "VFIO_DEVICE_QUERY_GFX_PLANE",
    VFIO_DEVICE_GET_GFX_DMABUF: "VFIO_DEVICE_GET_GFX_DMABUF",
    VFIO_DEVICE_IOEVENTFD: "VFIO_DEVICE_IOEVENTFD",
    VFIO_DEVICE_FEATURE: "VFIO_DEVICE_FEATURE",
    VFIO_DEVICE_BIND_IOMMUFD: "VFIO_DEVICE_BIND_IOMMUFD",
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    VFIO_DEVICE_DETACH_IOMMUFD_PT: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    VFIO_MIG_GET_PRECOPY_INFO: "VFIO_MIG_GET_PRECOPY_INFO",
    IOMMU_DESTROY: "IOMMU_DESTROY",
    IOMMU_IOAS_ALLOC: "IOMMU_IOAS_ALLOC",
    IOMMU_IOAS_ALLOW_IOVAS: "IOMMU_IOAS_ALLOW_IOVAS",
    IOMMU_IOAS_COPY: "IOMMU_IOAS_COPY",
    IOMMU_IOAS_IOVA_RANGES: "IOMMU_IOAS_IOVA_RANGES",
    IOMMU_IOAS_MAP: "IOMMU_IOAS_MAP",
    IOMMU_IOAS_UNMAP: "IOMMU_IOAS_UNMAP",
    IOMMU_OPTION: "IOMMU_OPTION",
    IOMMU_VFIO_IOAS: "IOMMU_VFIO_IOAS",
    IOMMU_HWPT_ALLOC: "IOMMU_HWPT_ALLOC",
    IOMMU_GET_HW_INFO: "IOMMU_GET_HW_INFO",
    IOMMU_HWPT_SET_DIRTY_TRACKING: "IOMMU_HWPT_SET_DIRTY_TRACKING",
    IOMMU_HWPT_GET_DIRTY_BITMAP: "IOMMU_HWPT_GET_DIRTY_BITMAP",
}


def ioctl_name(request: int) -> str:
    """A readable name for a request number (device-fd meaning where numbers are shared)."""
    return IOCTL_NAMES.get(request, f"ioctl 0x{request:x}")


def is_vfio_request(request: int) -> bool:
    """Whether ``request`` lies in the VFIO/iommufd ``';'`` range (low 32 bits, as the kernel)."""
    return VFIO_IOCTL_FIRST <= (request & 0xFFFFFFFF) <= VFIO_IOCTL_LAST
