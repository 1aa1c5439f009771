/* IOMMU dirty tracking through the real ioctl path; run under `fakevfio run` by
 * tests/fakevfio/run/test_iommu_c.py.
 *
 * The program maps its own memory for the device, lets the device DMA into it (a ram
 * device with dma_rate writes random pages while RUNNING), stops the device and
 * compares the pages whose content changed with the dirty bitmap the IOMMU reports.
 * It prints "key value" lines (errno values, 64-bit page masks in hex).
 *
 *   iommu_dirty iommufd CDEV      IOMMU_HWPT_* dirty tracking (iommufd cdev path)
 *   iommu_dirty type1 GROUP NAME  VFIO_IOMMU_DIRTY_PAGES and unmap with bitmap (container)
 *   iommu_dirty bench CDEV MIB N  N GET_DIRTY_BITMAP of a MIB MiB mapping: "us_per_call U"
 *
 * The type1, device-feature and migration structs come from the system's <linux/vfio.h>.
 * The Debian 12 header (Linux 6.1) has no <linux/iommufd.h> and no cdev ioctls, so the
 * iommufd structs and the BIND/ATTACH ioctls below are defined here from the current
 * kernel's include/uapi/linux/iommufd.h and vfio.h (same names, same layouts).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- from the current include/uapi/linux/iommufd.h (absent from the 6.1 header) ---- */
#define IOMMUFD_TYPE (';')
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, 0x81)
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, 0x85)
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, 0x86)
#define IOMMU_HWPT_ALLOC _IO(IOMMUFD_TYPE, 0x89)
#define IOMMU_GET_HW_INFO _IO(IOMMUFD_TYPE, 0x8a)
#define IOMMU_HWPT_SET_DIRTY_TRACKING _IO(IOMMUFD_TYPE, 0x8b)
#define IOMMU_HWPT_GET_DIRTY_BITMAP _IO(IOMMUFD_TYPE, 0x8c)
struct iommu_ioas_alloc { uint32_t size, flags, out_ioas_id; };
enum { IOMMU_IOAS_MAP_FIXED_IOVA = 1, IOMMU_IOAS_MAP_WRITEABLE = 2, IOMMU_IOAS_MAP_READABLE = 4 };
struct iommu_ioas_map {
    uint32_t size, flags, ioas_id, __reserved;
    uint64_t user_va, length, iova;
};
struct iommu_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
enum { IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1 };
struct iommu_hwpt_alloc {
    uint32_t size, flags, dev_id, pt_id, out_hwpt_id, __reserved, data_type, data_len;
    uint64_t data_uptr;
    uint32_t fault_id, __reserved2;
};
enum { IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0 };
struct iommu_hw_info {
    uint32_t size, flags, dev_id, data_len;
    uint64_t data_uptr;
    uint32_t out_data_type;
    uint8_t out_max_pasid_log2, __reserved[3];
    uint64_t out_capabilities;
};
enum { IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1 };
struct iommu_hwpt_set_dirty_tracking { uint32_t size, flags, hwpt_id, __reserved; };
enum { IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1 };
struct iommu_hwpt_get_dirty_bitmap {
    uint32_t size, hwpt_id, flags, __reserved;
    uint64_t iova, length, page_size, data;
};
/* ---- from the current include/uapi/linux/vfio.h (Linux 6.6+, absent from 6.1; a
 * newer system header has them, e.g. Debian 13's 6.12, and then its own are used) ---- */
#ifndef VFIO_DEVICE_BIND_IOMMUFD
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
struct vfio_device_bind_iommufd { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; };
struct vfio_device_attach_iommufd_pt { uint32_t argsz, flags, pt_id; };
#endif

#define PAGES 64
#define LEN (PAGES * 4096UL)
#define IOVA 0x100000UL

static int err_of(int rc) { return rc < 0 ? errno : 0; }

static void die(const char *what) { perror(what); exit(2); }

static int set_state(int fd, uint32_t state) {
    char buf[sizeof(struct vfio_device_feature) + sizeof(struct vfio_device_feature_mig_state)];
    struct vfio_device_feature *f = (void *)buf;
    struct vfio_device_feature_mig_state *st = (void *)f->data;
    memset(buf, 0, sizeof buf);
    f->argsz = sizeof buf;
    f->flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    st->device_state = state;
    st->data_fd = -1;
    return err_of(ioctl(fd, VFIO_DEVICE_FEATURE, f));
}

/* The pages of buf that differ from snap, as a mask; snap becomes buf. */
static uint64_t changed(uint8_t *buf, uint8_t *snap) {
    uint64_t mask = 0;
    for (int p = 0; p < PAGES; p++)
        if (memcmp(buf + p * 4096, snap + p * 4096, 4096)) mask |= 1ULL << p;
    memcpy(snap, buf, LEN);
    return mask;
}

/* Let the device DMA for a while: RUNNING, sleep, STOP. */
static void run_device(int dev) {
    printf("set_running %d\n", set_state(dev, VFIO_DEVICE_STATE_RUNNING));
    usleep(600 * 1000);
    printf("set_stop %d\n", set_state(dev, VFIO_DEVICE_STATE_STOP));
}

static uint8_t *buffer(uint8_t **snap) {
    uint8_t *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) die("mmap");
    memset(buf, 0, LEN);
    *snap = calloc(1, LEN);
    return buf;
}

static int iommufd_mode(const char *cdev) {
    int dev = open(cdev, O_RDWR), iommu = open("/dev/iommu", O_RDWR);
    if (dev < 0 || iommu < 0) die("open");
    struct vfio_device_bind_iommufd bind = { sizeof bind, 0, iommu, 0 };
    printf("bind %d\n", err_of(ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind)));
    struct iommu_hw_info hw = { .size = sizeof hw, .dev_id = bind.out_devid };
    printf("hw_info %d\n", err_of(ioctl(iommu, IOMMU_GET_HW_INFO, &hw)));
    printf("hw_caps %llu\n", (unsigned long long)hw.out_capabilities);
    struct iommu_ioas_alloc ioas = { sizeof ioas, 0, 0 };
    printf("ioas_alloc %d\n", err_of(ioctl(iommu, IOMMU_IOAS_ALLOC, &ioas)));
    struct iommu_hwpt_alloc plain = { .size = sizeof plain, .dev_id = bind.out_devid,
                                      .pt_id = ioas.out_ioas_id };
    printf("hwpt_plain %d\n", err_of(ioctl(iommu, IOMMU_HWPT_ALLOC, &plain)));
    struct iommu_hwpt_alloc hwpt = plain;
    hwpt.flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    printf("hwpt_dirty %d\n", err_of(ioctl(iommu, IOMMU_HWPT_ALLOC, &hwpt)));
    struct vfio_device_attach_iommufd_pt at = { sizeof at, 0, hwpt.out_hwpt_id };
    printf("attach %d\n", err_of(ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at)));
    printf("set_stop0 %d\n", set_state(dev, VFIO_DEVICE_STATE_STOP));

    uint8_t *snap, *buf = buffer(&snap);
    struct iommu_ioas_map map = { sizeof map, IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                  IOMMU_IOAS_MAP_WRITEABLE, ioas.out_ioas_id, 0,
                                  (uintptr_t)buf, LEN, IOVA };
    printf("map %d\n", err_of(ioctl(iommu, IOMMU_IOAS_MAP, &map)));
    struct iommu_ioas_map bad = map;
    bad.length = 4096;
    printf("map_overlap %d\n", err_of(ioctl(iommu, IOMMU_IOAS_MAP, &bad)));
    bad.iova = IOVA + LEN + 0x800;
    printf("map_unaligned %d\n", err_of(ioctl(iommu, IOMMU_IOAS_MAP, &bad)));

    struct iommu_hwpt_set_dirty_tracking sd = { sizeof sd, IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                                                plain.out_hwpt_id, 0 };
    printf("set_dirty_plain %d\n", err_of(ioctl(iommu, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd)));
    sd.hwpt_id = hwpt.out_hwpt_id;
    printf("set_dirty %d\n", err_of(ioctl(iommu, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd)));

    run_device(dev);
    uint64_t want = changed(buf, snap), got = 0;
    struct iommu_hwpt_get_dirty_bitmap gd = { sizeof gd, hwpt.out_hwpt_id, 0, 0, IOVA, LEN,
                                             4096, (uintptr_t)&got };
    struct iommu_hwpt_get_dirty_bitmap bgd = gd;
    bgd.page_size = 0;
    printf("bitmap_page0 %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &bgd)));
    bgd = gd;
    bgd.iova = IOVA + 0x800;
    printf("bitmap_unaligned %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &bgd)));
    bgd = gd;
    bgd.length = LEN + 4096;
    printf("bitmap_hole %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &bgd)));
    bgd = gd;
    bgd.hwpt_id = plain.out_hwpt_id;
    printf("bitmap_plain %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &bgd)));
    gd.flags = IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;
    printf("bitmap_noclear %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &gd)));
    printf("dirty_noclear %016llx\n", (unsigned long long)got);
    got = 0;
    gd.flags = 0;
    printf("bitmap %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &gd)));
    printf("dirty %016llx\nchanged %016llx\n", (unsigned long long)got, (unsigned long long)want);
    got = 0;
    printf("bitmap_again %d\n", err_of(ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &gd)));
    printf("dirty_again %016llx\n", (unsigned long long)got);

    struct iommu_ioas_unmap un = { sizeof un, ioas.out_ioas_id, IOVA, 4096 };
    printf("unmap_cut %d\n", err_of(ioctl(iommu, IOMMU_IOAS_UNMAP, &un)));
    un.length = LEN;
    printf("unmap %d\n", err_of(ioctl(iommu, IOMMU_IOAS_UNMAP, &un)));
    printf("unmapped %llu\n", (unsigned long long)un.length);
    fflush(stdout);
    return 0;
}

static int type1_mode(const char *group_path, const char *name) {
    int c = open("/dev/vfio/vfio", O_RDWR), g = open(group_path, O_RDWR);
    if (c < 0 || g < 0) die("open");
    printf("set_container %d\n", err_of(ioctl(g, VFIO_GROUP_SET_CONTAINER, &c)));
    printf("set_iommu %d\n", err_of(ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)));
    /* GET_INFO twice, as QEMU does: learn argsz, then read the capability chain */
    struct vfio_iommu_type1_info probe = { .argsz = sizeof probe };
    printf("get_info %d\n", err_of(ioctl(c, VFIO_IOMMU_GET_INFO, &probe)));
    printf("info_argsz %u\ninfo_flags %u\n", probe.argsz, probe.flags);
    struct vfio_iommu_type1_info *info = calloc(1, probe.argsz);
    info->argsz = probe.argsz;
    printf("get_info2 %d\n", err_of(ioctl(c, VFIO_IOMMU_GET_INFO, info)));
    printf("iova_pgsizes %llx\n", (unsigned long long)info->iova_pgsizes);
    for (uint32_t off = info->cap_offset; off; ) {
        struct vfio_info_cap_header *h = (void *)((char *)info + off);
        printf("cap_%u_version %u\n", h->id, h->version);
        if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION) {
            struct vfio_iommu_type1_info_cap_migration *mig = (void *)h;
            printf("mig_pgsize %llx\nmig_max_bitmap %llu\n",
                   (unsigned long long)mig->pgsize_bitmap,
                   (unsigned long long)mig->max_dirty_bitmap_size);
        } else if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
            printf("dma_avail %u\n", ((struct vfio_iommu_type1_info_dma_avail *)h)->avail);
        } else if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
            struct vfio_iommu_type1_info_cap_iova_range *r = (void *)h;
            printf("nr_iovas %u\niova_end %llx\n", r->nr_iovas,
                   (unsigned long long)r->iova_ranges[0].end);
        }
        off = h->next;
    }
    int dev = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, name);
    printf("device_fd %d\n", dev >= 0 ? 0 : errno);
    printf("set_stop0 %d\n", set_state(dev, VFIO_DEVICE_STATE_STOP));

    uint8_t *snap, *buf = buffer(&snap);
    struct vfio_iommu_type1_dma_map map = { sizeof map, VFIO_DMA_MAP_FLAG_READ |
                                            VFIO_DMA_MAP_FLAG_WRITE, (uintptr_t)buf, IOVA, LEN };
    printf("map %d\n", err_of(ioctl(c, VFIO_IOMMU_MAP_DMA, &map)));
    struct vfio_iommu_type1_dma_map bad = map;
    bad.size = 4096;
    printf("map_overlap %d\n", err_of(ioctl(c, VFIO_IOMMU_MAP_DMA, &bad)));
    bad.iova = IOVA + LEN + 0x800;
    printf("map_unaligned %d\n", err_of(ioctl(c, VFIO_IOMMU_MAP_DMA, &bad)));

    struct vfio_iommu_type1_dirty_bitmap start = { sizeof start,
                                                   VFIO_IOMMU_DIRTY_PAGES_FLAG_START };
    printf("dirty_start %d\n", err_of(ioctl(c, VFIO_IOMMU_DIRTY_PAGES, &start)));
    run_device(dev);
    uint64_t want = changed(buf, snap), got = 0;
    char gbuf[sizeof(struct vfio_iommu_type1_dirty_bitmap) +
              sizeof(struct vfio_iommu_type1_dirty_bitmap_get)];
    struct vfio_iommu_type1_dirty_bitmap *db = (void *)gbuf;
    struct vfio_iommu_type1_dirty_bitmap_get *range = (void *)db->data;
    db->argsz = sizeof gbuf;
    db->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
    range->iova = IOVA;
    range->size = LEN;
    range->bitmap.pgsize = 8192;
    range->bitmap.size = sizeof got;
    range->bitmap.data = (void *)&got;
    printf("bitmap_pgsize %d\n", err_of(ioctl(c, VFIO_IOMMU_DIRTY_PAGES, db)));
    range->bitmap.pgsize = 4096;
    range->size = 4096;
    printf("bitmap_cut %d\n", err_of(ioctl(c, VFIO_IOMMU_DIRTY_PAGES, db)));
    range->size = LEN;
    printf("bitmap %d\n", err_of(ioctl(c, VFIO_IOMMU_DIRTY_PAGES, db)));
    printf("dirty %016llx\nchanged %016llx\n", (unsigned long long)got, (unsigned long long)want);

    /* more DMA, then unmap with the dirty bitmap */
    run_device(dev);
    want = changed(buf, snap);
    got = 0;
    char ubuf[sizeof(struct vfio_iommu_type1_dma_unmap) + sizeof(struct vfio_bitmap)];
    struct vfio_iommu_type1_dma_unmap *un = (void *)ubuf;
    struct vfio_bitmap *ubm = (void *)un->data;
    un->argsz = sizeof ubuf;
    un->flags = 0;
    un->iova = IOVA;
    un->size = 4096;
    printf("unmap_split %d\n", err_of(ioctl(c, VFIO_IOMMU_UNMAP_DMA, un)));
    un->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
    un->size = LEN;
    ubm->pgsize = 4096;
    ubm->size = sizeof got;
    ubm->data = (void *)&got;
    printf("unmap_bitmap %d\n", err_of(ioctl(c, VFIO_IOMMU_UNMAP_DMA, un)));
    printf("unmapped %llu\n", (unsigned long long)un->size);
    printf("dirty2 %016llx\nchanged2 %016llx\n", (unsigned long long)got,
           (unsigned long long)want);
    fflush(stdout);
    return 0;
}

#include <time.h>

static int bench_mode(const char *cdev, unsigned long mib, int n) {
    int dev = open(cdev, O_RDWR), iommu = open("/dev/iommu", O_RDWR);
    if (dev < 0 || iommu < 0) die("open");
    struct vfio_device_bind_iommufd bind = { sizeof bind, 0, iommu, 0 };
    struct iommu_ioas_alloc ioas = { sizeof ioas, 0, 0 };
    if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) || ioctl(iommu, IOMMU_IOAS_ALLOC, &ioas))
        die("bind");
    struct iommu_hwpt_alloc hwpt = { .size = sizeof hwpt, .flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                                     .dev_id = bind.out_devid, .pt_id = ioas.out_ioas_id };
    if (ioctl(iommu, IOMMU_HWPT_ALLOC, &hwpt)) die("hwpt");
    struct vfio_device_attach_iommufd_pt at = { sizeof at, 0, hwpt.out_hwpt_id };
    if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at)) die("attach");
    unsigned long len = mib << 20;
    void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) die("mmap");
    struct iommu_ioas_map map = { sizeof map, IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                  IOMMU_IOAS_MAP_WRITEABLE, ioas.out_ioas_id, 0,
                                  (uintptr_t)buf, len, 1UL << 32 };
    if (ioctl(iommu, IOMMU_IOAS_MAP, &map)) die("map");
    struct iommu_hwpt_set_dirty_tracking sd = { sizeof sd, IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                                                hwpt.out_hwpt_id, 0 };
    if (ioctl(iommu, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd)) die("set_dirty");
    uint64_t *bitmap = calloc(1, len / 4096 / 8 + 8);
    struct iommu_hwpt_get_dirty_bitmap gd = { sizeof gd, hwpt.out_hwpt_id, 0, 0, 1UL << 32, len,
                                             4096, (uintptr_t)bitmap };
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++)
        if (ioctl(iommu, IOMMU_HWPT_GET_DIRTY_BITMAP, &gd)) die("get_dirty_bitmap");
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / n;
    printf("us_per_call %.0f\n", us);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "iommufd")) return iommufd_mode(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "type1")) return type1_mode(argv[2], argv[3]);
    if (argc == 5 && !strcmp(argv[1], "bench"))
        return bench_mode(argv[2], strtoul(argv[3], NULL, 0), atoi(argv[4]));
    fprintf(stderr, "usage: iommu_dirty iommufd CDEV | type1 GROUP NAME | bench CDEV MIB N\n");
    return 2;
}
