/* A PRECOPY_INFO(v2) consumer built against the real <linux/vfio.h> (Linux >= 7.1).
 *
 * Run under `fakevfio run` by tests/fakevfio/run/test_precopy_consumer.py:
 *
 *   abi_precopy_consumer CDEV DEVDIR
 *
 * binds CDEV to /dev/iommu, moves the device to PRE_COPY, asks VFIO_MIG_GET_PRECOPY_INFO
 * once before the opt-in (with flags 0x1234, which every kernel echoes back), opts in
 * with VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (probe, GET, SET), then alternates
 * PRECOPY_INFO (flags 0xa5a50000 in: after the opt-in they are output only) and one
 * read() of the data_fd until the temporary end of stream, reading DEVDIR's
 * migration/precopy_info file right after each ioctl. Prints "key value" lines:
 *
 *   v1 FLAGS INITIAL DIRTY FILE_INITIAL FILE_DIRTY
 *   probe ERRNO  get ERRNO  set ERRNO
 *   q FLAGS INITIAL DIRTY FILE_INITIAL FILE_DIRTY     (one per query)
 *   end ERRNO  queries N  bytes N
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>

struct feature_state {
    struct vfio_device_feature hdr;
    struct vfio_device_feature_mig_state mig;
};

static int err_of(int rc) { return rc < 0 ? errno : 0; }

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int open_bound(const char *cdev) {
    int fd = open(cdev, O_RDWR);
    int iommufd = open("/dev/iommu", O_RDWR);
    if (fd < 0 || iommufd < 0) die("open");
    struct vfio_device_bind_iommufd bind = { .argsz = 16, .iommufd = iommufd };
    if (ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, &bind)) die("VFIO_DEVICE_BIND_IOMMUFD");
    struct iommu_ioas_alloc alloc = { .size = sizeof alloc };
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc)) die("IOMMU_IOAS_ALLOC");
    struct vfio_device_attach_iommufd_pt attach = { .argsz = 12, .pt_id = alloc.out_ioas_id };
    if (ioctl(fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach)) die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
    return fd;
}

static int feature(int fd, uint32_t flags) {
    struct vfio_device_feature f = { .argsz = sizeof f, .flags = flags };
    return err_of(ioctl(fd, VFIO_DEVICE_FEATURE, &f));
}

static int to_pre_copy(int fd) {
    struct feature_state f = {
        .hdr = { .argsz = sizeof f,
                 .flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE },
        .mig = { .device_state = VFIO_DEVICE_STATE_PRE_COPY, .data_fd = -1 },
    };
    if (ioctl(fd, VFIO_DEVICE_FEATURE, &f)) die("SET PRE_COPY");
    return f.mig.data_fd;
}

static void file_info(const char *devdir, unsigned long long *initial, unsigned long long *dirty) {
    char path[4096], text[256] = { 0 };
    snprintf(path, sizeof path, "%s/migration/precopy_info", devdir);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(path);
    if (read(fd, text, sizeof text - 1) < 0) die(path);
    close(fd);
    if (sscanf(text, "initial_bytes %llu dirty_bytes %llu", initial, dirty) != 2) {
        fprintf(stderr, "%s: %s\n", path, text);
        exit(2);
    }
}

static void query(int dfd, const char *devdir, const char *key, uint32_t flags_in) {
    struct vfio_precopy_info info = { .argsz = sizeof info, .flags = flags_in };
    if (ioctl(dfd, VFIO_MIG_GET_PRECOPY_INFO, &info)) die("VFIO_MIG_GET_PRECOPY_INFO");
    unsigned long long fi, fd;
    file_info(devdir, &fi, &fd);
    printf("%s %u %llu %llu %llu %llu\n", key, info.flags, (unsigned long long)info.initial_bytes,
           (unsigned long long)info.dirty_bytes, fi, fd);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 3) {
        fprintf(stderr, "usage: abi_precopy_consumer CDEV DEVDIR\n");
        return 2;
    }
    int fd = open_bound(argv[1]);
    int dfd = to_pre_copy(fd);
    query(dfd, argv[2], "v1", 0x1234);
    uint32_t v2 = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2;
    printf("probe %d\n", feature(fd, VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | v2));
    printf("get %d\n", feature(fd, VFIO_DEVICE_FEATURE_GET | v2));
    printf("set %d\n", feature(fd, VFIO_DEVICE_FEATURE_SET | v2));
    static char buf[8192];
    long long total = 0;
    int queries = 0, end = 0;
    for (;;) {
        query(dfd, argv[2], "q", 0xa5a50000u);
        queries++;
        ssize_t n = read(dfd, buf, sizeof buf);
        if (n > 0) {
            total += n;
            continue;
        }
        end = n < 0 ? errno : 0;
        break;
    }
    printf("end %d\nqueries %d\nbytes %lld\n", end, queries, total);
    return 0;
}
