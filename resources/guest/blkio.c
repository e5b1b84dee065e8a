/*
 * blkio: block-device helper of the cryptvm test guest (static; built by build.sh into
 * the guest's /bin/blkio). Busybox has no BLKZEROOUT and no timed random I/O.
 *
 *   blkio zeroout DEV OFFSET LENGTH     BLKZEROOUT (the kernel sends WRITE_ZEROES
 *                                       when the device's write_zeroes_max_bytes > 0)
 *   blkio discard DEV OFFSET LENGTH     BLKDISCARD
 *   blkio bench DEV read|write seq|rand BLOCK SECONDS JOBS [SPAN]
 *       O_DIRECT I/O of BLOCK bytes for SECONDS (CLOCK_MONOTONIC) from JOBS threads,
 *       each doing synchronous requests (queue depth JOBS in all). seq: each job walks
 *       its own slice of SPAN (default: the device) from its start, wrapping; rand:
 *       BLOCK-aligned offsets from a fixed-seed xorshift over SPAN. Writes write a
 *       non-zero pseudo-random buffer. Prints one line:
 *       BLKIO op=OP pattern=P bs=N jobs=J ios=N bytes=N secs=S mbps=MB/S iops=N errors=N
 *   blkio writers DEV JOBS REGION BLOCK PASSES
 *       Concurrent writers with a read-back check. JOBS threads (at most 64); thread w
 *       owns bytes [w*REGION, (w+1)*REGION) of DEV and writes it PASSES times (at most
 *       256) with O_DIRECT requests of BLOCK bytes (pass p walks its blocks forwards when
 *       p is even, backwards when odd), block b of pass p holding pattern(w, p, b)
 *       (below). The threads issue their requests in lockstep (a barrier before each),
 *       so that every round has JOBS requests in flight at once. Then one fdatasync (a
 *       FLUSH to the device), then the JOBS threads read their regions back (O_DIRECT,
 *       BLOCK at a time, concurrently) and compare every byte with the last pass's
 *       pattern. Prints one line:
 *       BLKIO-WRITERS jobs=J region=N bs=N passes=P writes=N write_errors=N flush=0|ERRNO
 *         reads=N read_errors=N checked=BYTES bad=BYTES first_bad=OFFSET|none
 *         write_secs=S read_secs=S
 *   blkio check DEV JOBS REGION BLOCK PASSES
 *       The read-back of `writers` alone (what DEV holds after `writers` with the same
 *       arguments); the same line, with writes=0.
 *       pattern(w, p, b): the little-endian 64-bit word i of the block is
 *       splitmix64(w << 56 ^ p << 48 ^ b << 32 ^ i ^ 0x6a09e667f3bcc908), splitmix64
 *       being Vigna's finaliser with its increment (tests/e2e/concurrency.rs has the
 *       same function and checks this program against it).
 *
 *   blkio outb PORT VALUE
 *       Writes the byte VALUE to I/O port PORT (ioperm, outb): what /dev/port would do
 *       on a kernel that has it (the guest's has not), e.g. to an isa-debug-exit port.
 *
 * Sizes accept k, m, g suffixes (powers of 1024). Exit status 0 on success, 1 on error
 * (with a message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static uint64_t parse_size(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    case '\0': break;
    default:
        fprintf(stderr, "blkio: bad size '%s'\n", s);
        exit(1);
    }
    return v;
}

static int range_ioctl(const char *dev, unsigned long req, const char *name,
                       const char *off, const char *len)
{
    uint64_t range[2] = { parse_size(off), parse_size(len) };
    int fd = open(dev, O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "blkio: %s: %s\n", dev, strerror(errno));
        return 1;
    }
    if (ioctl(fd, req, range) != 0) {
        fprintf(stderr, "blkio: %s %s: %s\n", name, dev, strerror(errno));
        close(fd);
        return 1;
    }
    close(fd);
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct job {
    int fd;
    int write;
    int rand;
    uint64_t bs, span, start, len;
    double deadline;
    uint64_t ios, errors;
    uint64_t seed;
};

static void *run_job(void *arg)
{
    struct job *j = arg;
    void *buf;
    if (posix_memalign(&buf, 4096, j->bs) != 0) {
        j->errors++;
        return NULL;
    }
    uint64_t x = j->seed | 1;
    for (uint64_t i = 0; i < j->bs / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ((uint64_t *)buf)[i] = x | 1;
    }
    uint64_t blocks = j->span / j->bs, pos = 0;
    while (now() < j->deadline) {
        /* 16 requests between clock reads. */
        for (int k = 0; k < 16; k++) {
            uint64_t off;
            if (j->rand) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                off = (x % blocks) * j->bs;
            } else {
                off = j->start + pos;
                pos += j->bs;
                if (pos + j->bs > j->len)
                    pos = 0;
            }
            ssize_t n = j->write ? pwrite(j->fd, buf, j->bs, off)
                                 : pread(j->fd, buf, j->bs, off);
            if (n != (ssize_t)j->bs)
                j->errors++;
            j->ios++;
        }
    }
    free(buf);
    return NULL;
}

static int bench(int argc, char **argv)
{
    if (argc < 8) {
        fprintf(stderr, "blkio bench DEV read|write seq|rand BLOCK SECONDS JOBS [SPAN]\n");
        return 1;
    }
    const char *dev = argv[2];
    int write = strcmp(argv[3], "write") == 0;
    int rand = strcmp(argv[4], "rand") == 0;
    uint64_t bs = parse_size(argv[5]);
    double secs = atof(argv[6]);
    int jobs = atoi(argv[7]);
    if (jobs < 1 || jobs > 64 || bs == 0 || bs % 512) {
        fprintf(stderr, "blkio: bad jobs or block size\n");
        return 1;
    }
    int fd = open(dev, (write ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "blkio: %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        size = lseek(fd, 0, SEEK_END);
    uint64_t span = argc > 8 ? parse_size(argv[8]) : size;
    if (span > size)
        span = size;
    span -= span % bs;
    if (span < bs * jobs) {
        fprintf(stderr, "blkio: span too small\n");
        return 1;
    }
    struct job js[64];
    pthread_t th[64];
    double t0 = now();
    for (int i = 0; i < jobs; i++) {
        uint64_t slice = (span / jobs) - (span / jobs) % bs;
        js[i] = (struct job){ .fd = fd, .write = write, .rand = rand, .bs = bs,
                              .span = span, .start = slice * i, .len = slice,
                              .deadline = t0 + secs, .seed = 0x9e3779b97f4a7c15ULL * (i + 1) };
        pthread_create(&th[i], NULL, run_job, &js[i]);
    }
    uint64_t ios = 0, errors = 0;
    for (int i = 0; i < jobs; i++) {
        pthread_join(th[i], NULL);
        ios += js[i].ios;
        errors += js[i].errors;
    }
    if (write && fdatasync(fd) != 0)
        errors++;
    double t = now() - t0;
    close(fd);
    double bytes = (double)ios * bs;
    printf("BLKIO op=%s pattern=%s bs=%llu jobs=%d ios=%llu bytes=%.0f secs=%.3f "
           "mbps=%.1f iops=%.0f errors=%llu\n",
           write ? "write" : "read", rand ? "rand" : "seq", (unsigned long long)bs, jobs,
           (unsigned long long)ios, bytes, t, bytes / t / 1e6, ios / t,
           (unsigned long long)errors);
    return errors ? 1 : 0;
}

/* One word of pattern(w, p, b) (see the top of the file). */
static uint64_t pattern_word(uint64_t w, uint64_t p, uint64_t b, uint64_t i)
{
    uint64_t z = (w << 56 ^ p << 48 ^ b << 32 ^ i ^ 0x6a09e667f3bcc908ULL) + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill_pattern(unsigned char *buf, uint64_t len, uint64_t w, uint64_t p, uint64_t b)
{
    for (uint64_t i = 0; i < len / 8; i++) {
        uint64_t v = pattern_word(w, p, b, i);
        for (int k = 0; k < 8; k++)
            buf[i * 8 + k] = (unsigned char)(v >> (8 * k));
    }
}

struct writer {
    int fd;
    pthread_barrier_t *start, *round;
    uint64_t w, region, bs, passes;
    /* Results. */
    uint64_t writes, write_errors, reads, read_errors, checked, bad, first_bad;
    int first_errno;
};

static void note_error(struct writer *j, const char *op, uint64_t off, ssize_t n)
{
    if (j->first_errno == 0) {
        j->first_errno = n < 0 ? errno : EIO;
        fprintf(stderr, "blkio: writer %llu: %s at %llu: %s\n", (unsigned long long)j->w, op,
                (unsigned long long)off, n < 0 ? strerror(errno) : "short transfer");
    }
}

static void *write_region(void *arg)
{
    struct writer *j = arg;
    uint64_t blocks = j->region / j->bs;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, j->bs) != 0) {
        j->write_errors++;
        return NULL;
    }
    pthread_barrier_wait(j->start);
    for (uint64_t p = 0; p < j->passes; p++) {
        for (uint64_t k = 0; k < blocks; k++) {
            uint64_t b = p % 2 == 0 ? k : blocks - 1 - k;
            uint64_t off = j->w * j->region + b * j->bs;
            fill_pattern(buf, j->bs, j->w, p, b);
            pthread_barrier_wait(j->round);
            ssize_t n = pwrite(j->fd, buf, j->bs, off);
            j->writes++;
            if (n != (ssize_t)j->bs) {
                j->write_errors++;
                note_error(j, "write", off, n);
            }
        }
    }
    free(buf);
    return NULL;
}

static void *check_region(void *arg)
{
    struct writer *j = arg;
    uint64_t blocks = j->region / j->bs, last = j->passes - 1;
    unsigned char *buf, *want;
    if (posix_memalign((void **)&buf, 4096, j->bs) != 0 ||
        posix_memalign((void **)&want, 4096, j->bs) != 0) {
        j->read_errors++;
        return NULL;
    }
    pthread_barrier_wait(j->start);
    for (uint64_t b = 0; b < blocks; b++) {
        uint64_t off = j->w * j->region + b * j->bs;
        memset(buf, 0, j->bs);
        ssize_t n = pread(j->fd, buf, j->bs, off);
        j->reads++;
        if (n != (ssize_t)j->bs) {
            j->read_errors++;
            note_error(j, "read", off, n);
            continue;
        }
        fill_pattern(want, j->bs, j->w, last, b);
        j->checked += j->bs;
        if (memcmp(buf, want, j->bs) == 0)
            continue;
        for (uint64_t i = 0; i < j->bs; i++) {
            if (buf[i] != want[i]) {
                if (j->bad == 0)
                    j->first_bad = off + i;
                j->bad++;
            }
        }
    }
    free(buf);
    free(want);
    return NULL;
}

/* Runs fn on every writer in its own thread, all started together; returns seconds. */
static double run_writers(struct writer *js, int jobs, void *(*fn)(void *))
{
    pthread_t th[64];
    pthread_barrier_t start, round;
    pthread_barrier_init(&start, NULL, jobs + 1);
    pthread_barrier_init(&round, NULL, jobs);
    for (int i = 0; i < jobs; i++) {
        js[i].start = &start;
        js[i].round = &round;
        pthread_create(&th[i], NULL, fn, &js[i]);
    }
    pthread_barrier_wait(&start);
    double t0 = now();
    for (int i = 0; i < jobs; i++)
        pthread_join(th[i], NULL);
    double t = now() - t0;
    pthread_barrier_destroy(&start);
    pthread_barrier_destroy(&round);
    return t;
}

static int writers(int argc, char **argv, int write)
{
    if (argc < 7) {
        fprintf(stderr, "blkio writers|check DEV JOBS REGION BLOCK PASSES\n");
        return 1;
    }
    const char *dev = argv[2];
    int jobs = atoi(argv[3]);
    uint64_t region = parse_size(argv[4]), bs = parse_size(argv[5]);
    uint64_t passes = parse_size(argv[6]);
    if (jobs < 1 || jobs > 64 || bs == 0 || bs % 4096 || region == 0 || region % bs ||
        region / bs > 65536 || passes < 1 || passes > 256) {
        fprintf(stderr, "blkio: bad jobs, region, block size or passes\n");
        return 1;
    }
    int fd = open(dev, (write ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "blkio: %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0)
        size = lseek(fd, 0, SEEK_END);
    if (region * jobs > size) {
        fprintf(stderr, "blkio: %d regions of %llu bytes do not fit in %s (%llu bytes)\n",
                jobs, (unsigned long long)region, dev, (unsigned long long)size);
        close(fd);
        return 1;
    }
    struct writer js[64];
    for (int i = 0; i < jobs; i++)
        js[i] = (struct writer){ .fd = fd, .w = i, .region = region, .bs = bs,
                                 .passes = passes };
    double wt = 0;
    int flush = 0;
    if (write) {
        wt = run_writers(js, jobs, write_region);
        flush = fdatasync(fd) == 0 ? 0 : errno;
        if (flush)
            fprintf(stderr, "blkio: fdatasync %s: %s\n", dev, strerror(flush));
    }
    double rt = run_writers(js, jobs, check_region);
    close(fd);
    uint64_t writes = 0, werr = 0, reads = 0, rerr = 0, checked = 0, bad = 0;
    uint64_t first_bad = UINT64_MAX;
    for (int i = 0; i < jobs; i++) {
        writes += js[i].writes;
        werr += js[i].write_errors;
        reads += js[i].reads;
        rerr += js[i].read_errors;
        checked += js[i].checked;
        bad += js[i].bad;
        if (js[i].bad && js[i].first_bad < first_bad)
            first_bad = js[i].first_bad;
    }
    char fb[32] = "none";
    if (bad)
        snprintf(fb, sizeof fb, "%llu", (unsigned long long)first_bad);
    printf("BLKIO-WRITERS jobs=%d region=%llu bs=%llu passes=%llu writes=%llu write_errors=%llu "
           "flush=%d reads=%llu read_errors=%llu checked=%llu bad=%llu first_bad=%s "
           "write_secs=%.3f read_secs=%.3f\n",
           jobs, (unsigned long long)region, (unsigned long long)bs,
           (unsigned long long)passes, (unsigned long long)writes, (unsigned long long)werr,
           flush, (unsigned long long)reads, (unsigned long long)rerr,
           (unsigned long long)checked, (unsigned long long)bad, fb, wt, rt);
    fflush(stdout);
    return werr || rerr || flush || bad || checked != region * jobs ? 1 : 0;
}

static int port_out(const char *port_arg, const char *value_arg)
{
    char *end;
    unsigned long port = strtoul(port_arg, &end, 0);
    if (*end || port > 0xffff) {
        fprintf(stderr, "blkio outb: bad port '%s'\n", port_arg);
        return 1;
    }
    unsigned long value = strtoul(value_arg, &end, 0);
    if (*end || value > 0xff) {
        fprintf(stderr, "blkio outb: bad byte '%s'\n", value_arg);
        return 1;
    }
    if (ioperm(port, 1, 1) != 0) {
        fprintf(stderr, "blkio outb: ioperm(%#lx): %s\n", port, strerror(errno));
        return 1;
    }
    outb((unsigned char)value, (unsigned short)port);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "outb") == 0)
        return port_out(argv[2], argv[3]);
    if (argc >= 5 && strcmp(argv[1], "zeroout") == 0)
        return range_ioctl(argv[2], BLKZEROOUT, "BLKZEROOUT", argv[3], argv[4]);
    if (argc >= 5 && strcmp(argv[1], "discard") == 0)
        return range_ioctl(argv[2], BLKDISCARD, "BLKDISCARD", argv[3], argv[4]);
    if (argc >= 2 && strcmp(argv[1], "bench") == 0)
        return bench(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "writers") == 0)
        return writers(argc, argv, 1);
    if (argc >= 2 && strcmp(argv[1], "check") == 0)
        return writers(argc, argv, 0);
    fprintf(stderr, "usage: blkio zeroout|discard DEV OFFSET LENGTH\n"
                    "       blkio bench DEV read|write seq|rand BLOCK SECONDS JOBS [SPAN]\n"
                    "       blkio writers|check DEV JOBS REGION BLOCK PASSES\n"
                    "       blkio outb PORT VALUE\n");
    return 2;
}
