/* Drives a device's interrupts through the VFIO uAPI; run under `fakevfio run` by
 * tests/fakevfio/run/test_irq_ioctls.py.
 *
 * Uses the system <linux/vfio.h> for every interrupt struct, flag and ioctl number
 * (only the iommufd cdev binding, newer than the 6.1 headers, is defined here). It
 * fires interrupts by writing the device's `irqs` file ("raise INDEX VECTOR"), reads
 * its eventfds without blocking and prints "key value" lines.
 *
 *   irq_drive info CDEV               GET_IRQ_INFO of every index (and bad requests)
 *   irq_drive intx CDEV IRQS          trigger, automask, unmask by ioctl and by eventfd
 *   irq_drive msi CDEV IRQS           MSI-X and MSI vectors, de-assign, loopback
 *   irq_drive bad CDEV IRQS           every SET_IRQS rule: "name errno same" (same: the
 *                                     irqs file reads the same before and after)
 *   irq_drive bench CDEV IRQS N       microseconds per SET_IRQS loopback (ioctl to eventfd)
 *                                     and per "raise" write to eventfd, over N rounds
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef VFIO_DEVICE_BIND_IOMMUFD
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#endif
#define IOMMU_IOAS_ALLOC 0x3b81

static const char *irqs_path;
static int dev_fd = -1;

static int err_of(int rc) { return rc < 0 ? errno : 0; }

static int open_bound(const char *cdev) {
    int fd = open(cdev, O_RDWR);
    if (fd < 0) { perror(cdev); exit(2); }
    int iommufd = open("/dev/iommu", O_RDWR);
    if (iommufd < 0) { perror("/dev/iommu"); exit(2); }
    struct { uint32_t argsz, flags; int32_t iommufd; uint32_t devid; } bind = { 16, 0, iommufd, 0 };
    if (ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0) { perror("bind"); exit(2); }
    struct { uint32_t size, flags, id; } alloc = { 12, 0, 0 };
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc) < 0) { perror("ioas"); exit(2); }
    struct { uint32_t argsz, flags, pt; } attach = { 12, 0, alloc.id };
    if (ioctl(fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach) < 0) { perror("attach"); exit(2); }
    return fd;
}

/* One VFIO_DEVICE_SET_IRQS; data is count elements of the flags' data type. */
static int set_irqs(uint32_t flags, uint32_t index, uint32_t start, uint32_t count,
                    const void *data, size_t data_len) {
    size_t size = sizeof(struct vfio_irq_set) + data_len;
    struct vfio_irq_set *s = calloc(1, size);
    s->argsz = size;
    s->flags = flags;
    s->index = index;
    s->start = start;
    s->count = count;
    if (data_len) memcpy(s->data, data, data_len);
    int rc = err_of(ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, s));
    free(s);
    return rc;
}

static int set_fds(uint32_t action, uint32_t index, uint32_t start, uint32_t count,
                   const int32_t *fds) {
    return set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | action, index, start, count, fds,
                    count * sizeof(int32_t));
}

static int set_none(uint32_t action, uint32_t index, uint32_t start, uint32_t count) {
    return set_irqs(VFIO_IRQ_SET_DATA_NONE | action, index, start, count, NULL, 0);
}

static void irqs_write(const char *cmd) {
    int fd = open(irqs_path, O_WRONLY);
    if (fd < 0 || write(fd, cmd, strlen(cmd)) != (ssize_t)strlen(cmd)) {
        perror(cmd);
        exit(2);
    }
    close(fd);
}

static char *irqs_read(void) {
    static char buf[3][65536];
    static int which;
    char *out = buf[which++ % 3];
    int fd = open(irqs_path, O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, out, sizeof buf[0] - 1);
    if (n < 0) { perror(irqs_path); exit(2); }
    out[n] = 0;
    close(fd);
    return out;
}

static void fire(const char *index, int vector) {
    char cmd[64];
    snprintf(cmd, sizeof cmd, "raise %s %d\n", index, vector);
    irqs_write(cmd);
}

/* The eventfd's counter (0 if not signalled), reset to 0; waits up to ms. */
static uint64_t take(int efd, int ms) {
    struct pollfd p = { .fd = efd, .events = POLLIN };
    if (ms && poll(&p, 1, ms) <= 0) return 0;
    uint64_t v = 0;
    if (read(efd, &v, 8) != 8) return 0;
    return v;
}

static int new_efd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

static int cmd_info(void) {
    for (uint32_t i = 0; i <= VFIO_PCI_NUM_IRQS; i++) {
        struct vfio_irq_info info = { .argsz = sizeof info, .index = i, .flags = 0xff, .count = 77 };
        int rc = err_of(ioctl(dev_fd, VFIO_DEVICE_GET_IRQ_INFO, &info));
        printf("info%u %d flags%u %u count%u %u\n", i, rc, i, info.flags, i, info.count);
    }
    struct vfio_irq_info small = { .argsz = 15, .index = 0 };
    printf("info_argsz15 %d\n", err_of(ioctl(dev_fd, VFIO_DEVICE_GET_IRQ_INFO, &small)));
    /* a larger argsz is fine and only the 16 bytes are written */
    struct { struct vfio_irq_info info; uint32_t canary; } big = { { 20, 0, 2, 0 }, 0xabcdef };
    printf("info_argsz20 %d canary %x\n", err_of(ioctl(dev_fd, VFIO_DEVICE_GET_IRQ_INFO, &big)),
           big.canary);
    return 0;
}

static int cmd_intx(void) {
    int trig = new_efd(), res = new_efd();
    printf("enable %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &trig));
    fire("intx", 0);
    printf("first %llu\n", (unsigned long long)take(trig, 0));
    fire("intx", 0);  /* automasked: pending, not signalled */
    printf("while_masked %llu\n", (unsigned long long)take(trig, 0));
    printf("unmask %d\n", set_none(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1));
    printf("after_unmask_pending %llu\n", (unsigned long long)take(trig, 0));
    uint8_t one = 1;
    printf("unmask_bool %d\n", set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_UNMASK,
                                        VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &one, 1));
    printf("after_unmask_idle %llu\n", (unsigned long long)take(trig, 0));
    fire("intx", 0);
    printf("after_unmask_raise %llu\n", (unsigned long long)take(trig, 0));
    printf("mask %d\n", set_none(VFIO_IRQ_SET_ACTION_MASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1));
    /* the resample eventfd: a write to it unmasks (KVM's irqfd resampler path) */
    printf("resample %d\n", set_fds(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &res));
    printf("resample_again %d\n",
           set_fds(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &res));
    fire("intx", 0);
    printf("masked_raise %llu\n", (unsigned long long)take(trig, 0));
    uint64_t v = 1;
    if (write(res, &v, 8) != 8) perror("resample write");
    printf("after_resample %llu\n", (unsigned long long)take(trig, 2000));
    if (write(res, &v, 8) != 8) perror("resample write");
    for (int i = 0; i < 200 && !strstr(irqs_read(), "masked 0"); i++) usleep(10000);
    fire("intx", 0);
    printf("after_resample_idle_raise %llu\n", (unsigned long long)take(trig, 0));
    printf("state %s", strstr(irqs_read(), "intx count"));
    int32_t off = -1;
    printf("resample_off %d\n",
           set_fds(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &off));
    printf("loopback %d\n", set_none(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 1));
    printf("after_loopback %llu\n", (unsigned long long)take(trig, 0));
    printf("disable %d\n", set_none(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 0));
    fire("intx", 0);
    printf("after_disable %llu\n", (unsigned long long)take(trig, 0));
    printf("final %s", strstr(irqs_read(), "intx count"));
    return 0;
}

static int cmd_msi(void) {
    int e[4];
    for (int i = 0; i < 4; i++) e[i] = new_efd();
    int32_t fds[3] = { e[0], -1, e[2] };
    printf("msix_enable %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 3, fds));
    for (int v = 0; v < 4; v++) fire("msix", v);
    for (int i = 0; i < 4; i++) printf("msix_e%d %llu\n", i, (unsigned long long)take(e[i], 0));
    printf("msix_add1 %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 1, 1, &e[1]));
    printf("msix_add3 %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 3, 1, &e[3]));
    int32_t off = -1;
    printf("msix_off0 %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1, &off));
    for (int v = 0; v < 4; v++) fire("msix", v);
    for (int i = 0; i < 4; i++) printf("msix2_e%d %llu\n", i, (unsigned long long)take(e[i], 0));
    uint8_t bools[4] = { 1, 0, 1, 0 };
    printf("msix_loop %d\n", set_irqs(VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
                                      VFIO_PCI_MSIX_IRQ_INDEX, 0, 4, bools, 4));
    for (int i = 0; i < 4; i++) printf("msix3_e%d %llu\n", i, (unsigned long long)take(e[i], 0));
    printf("msi_while_msix %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, &e[0]));
    printf("intx_while_msix %d\n",
           set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &e[0]));
    printf("msix_state %s", strstr(irqs_read(), "msix count"));
    printf("msix_disable %d\n", set_none(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 0));
    fire("msix", 2);
    printf("msix_after_disable %llu\n", (unsigned long long)take(e[2], 0));
    printf("msi_enable %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, &e[1]));
    fire("msi", 0);
    printf("msi_e1 %llu\n", (unsigned long long)take(e[1], 0));
    printf("msi_disable %d\n", set_none(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0));
    printf("final %s", irqs_read());
    return 0;
}

static void bad(const char *name, int rc, const char *before) {
    printf("%s %d %d\n", name, rc, strcmp(before, irqs_read()) == 0);
}

static int cmd_bad(void) {
    int e = new_efd(), e2 = new_efd(), pipefd[2];
    if (pipe(pipefd) < 0) { perror("pipe"); return 2; }
    const uint32_t TRIG = VFIO_IRQ_SET_ACTION_TRIGGER, NONE = VFIO_IRQ_SET_DATA_NONE;
    const uint32_t EFD = VFIO_IRQ_SET_DATA_EVENTFD;
    printf("setup %d\n", set_fds(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &e));
    printf("setup_resample %d\n", set_fds(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &e2));
    char *b = irqs_read();

    struct vfio_irq_set hdr = { .argsz = sizeof hdr - 1, .flags = NONE | TRIG, .index = 0, .count = 1 };
    bad("argsz19", err_of(ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &hdr)), b);
    bad("index5", set_none(TRIG, 5, 0, 1), b);
    bad("err_not_pcie", set_none(TRIG, VFIO_PCI_ERR_IRQ_INDEX, 0, 1), b);
    bad("start_past", set_none(TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 4, 0), b);
    bad("count_past", set_none(TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 0, 5), b);
    bad("count_wraps", set_none(TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 1, 0xffffffffu), b);
    bad("intx_count2", set_none(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 2), b);
    bad("unknown_flag", set_none(TRIG | (1u << 6), VFIO_PCI_INTX_IRQ_INDEX, 0, 1), b);
    bad("two_data_types", set_irqs(NONE | VFIO_IRQ_SET_DATA_BOOL | TRIG, 0, 0, 1, "\1", 1), b);
    bad("no_data_type", set_irqs(TRIG, 0, 0, 1, NULL, 0), b);
    /* DATA_EVENTFD with count 2 but room for one fd */
    struct { struct vfio_irq_set s; int32_t fd; } shortarr = {
        { sizeof shortarr, EFD | TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 0, 2 }, e };
    bad("short_array", err_of(ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &shortarr)), b);
    bad("no_action", set_none(0, VFIO_PCI_INTX_IRQ_INDEX, 0, 1), b);
    bad("two_actions", set_none(VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1), b);
    bad("msi_mask", set_none(VFIO_IRQ_SET_ACTION_MASK, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1), b);
    bad("req_unmask", set_none(VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_REQ_IRQ_INDEX, 0, 1), b);
    bad("intx_mask_eventfd", set_fds(VFIO_IRQ_SET_ACTION_MASK, 0, 0, 1, &e), b);
    bad("msi_while_intx", set_fds(TRIG, VFIO_PCI_MSI_IRQ_INDEX, 0, 1, &e), b);
    bad("msix_while_intx", set_fds(TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1, &e), b);
    bad("msix_loopback_not_enabled", set_none(TRIG, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1), b);
    bad("resample_busy", set_fds(VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1, &e), b);
    int32_t nofd = 999;
    bad("bad_fd", set_fds(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &nofd), b);
    bad("not_eventfd", set_fds(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 1, &pipefd[0]), b);
    bad("req_none_unset", set_none(TRIG, VFIO_PCI_REQ_IRQ_INDEX, 0, 1), b);
    bad("req_eventfd_count0", set_fds(TRIG, VFIO_PCI_REQ_IRQ_INDEX, 0, 0, NULL), b);
    /* the fd array on an unmapped page: EFAULT, nothing set */
    char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(page + 4096, 4096);
    struct vfio_irq_set *edge = (struct vfio_irq_set *)(page + 4096 - sizeof *edge);
    *edge = (struct vfio_irq_set){ sizeof *edge + 4, EFD | TRIG, VFIO_PCI_REQ_IRQ_INDEX, 0, 1 };
    bad("data_efault", err_of(ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, edge)), b);
    bad("hdr_efault", err_of(ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, page + 4096)), b);
    /* a state-changing request still works afterwards */
    printf("disable %d\n", set_none(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 0));
    printf("disable_again %d\n", set_none(TRIG, VFIO_PCI_INTX_IRQ_INDEX, 0, 0));
    return 0;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmd_bench(int rounds) {
    int e = new_efd();
    if (set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1, &e)) return 2;
    int got = 0;
    double t0 = now_us();
    for (int i = 0; i < rounds; i++) {
        set_none(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1);
        got += take(e, 1000) == 1;
    }
    double t1 = now_us();
    int fd = open(irqs_path, O_WRONLY);
    for (int i = 0; i < rounds; i++) {
        if (write(fd, "raise msix 0\n", 13) != 13) return 2;
        got += take(e, 1000) == 1;
    }
    double t2 = now_us();
    close(fd);
    printf("delivered %d of %d\n", got, 2 * rounds);
    printf("loopback_us %.1f\n", (t1 - t0) / rounds);
    printf("raise_us %.1f\n", (t2 - t1) / rounds);
    return 0;
}

/* Enable MSI-X with two eventfds and exit without disabling it: closing the
 * device fd must release them (vfio_pci_core_disable). */
static int cmd_leave(void) {
    int32_t fds[2] = { new_efd(), new_efd() };
    printf("leave_enable %d\n", set_fds(VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 2, fds));
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3) { fprintf(stderr, "usage: irq_drive info|intx|msi|bad CDEV [IRQS]\n"); return 2; }
    dev_fd = open_bound(argv[2]);
    irqs_path = argc > 3 ? argv[3] : NULL;
    if (!strcmp(argv[1], "info")) return cmd_info();
    if (!irqs_path) { fprintf(stderr, "%s needs the irqs file\n", argv[1]); return 2; }
    if (!strcmp(argv[1], "intx")) return cmd_intx();
    if (!strcmp(argv[1], "msi")) return cmd_msi();
    if (!strcmp(argv[1], "bad")) return cmd_bad();
    if (!strcmp(argv[1], "leave")) return cmd_leave();
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc > 4 ? atoi(argv[4]) : 200);
    fprintf(stderr, "unknown command %s\n", argv[1]);
    return 2;
}
