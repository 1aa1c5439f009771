/* Drives VFIO devices through the kernel uAPI; run under `fakevfio run` by tests/test_run.py.
 *
 * Self-contained (defines the structs it needs, so it builds against any header) and
 * prints "key value" lines that the test compares with the fakevfio files.
 *
 *   vfio_drive save CDEV OUTFILE      bind, features, RUNNING->PRE_COPY->STOP_COPY, read to EOF
 *   vfio_drive bad CDEV               malformed requests: one "name errno" line each
 *   vfio_drive fsm CDEV               "cur new result fd" for every reachable cur and new 0..8
 *   vfio_drive group GROUP NAME       legacy container/group path, GET_DEVICE_FD
 *   vfio_drive threads CDEV           8 threads + a forked child issue GET MIG_DEVICE_STATE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define VIO(n) (0x3b00 + 100 + (n))
#define GET_API_VERSION VIO(0)
#define CHECK_EXTENSION VIO(1)
#define SET_IOMMU VIO(2)
#define GROUP_GET_STATUS VIO(3)
#define GROUP_SET_CONTAINER VIO(4)
#define GROUP_GET_DEVICE_FD VIO(6)
#define DEVICE_GET_INFO VIO(7)
#define DEVICE_GET_REGION_INFO VIO(8)
#define DEVICE_RESET VIO(11)
#define DEVICE_FEATURE VIO(17)
#define BIND_IOMMUFD VIO(18)
#define ATTACH_PT VIO(19)
#define PRECOPY_INFO VIO(21)
#define IOAS_ALLOC 0x3b81
#define F_GET (1u << 16)
#define F_SET (1u << 17)
#define F_PROBE (1u << 18)

struct feat { uint32_t argsz, flags; union { uint64_t u64; struct { uint32_t state; int32_t fd; } mig; } d; };
struct pinfo { uint32_t argsz, flags; uint64_t initial, dirty; };
struct dinfo { uint32_t argsz, flags, num_regions, num_irqs, cap_offset, pad; };
struct rinfo { uint32_t argsz, flags, index, cap_offset; uint64_t size, offset; };

static int dev_fd = -1;

static int err_of(int rc) { return rc < 0 ? errno : 0; }

static int open_bound(const char *cdev) {
    int fd = open(cdev, O_RDWR);
    if (fd < 0) { perror(cdev); exit(2); }
    struct dinfo di = { .argsz = sizeof di };
    printf("info_before_bind %d\n", err_of(ioctl(fd, DEVICE_GET_INFO, &di)));
    int iommufd = open("/dev/iommu", O_RDWR);
    if (iommufd < 0) { perror("/dev/iommu"); exit(2); }
    struct { uint32_t argsz, flags; int32_t iommufd; uint32_t devid; } bind = { 16, 0, iommufd, 0 };
    int rc = ioctl(fd, BIND_IOMMUFD, &bind);
    printf("bind %d\n", err_of(rc));
    printf("bind_again %d\n", err_of(ioctl(fd, BIND_IOMMUFD, &bind)));
    struct { uint32_t size, flags, id; } alloc = { 12, 0, 0 };
    printf("ioas_alloc %d\n", err_of(ioctl(iommufd, IOAS_ALLOC, &alloc)));
    struct { uint32_t argsz, flags, pt; } attach = { 12, 0, alloc.id };
    printf("attach %d\n", err_of(ioctl(fd, ATTACH_PT, &attach)));
    attach.pt = 0xffffffff;
    printf("attach_bad %d\n", err_of(ioctl(fd, ATTACH_PT, &attach)));
    return fd;
}

static int set_state(int fd, uint32_t state, int *data_fd) {
    struct feat f = { .argsz = 16, .flags = F_SET | 2 };
    f.d.mig.state = state;
    f.d.mig.fd = 12345;
    int rc = ioctl(fd, DEVICE_FEATURE, &f);
    *data_fd = f.d.mig.fd;
    return err_of(rc);
}

static uint32_t get_state(int fd) {
    struct feat f = { .argsz = 16, .flags = F_GET | 2 };
    if (ioctl(fd, DEVICE_FEATURE, &f) < 0) return 99;
    return f.d.mig.state;
}

static int precopy(int dfd, struct pinfo *p) {
    memset(p, 0, sizeof *p);
    p->argsz = sizeof *p;
    return err_of(ioctl(dfd, PRECOPY_INFO, p));
}

static int cmd_save(const char *cdev, const char *out) {
    int fd = open_bound(cdev);
    struct feat f = { .argsz = 16, .flags = F_GET | 1 };
    printf("get_migration %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    printf("migration_flags %llu\n", (unsigned long long)f.d.u64);
    struct feat p = { .argsz = 8, .flags = F_PROBE | F_GET | F_SET | 2 };
    printf("probe_state %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &p)));
    struct feat s = { .argsz = 16, .flags = F_GET | 9 };
    printf("data_size_rc %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &s)));
    printf("data_size %llu\n", (unsigned long long)s.d.u64);
    struct dinfo di = { .argsz = sizeof di };
    printf("get_info %d\n", err_of(ioctl(fd, DEVICE_GET_INFO, &di)));
    printf("info_flags %u num_regions %u num_irqs %u\n", di.flags, di.num_regions, di.num_irqs);
    struct rinfo ri = { .argsz = sizeof ri, .index = 7 };
    printf("region_info %d\n", err_of(ioctl(fd, DEVICE_GET_REGION_INFO, &ri)));
    printf("config_size %llu config_offset %llu\n", (unsigned long long)ri.size,
           (unsigned long long)ri.offset);
    uint32_t ids = 0;
    printf("config_pread %zd\n", pread(fd, &ids, 4, (off_t)ri.offset));
    printf("config_ids %u\n", ids);

    int dfd = -2;
    printf("set_pre_copy %d\n", set_state(fd, 6, &dfd));
    printf("data_fd_valid %d\n", dfd >= 0);
    printf("data_fd_cloexec %d\n", (fcntl(dfd, F_GETFD) & FD_CLOEXEC) != 0);
    struct pinfo pi;
    printf("precopy_info %d\n", precopy(dfd, &pi));
    printf("initial_bytes %llu dirty_bytes %llu\n", (unsigned long long)pi.initial,
           (unsigned long long)pi.dirty);
    FILE *o = fopen(out, "wb");
    static char buf[65536 + 7];
    long long pre = 0;
    for (;;) {
        ssize_t n = read(dfd, buf, 4096 + 3);
        if (n > 0) { fwrite(buf, 1, (size_t)n, o); pre += n; continue; }
        printf("precopy_end %d\n", n < 0 ? errno : 0);
        break;
    }
    printf("precopy_bytes %lld\n", pre);
    int dfd2 = -2;
    printf("set_stop_copy %d\n", set_state(fd, 3, &dfd2));
    printf("stop_copy_fd %d\n", dfd2);
    printf("precopy_info_in_sc %d\n", precopy(dfd, &pi));
    printf("set_sc_to_pc %d\n", set_state(fd, 6, &dfd2));
    long long total = pre;
    for (;;) {
        ssize_t n = read(dfd, buf, sizeof buf);
        if (n > 0) { fwrite(buf, 1, (size_t)n, o); total += n; continue; }
        printf("eof %d\n", n < 0 ? errno : 0);
        break;
    }
    fclose(o);
    printf("total_bytes %lld\n", total);
    printf("set_stop %d\n", set_state(fd, 1, &dfd2));
    printf("precopy_info_dead %d\n", precopy(dfd, &pi));
    ssize_t n = read(dfd, buf, 16);
    printf("read_dead %d\n", n < 0 ? errno : 0);
    printf("state_end %u\n", get_state(fd));
    return 0;
}

static int cmd_bad(const char *cdev) {
    int fd = open_bound(cdev);
    struct feat f = { .argsz = 7, .flags = F_GET | 1 };
    printf("short_argsz %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.argsz = 16; f.flags = F_GET | 1 | (1u << 20);
    printf("bad_flag_bits %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.flags = F_GET | F_SET | 2;
    printf("get_and_set %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.flags = F_GET | 77;
    printf("unknown_feature %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.argsz = 8; f.flags = F_PROBE | F_GET | 1;
    printf("probe_no_payload %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.argsz = 12; f.flags = F_GET | 1;
    printf("small_payload %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.argsz = 16; f.flags = F_SET | 1;
    printf("set_on_get_only %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.flags = 2;
    printf("neither_get_nor_set %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    f.flags = F_GET | 6;
    printf("dma_logging %d\n", err_of(ioctl(fd, DEVICE_FEATURE, &f)));
    void *unmapped = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(unmapped, 4096);
    printf("unmapped_feature %d\n", err_of(ioctl(fd, DEVICE_FEATURE, unmapped)));
    printf("null_info %d\n", err_of(ioctl(fd, DEVICE_GET_INFO, NULL)));
    void *ro = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct feat *rof = ro;
    rof->argsz = 16; rof->flags = F_GET | 2;
    mprotect(ro, 4096, PROT_READ);
    printf("readonly_get %d\n", err_of(ioctl(fd, DEVICE_FEATURE, ro)));
    rof = ro;
    printf("state_untouched %u\n", rof->d.mig.state);
    struct dinfo di = { .argsz = 15 };
    printf("info_short %d\n", err_of(ioctl(fd, DEVICE_GET_INFO, &di)));
    struct dinfo di20 = { .argsz = 20, .pad = 0xdeadbeef };
    int rc20 = err_of(ioctl(fd, DEVICE_GET_INFO, &di20));
    printf("info_20 %d pad %x\n", rc20, di20.pad);
    struct rinfo ri = { .argsz = sizeof ri, .index = 9 };
    printf("region_bad_index %d\n", err_of(ioctl(fd, DEVICE_GET_REGION_INFO, &ri)));
    ri.argsz = 31; ri.index = 7;
    printf("region_short %d\n", err_of(ioctl(fd, DEVICE_GET_REGION_INFO, &ri)));
    printf("unknown_ioctl %d\n", err_of(ioctl(fd, VIO(30), 0)));
    printf("precopy_on_device %d\n", err_of(ioctl(fd, PRECOPY_INFO, 0)));
    printf("bad_fd %d\n", err_of(ioctl(999, DEVICE_FEATURE, &f)));
    int pipefd[2];
    pipe(pipefd);
    printf("pipe_fd %d\n", err_of(ioctl(pipefd[0], DEVICE_FEATURE, &f)));
    printf("state_request_8 %d\n", set_state(fd, 8, &(int){0}));
    printf("state_request_error %d\n", set_state(fd, 0, &(int){0}));
    int dfd = -2;
    printf("to_stop_copy %d\n", set_state(fd, 3, &dfd));
    struct pinfo pi = { .argsz = 23 };
    printf("precopy_short %d\n", err_of(ioctl(dfd, PRECOPY_INFO, &pi)));
    printf("precopy_in_sc %d\n", precopy(dfd, &pi));
    printf("data_fd_other_ioctl %d\n", err_of(ioctl(dfd, DEVICE_GET_INFO, &di)));
    printf("reset %d\n", err_of(ioctl(fd, DEVICE_RESET, 0)));
    printf("state_after_reset %u\n", get_state(fd));
    printf("survived 1\n");
    return 0;
}

static int cmd_fsm(const char *cdev) {
    int fd = open_bound(cdev);
    for (uint32_t cur = 1; cur <= 7; cur++) {
        for (uint32_t nw = 0; nw <= 8; nw++) {
            int d = -1;
            ioctl(fd, DEVICE_RESET, 0);
            if (cur != 2) {
                if (set_state(fd, cur, &d) != 0) { printf("unreachable %u\n", cur); break; }
                if (d >= 0) close(d);
            }
            int e = set_state(fd, nw, &d);
            printf("cell %u %u %d %s %u\n", cur, nw, e, d >= 0 ? "NEW" : "-1", get_state(fd));
            if (d >= 0) close(d);
        }
    }
    return 0;
}

static int cmd_group(const char *group, const char *name) {
    int c = open("/dev/vfio/vfio", O_RDWR);
    printf("api %d\n", ioctl(c, GET_API_VERSION));
    printf("ext_type1v2 %d\n", ioctl(c, CHECK_EXTENSION, 3));
    char path[64];
    snprintf(path, sizeof path, "/dev/vfio/%s", group);
    int g = open(path, O_RDWR);
    struct { uint32_t argsz, flags; } st = { 8, 0 };
    int rc = err_of(ioctl(g, GROUP_GET_STATUS, &st));
    printf("status %d flags %u\n", rc, st.flags);
    printf("get_fd_early %d\n", err_of(ioctl(g, GROUP_GET_DEVICE_FD, name)));
    printf("set_iommu_early %d\n", err_of(ioctl(c, SET_IOMMU, 3)));
    printf("set_container %d\n", err_of(ioctl(g, GROUP_SET_CONTAINER, &c)));
    printf("set_container_again %d\n", err_of(ioctl(g, GROUP_SET_CONTAINER, &c)));
    st.flags = 0;
    rc = err_of(ioctl(g, GROUP_GET_STATUS, &st));
    printf("status2 %d flags %u\n", rc, st.flags);
    printf("set_iommu %d\n", err_of(ioctl(c, SET_IOMMU, 3)));
    printf("wrong_name %d\n", err_of(ioctl(g, GROUP_GET_DEVICE_FD, "nonexistent")));
    int d = ioctl(g, GROUP_GET_DEVICE_FD, name);
    printf("device_fd_valid %d\n", d >= 0);
    printf("device_fd_cloexec %d\n", (fcntl(d, F_GETFD) & FD_CLOEXEC) != 0);
    struct feat f = { .argsz = 16, .flags = F_GET | 1 };
    rc = err_of(ioctl(d, DEVICE_FEATURE, &f));
    printf("get_migration %d flags %llu\n", rc, (unsigned long long)f.d.u64);
    printf("state %u\n", get_state(d));
    struct { uint32_t argsz, flags; int32_t iommufd; uint32_t devid; } bind = { 16, 0, 0, 0 };
    bind.iommufd = open("/dev/iommu", O_RDWR);
    printf("bind_group_fd %d\n", err_of(ioctl(d, BIND_IOMMUFD, &bind)));
    int d2 = dup(d);
    printf("dup_state %u\n", get_state(d2));
    return 0;
}

static void *thread_main(void *arg) {
    (void)arg;
    for (int i = 0; i < 20; i++)
        if (get_state(dev_fd) != 2) return (void *)1;
    return NULL;
}

static int cmd_threads(const char *cdev) {
    dev_fd = open_bound(cdev);
    pthread_t t[8];
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, thread_main, NULL);
    int bad = 0;
    for (int i = 0; i < 8; i++) { void *r; pthread_join(t[i], &r); bad += r != NULL; }
    printf("thread_failures %d\n", bad);
    pid_t pid = fork();
    if (pid == 0) _exit(get_state(dev_fd) == 2 ? 0 : 1);
    int status = 0;
    waitpid(pid, &status, 0);
    printf("fork_child_ok %d\n", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && !strcmp(argv[1], "save")) return cmd_save(argv[2], argv[3]);
    if (argc >= 3 && !strcmp(argv[1], "bad")) return cmd_bad(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "fsm")) return cmd_fsm(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "group")) return cmd_group(argv[2], argv[3]);
    if (argc >= 3 && !strcmp(argv[1], "threads")) return cmd_threads(argv[2]);
    fprintf(stderr, "usage: see the comment at the top\n");
    return 2;
}
