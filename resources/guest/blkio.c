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

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "zeroout") == 0)
        return range_ioctl(argv[2], BLKZEROOUT, "BLKZEROOUT", argv[3], argv[4]);
    if (argc >= 5 && strcmp(argv[1], "discard") == 0)
        return range_ioctl(argv[2], BLKDISCARD, "BLKDISCARD", argv[3], argv[4]);
    if (argc >= 2 && strcmp(argv[1], "bench") == 0)
        return bench(argc, argv);
    fprintf(stderr, "usage: blkio zeroout|discard DEV OFFSET LENGTH\n"
                    "       blkio bench DEV read|write seq|rand BLOCK SECONDS JOBS [SPAN]\n");
    return 2;
}
