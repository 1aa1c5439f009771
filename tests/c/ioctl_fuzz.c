/* A seeded random fuzzer of the VFIO and iommufd ioctls, run under `fakevfio run`.
 *
 *   ioctl_fuzz SEED COUNT GROUP DEVNAME CDEV [WATCHDOG_S]
 *
 * Fully reproducible from SEED (xorshift64*, no other source of randomness; the seed is
 * printed first). It opens the container, the group, /dev/iommu and the cdev, walks them
 * to a working set-up (bind, IOAS, attach; group -> container -> type1v2 -> device fd)
 * and then issues COUNT ioctls, each with a random fd of that pool, a random request
 * (mostly the ones that kind of fd answers, then any known VFIO/iommufd one, sometimes
 * any number the supervisor traps), and
 * a random argument: a struct with random argsz, flags and contents (object ids,
 * eventfds, states and pointers sprinkled in), NULL, an unmapped address, a read-only
 * page, a struct straddling the end of a page into a PROT_NONE page, or a plain integer.
 * Every 512 ioctls the set-up is walked again, so deeper states stay reachable; about one
 * iteration in 100 closes an fd of the pool and reopens it, or swaps it for a dup.
 *
 * A watchdog (alarm) guards each ioctl: one that does not return within WATCHDOG_S
 * seconds (default 5) prints "hang ..." and exits 3. At the end it prints one line per
 * (fd kind, request, result): "res KIND 0xREQ ERRNO COUNT" (ERRNO 0: success), then
 * "total N" and "elapsed_ms MS". The test compares every errno with the kernel's set.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define VIO(n) (0x3b00 + 100 + (n))
#define IOMMUFD(n) (0x3b80 + (n))
#define PAGE 4096

enum kind { K_CONTAINER, K_GROUP, K_IOMMU, K_CDEV, K_GDEV, K_DATA, K_COUNT };
static const char *const KIND_NAMES[K_COUNT] = {"container", "group", "iommu", "cdev", "gdev", "data"};
static int fds[K_COUNT] = {-1, -1, -1, -1, -1, -1};

static uint64_t rng_state;
static uint64_t rnd(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}
static uint64_t below(uint64_t n) { return rnd() % n; }
static int chance(int percent) { return (int)below(100) < percent; }

/* The scratch area: RW RW RW NONE RO, then an unmapped page. */
static uint8_t *area;
static uint8_t *rw_page(void) { return area; }
static uint8_t *none_page(void) { return area + 3 * PAGE; }
static uint8_t *ro_page(void) { return area + 4 * PAGE; }
static uint8_t *unmapped(void) { return area + 5 * PAGE; }
static int eventfds[2];

static volatile unsigned long current_request;
static volatile int current_kind;
static volatile long current_iteration;

static void on_alarm(int sig) {
    (void)sig;
    char msg[128];
    int n = snprintf(msg, sizeof msg, "hang iteration %ld kind %s request 0x%lx\n",
                     current_iteration, KIND_NAMES[current_kind], current_request);
    if (write(1, msg, (size_t)n) < 0) _exit(4);
    _exit(3);
}

static const unsigned long KNOWN[] = {
    VIO(0), VIO(1), VIO(2), VIO(3), VIO(4), VIO(5), VIO(6), VIO(7), VIO(8), VIO(9),
    VIO(10), VIO(11), VIO(12), VIO(13), VIO(14), VIO(15), VIO(16), VIO(17), VIO(18),
    VIO(19), VIO(20), VIO(21),
    IOMMUFD(0), IOMMUFD(1), IOMMUFD(2), IOMMUFD(3), IOMMUFD(4), IOMMUFD(5), IOMMUFD(6),
    IOMMUFD(7), IOMMUFD(8), IOMMUFD(9), IOMMUFD(10), IOMMUFD(11), IOMMUFD(12),
};
#define N_KNOWN (sizeof KNOWN / sizeof KNOWN[0])

/* The requests each kind of fd answers (the kernel's dispatchers), drawn more often. */
static const unsigned long OWN_CONTAINER[] = {VIO(0), VIO(1), VIO(2), VIO(12), VIO(13), VIO(14), VIO(17)};
static const unsigned long OWN_GROUP[] = {VIO(3), VIO(4), VIO(5), VIO(6)};
static const unsigned long OWN_IOMMU[] = {
    IOMMUFD(0), IOMMUFD(1), IOMMUFD(2), IOMMUFD(3), IOMMUFD(4), IOMMUFD(5), IOMMUFD(6),
    IOMMUFD(7), IOMMUFD(9), IOMMUFD(10), IOMMUFD(11), IOMMUFD(12)};
static const unsigned long OWN_DEVICE[] = {
    VIO(7), VIO(8), VIO(9), VIO(10), VIO(11), VIO(17), VIO(17), VIO(17), VIO(18), VIO(19), VIO(20)};
static const unsigned long OWN_DATA[] = {VIO(21)};
#define OWN(a) a, sizeof a / sizeof a[0]
static const struct { const unsigned long *reqs; size_t n; } OWN_REQUESTS[K_COUNT] = {
    {OWN(OWN_CONTAINER)}, {OWN(OWN_GROUP)}, {OWN(OWN_IOMMU)}, {OWN(OWN_DEVICE)},
    {OWN(OWN_DEVICE)}, {OWN(OWN_DATA)},
};

/* The histogram: kind x request low byte x errno (0..133). */
#define N_ERRNO 134
static unsigned counts[K_COUNT][256][N_ERRNO];

static uint64_t some_pointer(void) {
    switch (below(6)) {
    case 0: return 0;
    case 1: return (uint64_t)(uintptr_t)unmapped();
    case 2: return (uint64_t)(uintptr_t)ro_page();
    case 3: return (uint64_t)(uintptr_t)(none_page() - 8 * (1 + below(4)));
    case 4: return rnd();
    default: return (uint64_t)(uintptr_t)(rw_page() + PAGE + 8 * below(256));
    }
}

static uint32_t some_u32(void) {
    switch (below(8)) {
    case 0: return 0;
    case 1: return (uint32_t)below(16);          /* object ids, indexes, states */
    case 2: return (uint32_t)eventfds[below(2)];
    case 3: return (uint32_t)fds[below(K_COUNT)];
    case 4: return 0xffffffffu;
    case 5: return 1u << below(32);
    case 6: return PAGE * (uint32_t)(1 + below(4));
    default: return (uint32_t)rnd();
    }
}

static uint32_t some_argsz(void) {
    static const uint32_t sizes[] = {0, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 96, 4096};
    if (chance(10)) return (uint32_t)rnd();
    return sizes[below(sizeof sizes / sizeof sizes[0])];
}

static uint32_t some_flags(unsigned long req) {
    if (req == VIO(17)) { /* DEVICE_FEATURE: an index and GET/SET/PROBE bits */
        uint32_t f = (uint32_t)below(14);
        if (chance(50)) f |= 1u << 16;
        if (chance(40)) f |= 1u << 17;
        if (chance(20)) f |= 1u << 18;
        if (chance(5)) f |= 1u << (19 + below(13));
        return f;
    }
    if (chance(55)) return 0;
    if (chance(60)) return 1u << below(8);
    return (uint32_t)rnd();
}

/* A random struct in the RW pages; returns the ioctl's argument. */
static unsigned long make_arg(unsigned long req) {
    int how = (int)below(100);
    if (how < 4) return 0;
    if (how < 7) return (unsigned long)(uintptr_t)unmapped();
    if (how < 10) return (unsigned long)(uintptr_t)ro_page();
    if (how < 14) return (unsigned long)(uintptr_t)(none_page() - 4 * (1 + below(8)));
    if (how < 18) return (unsigned long)below(16); /* CHECK_EXTENSION, SET_IOMMU */
    if (how < 20) return (unsigned long)rnd();
    uint8_t *p = rw_page();
    for (int i = 0; i < 3 * PAGE; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, 8);
    }
    if (chance(30)) memset(p, 0, 256);
    uint32_t *w = (uint32_t *)p;
    w[0] = some_argsz();
    w[1] = some_flags(req);
    if (req == VIO(17) && chance(50)) { /* a well-formed feature header, a random payload */
        static const uint32_t features[] = {1, 2, 3, 6, 7, 8};
        static const uint32_t ops[] = {1u << 16, 1u << 17, 1u << 18, (1u << 18) | (1u << 16)};
        w[0] = chance(70) ? 16 : 8 + 8 * (uint32_t)below(4);
        w[1] = features[below(6)] | ops[below(4)];
    }
    for (int i = 2; i < 24; i++)
        if (chance(40)) w[i] = some_u32();
    for (int i = 1; i < 12; i++)
        if (chance(15)) {
            uint64_t ptr = some_pointer();
            memcpy(p + 8 * i, &ptr, 8);
        }
    if (req == VIO(6) && chance(70)) { /* GET_DEVICE_FD: a name, right or wrong */
        const char *names[] = {"dev", "", "x", "0000:00:00.0"};
        extern const char *devname;
        const char *n = chance(50) ? devname : names[below(4)];
        strcpy((char *)p, n);
    }
    if (req == VIO(4)) w[0] = chance(70) ? (uint32_t)fds[below(K_COUNT)] : some_u32();
    if (req == VIO(17) && chance(50)) w[2] = (uint32_t)below(10); /* a device state */
    return (unsigned long)(uintptr_t)p;
}

const char *devname;

static void keep_fd(enum kind k, int fd) {
    if (fd < 0) return;
    if (fds[k] >= 0) close(fds[k]);
    fds[k] = fd;
}

static void setup(void) {
    struct { uint32_t argsz, flags; int32_t iommufd; uint32_t devid; } bind = {16, 0, fds[K_IOMMU], 0};
    ioctl(fds[K_CDEV], VIO(18), &bind);
    struct { uint32_t size, flags, id; } alloc = {12, 0, 0};
    if (ioctl(fds[K_IOMMU], IOMMUFD(1), &alloc) == 0) {
        struct { uint32_t argsz, flags, pt; } att = {12, 0, alloc.id};
        ioctl(fds[K_CDEV], VIO(19), &att);
    }
    int c = fds[K_CONTAINER];
    ioctl(fds[K_GROUP], VIO(4), &c);
    ioctl(fds[K_CONTAINER], VIO(2), 3 /* VFIO_TYPE1v2_IOMMU */);
    if (fds[K_GDEV] < 0) keep_fd(K_GDEV, ioctl(fds[K_GROUP], VIO(6), devname));
    /* a state that opens a data_fd (or RUNNING), so the data_fd's ioctls are reached */
    static const uint32_t states[] = {6, 3, 4, 2};
    struct { uint32_t argsz, flags, state; int32_t fd; } mig = {16, 2 | (1u << 17), states[below(4)], -1};
    if (ioctl(fds[chance(50) ? K_CDEV : K_GDEV], VIO(17), &mig) == 0) keep_fd(K_DATA, mig.fd);
}

static int open_or_die(const char *path) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) { perror(path); exit(2); }
    return fd;
}

static char group_path[64];
static const char *cdev_path;

/* fd lifetimes: close one fd of the pool and open it again, or replace it by a dup (the
 * same open file description), so the supervisor's per-description state and its
 * clean-up of closed files are fuzzed too. */
static void churn(void) {
    int k = (int)below(K_COUNT);
    if (fds[k] < 0) return;
    if (chance(30)) {
        int d = dup(fds[k]);
        if (d >= 0) { close(fds[k]); fds[k] = d; }
        return;
    }
    close(fds[k]);
    fds[k] = -1;
    switch (k) {
    case K_CONTAINER: fds[k] = open_or_die("/dev/vfio/vfio"); break;
    case K_GROUP: fds[k] = open_or_die(group_path); break;
    case K_IOMMU: fds[k] = open_or_die("/dev/iommu"); break;
    case K_CDEV: fds[k] = open_or_die(cdev_path); break;
    default: break; /* the group device fd and the data_fd come back from setup() */
    }
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: ioctl_fuzz SEED COUNT GROUP DEVNAME CDEV [WATCHDOG_S]\n");
        return 2;
    }
    uint64_t seed = strtoull(argv[1], NULL, 0);
    long count = strtol(argv[2], NULL, 0);
    devname = argv[4];
    unsigned watchdog = argc > 6 ? (unsigned)atoi(argv[6]) : 5;
    printf("seed %llu\n", (unsigned long long)seed);
    fflush(stdout);
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;

    area = mmap(NULL, 6 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) { perror("mmap"); return 2; }
    memset(ro_page(), 0x5a, PAGE);
    mprotect(none_page(), PAGE, PROT_NONE);
    mprotect(ro_page(), PAGE, PROT_READ);
    munmap(unmapped(), PAGE);
    eventfds[0] = eventfd(0, EFD_CLOEXEC);
    eventfds[1] = eventfd(0, EFD_CLOEXEC);

    snprintf(group_path, sizeof group_path, "/dev/vfio/%s", argv[3]);
    cdev_path = argv[5];
    fds[K_CONTAINER] = open_or_die("/dev/vfio/vfio");
    fds[K_GROUP] = open_or_die(group_path);
    fds[K_IOMMU] = open_or_die("/dev/iommu");
    fds[K_CDEV] = open_or_die(cdev_path);
    setup();
    signal(SIGALRM, on_alarm);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        if (i % 512 == 511) setup();
        if (chance(1)) churn();
        static const int weights[K_COUNT] = {10, 10, 20, 25, 20, 15};
        int k;
        do {
            int w = (int)below(100);
            for (k = 0; k < K_COUNT - 1 && w >= weights[k]; k++) w -= weights[k];
        } while (fds[k] < 0);
        unsigned long req;
        if (chance(60)) req = OWN_REQUESTS[k].reqs[below(OWN_REQUESTS[k].n)];
        else if (chance(75)) req = KNOWN[below(N_KNOWN)];
        else req = 0x3b64 + below(0x100 - 0x64);
        unsigned long arg = make_arg(req);
        current_iteration = i;
        current_kind = k;
        current_request = req;
        alarm(watchdog);
        long rc = ioctl(fds[k], req, arg);
        int err = rc < 0 ? errno : 0;
        alarm(0);
        if (err >= N_ERRNO) err = N_ERRNO - 1;
        counts[k][req & 0xff][err]++;
        if (rc >= 0 && req == VIO(6) && k == K_GROUP) keep_fd(K_GDEV, (int)rc);
        if (rc == 0 && req == VIO(17) && arg == (unsigned long)(uintptr_t)rw_page()) {
            /* a SET of MIG_DEVICE_STATE that opened a data_fd: keep the newest */
            uint32_t *w = (uint32_t *)rw_page();
            int32_t data_fd = (int32_t)w[3];
            if ((w[1] & 0xffff) == 2 && (w[1] & (1u << 17)) && data_fd > 2 &&
                fcntl(data_fd, F_GETFD) >= 0 && data_fd != fds[K_DATA]) {
                int dup_ok = 1;
                for (int j = 0; j < K_COUNT; j++) dup_ok &= data_fd != fds[j];
                if (dup_ok) keep_fd(K_DATA, data_fd);
            }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (int k = 0; k < K_COUNT; k++)
        for (int r = 0; r < 256; r++)
            for (int e = 0; e < N_ERRNO; e++)
                if (counts[k][r][e])
                    printf("res %s 0x3b%02x %d %u\n", KIND_NAMES[k], r, e, counts[k][r][e]);
    printf("total %ld\n", count);
    printf("elapsed_ms %ld\n",
           (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
    return 0;
}
