/* ioctl and pread rates of one device under `fakevfio run`, next to the native floor.
 *
 *   ioctl_rate CDEV SECONDS
 *
 * Prints "name rate_per_second" lines:
 *   native        VFIO_GET_API_VERSION on a pipe: in the filter's VFIO range, so the
 *                 supervisor is notified, finds the fd is not on the mount and continues
 *                 it into the kernel (ENOTTY): the least an intercepted ioctl costs
 *   get_state     VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE
 *   set_state     SET MIG_DEVICE_STATE, alternating STOP and RUNNING
 *   config_pread  4-byte pread of the config region at its VFIO_DEVICE_GET_REGION_INFO offset
 * Self-contained: the uAPI numbers and structs are from include/uapi/linux/vfio.h and
 * iommufd.h (Linux 6.1), written out so it builds against any header.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define VIO(n) (0x3b00 + 100 + (n))
#define GET_API_VERSION VIO(0)
#define DEVICE_GET_REGION_INFO VIO(8)
#define DEVICE_FEATURE VIO(17)
#define BIND_IOMMUFD VIO(18)
#define ATTACH_PT VIO(19)
#define IOAS_ALLOC 0x3b81
#define F_GET (1u << 16)
#define F_SET (1u << 17)
#define MIG_DEVICE_STATE 2
#define CONFIG_REGION 7

struct feat { uint32_t argsz, flags; struct { uint32_t state; int32_t fd; } mig; };
struct rinfo { uint32_t argsz, flags, index, cap_offset; uint64_t size, offset; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "ioctl_rate: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Calls op() in batches until SECONDS have passed; prints the rate. */
#define RATE(name, seconds, ...)                                              \
    do {                                                                     \
        long n = 0;                                                          \
        double t0 = now(), t;                                                \
        do {                                                                 \
            for (int i = 0; i < 64; i++, n++) { __VA_ARGS__; }               \
            t = now();                                                       \
        } while (t - t0 < (seconds));                                        \
        printf("%s %.0f\n", name, (double)n / (t - t0));                     \
        fflush(stdout);                                                      \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: ioctl_rate CDEV SECONDS\n");
        return 2;
    }
    double seconds = atof(argv[2]);
    int pipefd[2];
    if (pipe(pipefd) < 0) die("pipe");
    RATE("native", seconds,
         if (ioctl(pipefd[0], GET_API_VERSION) != -1 || errno != ENOTTY) die("native ioctl"));

    int fd = open(argv[1], O_RDWR);
    if (fd < 0) die(argv[1]);
    int iommufd = open("/dev/iommu", O_RDWR);
    if (iommufd < 0) die("/dev/iommu");
    struct { uint32_t argsz, flags; int32_t iommufd; uint32_t devid; } bind = { 16, 0, iommufd, 0 };
    if (ioctl(fd, BIND_IOMMUFD, &bind) < 0) die("BIND_IOMMUFD");
    struct { uint32_t size, flags, id; } alloc = { 12, 0, 0 };
    if (ioctl(iommufd, IOAS_ALLOC, &alloc) < 0) die("IOAS_ALLOC");
    struct { uint32_t argsz, flags, pt; } attach = { 12, 0, alloc.id };
    if (ioctl(fd, ATTACH_PT, &attach) < 0) die("ATTACH_PT");

    struct feat get = { .argsz = sizeof get, .flags = F_GET | MIG_DEVICE_STATE };
    RATE("get_state", seconds, if (ioctl(fd, DEVICE_FEATURE, &get) < 0) die("GET state"));
    uint32_t states[2] = { 1 /* STOP */, 2 /* RUNNING */ };
    RATE("set_state", seconds, {
        struct feat set = { .argsz = sizeof set, .flags = F_SET | MIG_DEVICE_STATE };
        set.mig.state = states[n & 1];
        if (ioctl(fd, DEVICE_FEATURE, &set) < 0) die("SET state");
    });
    struct rinfo ri = { .argsz = sizeof ri, .index = CONFIG_REGION };
    if (ioctl(fd, DEVICE_GET_REGION_INFO, &ri) < 0) die("GET_REGION_INFO config");
    uint32_t word;
    RATE("config_pread", seconds,
         if (pread(fd, &word, 4, (off_t)ri.offset) != 4) die("config pread"));
    return 0;
}
