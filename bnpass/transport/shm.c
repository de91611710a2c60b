/* bnpass same-host all_reduce(sum) through one shared-memory segment per process group.
 *
 * Built at first use by bnpass/transport/native.py (cc -O2 -shared, no torch headers) and called
 * through ctypes. Linux only (futex, /proc).
 *
 * Segment: a header, then one control line per rank, then per rank two data buffers of `capacity`
 * bytes each:
 *
 *     [header][ctl 0][ctl 1]...[ctl W-1][rank 0: buf 0, buf 1][rank 1: buf 0, buf 1]...
 *
 * Protocol. Every rank of the group issues the same sequence of all_reduces (bnpass's agreement),
 * so each keeps a private round counter s = 1, 2, 3, ... (a payload larger than `capacity` takes
 * one round per piece). In round s, rank r:
 *   1. copies its payload into its own buffer s & 1, and its size and dtype into ctl[r].shape[s & 1];
 *   2. publishes it: atomic store of s into ctl[r].seq (seq_cst, which includes release): every
 *      write of step 1 happens-before any read that observes seq >= s, on any CPU, weakly ordered
 *      ones (ARM, POWER) included: the store is a release, the load below an acquire;
 *   3. waits until ctl[p].seq >= s for every peer p (an acquire load: what p wrote into its buffer
 *      before publishing round s is visible after it);
 *   4. checks that every peer's shape[s & 1] equals its own (ranks that compiled different
 *      collectives would otherwise add unrelated numbers: an error naming the rank instead), then
 *      sums buffer s & 1 of ranks 0, 1, ..., W-1 in that order into its output: every rank adds the
 *      same numbers in the same order with the same code, so results are bitwise equal on all ranks.
 * Why a buffer is never overwritten while a peer still reads it: rank r writes buffer s & 1 again
 * in round s + 2. It reached round s + 2 only after step 3 of round s + 1 saw every peer's seq >=
 * s + 1, and a peer publishes s + 1 only after it finished reading round s (its step 4 precedes its
 * next step 2 in program order, and the release/acquire pair orders them for rank r). A peer can run
 * at most one round ahead (it cannot pass step 3 of round s + 1 without rank r's s + 1), so it
 * never touches buffer s & 1 while rank r reads round s. seq compares wrap-safely (32 bits).
 *
 * Waiting (steps 3): spin with a pause instruction for at most `spin_ns`, then block on a futex on
 * the peer's seq word in slices of a few ms. A publisher wakes the futex only when a waiter
 * announced itself in ctl[p].waiters. The announcement is a Dekker pair: the waiter increments
 * `waiters` then re-reads `seq`; the publisher stores `seq` then reads `waiters`; all four are
 * seq_cst, so at least one of the two sees the other's write, and FUTEX_WAIT itself returns at once
 * if seq no longer holds the value the waiter saw. Between slices the waiter checks the deadline and
 * whether the peer's process is gone (no /proc/<pid> entry, or a zombie): a dead peer is reported
 * within a slice, a slow one at the deadline. Nothing spins for long, so ranks that outnumber the
 * cores do not starve each other.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x626e7368u /* "bnsh" */
#define LINE 128          /* keeps each rank's control words on its own cache lines */
#define SLICE_NS 2000000L /* futex wait slice between liveness and deadline checks */

typedef struct {
    uint32_t magic;
    uint32_t world;
    uint64_t capacity;
} header_t;

typedef struct {
    _Atomic uint32_t seq;
    _Atomic uint32_t waiters;
    _Atomic int32_t pid;
    uint32_t pad;
    uint64_t shape[2]; /* per buffer: numel * 4 + dtype of the round that filled it */
} ctl_t;

enum { OK = 0, TIMEOUT = 1, DEAD = 2, BAD = 3, MISMATCH = 4 };

static size_t ctl_offset(int r) { return LINE + (size_t)r * LINE; }
static size_t data_offset(int world, uint64_t cap, int r, int buf) {
    return LINE + (size_t)world * LINE + ((size_t)r * 2 + buf) * cap;
}
static ctl_t *ctl(void *base, int r) { return (ctl_t *)((char *)base + ctl_offset(r)); }

long bnshm_size(int world, long capacity) { return (long)data_offset(world, capacity, world, 0); }

static void *map(int fd, long size) {
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return base == MAP_FAILED ? NULL : base;
}

/* Create (exclusively) and map the segment `name`; NULL and errno on failure. */
void *bnshm_create(const char *name, int world, long capacity) {
    long size = bnshm_size(world, capacity);
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) return NULL;
    if (ftruncate(fd, size) != 0) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        errno = e;
        return NULL;
    }
    void *base = map(fd, size);
    if (base == NULL) {
        shm_unlink(name);
        return NULL;
    }
    header_t *h = (header_t *)base; /* fresh pages are zero: every seq and waiters starts at 0 */
    h->world = (uint32_t)world;
    h->capacity = (uint64_t)capacity;
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = MAGIC;
    return base;
}

/* Map an existing segment; NULL and errno on failure (EINVAL: not a segment of this shape). */
void *bnshm_open(const char *name, int world, long capacity) {
    long size = bnshm_size(world, capacity);
    int fd = shm_open(name, O_RDWR, 0600);
    if (fd < 0) return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size != size) {
        close(fd);
        errno = EINVAL;
        return NULL;
    }
    void *base = map(fd, size);
    if (base == NULL) return NULL;
    header_t *h = (header_t *)base;
    if (h->magic != MAGIC || h->world != (uint32_t)world || h->capacity != (uint64_t)capacity) {
        munmap(base, size);
        errno = EINVAL;
        return NULL;
    }
    return base;
}

int bnshm_unlink(const char *name) { return shm_unlink(name) == 0 ? 0 : errno; }
int bnshm_unmap(void *base, int world, long capacity) { return munmap(base, bnshm_size(world, capacity)); }
void bnshm_set_pid(void *base, int rank, int pid) { atomic_store(&ctl(base, rank)->pid, pid); }
int bnshm_pid(void *base, int rank) { return atomic_load(&ctl(base, rank)->pid); }

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Whether process `pid` is gone: no /proc entry, or a zombie / dead task (exited, not yet reaped). */
int bnshm_gone(int pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errno == ENOENT || errno == ESRCH;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    char *paren = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (paren == NULL || paren[1] == 0 || paren[2] == 0) return 0;
    char state = paren[2];
    return state == 'Z' || state == 'X' || state == 'x';
}

static inline int reached(ctl_t *c, uint32_t s) {
    return (int32_t)(atomic_load_explicit(&c->seq, memory_order_acquire) - s) >= 0;
}

static int wait_for(ctl_t *c, uint32_t s, long spin_ns, long deadline) {
    if (reached(c, s)) return OK;
    long start = now_ns();
    for (unsigned i = 1;; i++) {
        if (reached(c, s)) return OK;
        cpu_relax();
        if ((i & 63) == 0 && now_ns() - start >= spin_ns) break;
    }
    for (;;) {
        atomic_fetch_add(&c->waiters, 1);
        uint32_t seen = atomic_load(&c->seq);
        if ((int32_t)(seen - s) < 0) {
            struct timespec slice = {0, SLICE_NS};
            syscall(SYS_futex, &c->seq, FUTEX_WAIT, seen, &slice, NULL, 0);
        }
        atomic_fetch_sub(&c->waiters, 1);
        if (reached(c, s)) return OK;
        int pid = atomic_load(&c->pid);
        if (pid > 0 && bnshm_gone(pid)) return reached(c, s) ? OK : DEAD;
        if (now_ns() >= deadline) return reached(c, s) ? OK : TIMEOUT;
    }
}

static void publish(ctl_t *c, uint32_t s) {
    atomic_store(&c->seq, s); /* seq_cst: a release for the data, and one side of the Dekker pair */
    if (atomic_load(&c->waiters) > 0) syscall(SYS_futex, &c->seq, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

#define SUM(T)                                                                        \
    static void sum_##T(void *base, int world, uint64_t cap, int buf, T *out, long n) { \
        const T *first = (const T *)((char *)base + data_offset(world, cap, 0, buf));   \
        for (long i = 0; i < n; i++) out[i] = first[i];                                \
        for (int r = 1; r < world; r++) {                                              \
            const T *d = (const T *)((char *)base + data_offset(world, cap, r, buf));   \
            for (long i = 0; i < n; i++) out[i] += d[i];                               \
        }                                                                              \
    }
SUM(float)
SUM(double)

/* Round s of a payload that fits in `capacity`, in two calls: bnshm_issue (steps 1-2: copy, publish)
 * and bnshm_complete (steps 3-4: wait, check, sum), so that a rank can compute between the two while
 * its peers arrive. The caller keeps at most one round per segment between the two calls (bnpass's
 * Channel completes an open round before it issues the next), which is what the safety argument
 * above needs: a rank issues round s + 1 only after it completed round s. */
int bnshm_issue(void *base, int rank, uint32_t s, int dtype, const void *in, long numel) {
    header_t *h = (header_t *)base;
    long elsize = dtype == 0 ? 4 : dtype == 1 ? 8 : 0;
    if (elsize == 0 || rank < 0 || rank >= (int)h->world || numel * elsize > (long)h->capacity) return BAD;
    int buf = s & 1;
    memcpy((char *)base + data_offset((int)h->world, h->capacity, rank, buf), in, numel * elsize);
    ctl(base, rank)->shape[buf] = (uint64_t)numel * 4 + (uint64_t)dtype;
    publish(ctl(base, rank), s);
    return OK;
}

/* out = the sum of round s (issued by bnshm_issue with these dtype and numel) over the group's ranks,
 * in rank order. On TIMEOUT, DEAD or MISMATCH, *who is the peer's group rank and *theirs, on
 * MISMATCH, its shape (numel * 4 + dtype); the channel is unusable after any error. */
int bnshm_complete(void *base, int rank, uint32_t s, int dtype, void *out, long numel, long spin_ns,
                   long deadline_ns, int *who, uint32_t *theirs) {
    header_t *h = (header_t *)base;
    int world = (int)h->world, buf = s & 1;
    uint64_t shape = (uint64_t)numel * 4 + (uint64_t)dtype;
    for (int p = 0; p < world; p++) {
        if (p == rank) continue;
        int rc = wait_for(ctl(base, p), s, spin_ns, deadline_ns);
        if (rc == OK && ctl(base, p)->shape[buf] != shape) rc = MISMATCH;
        if (rc != OK) {
            *who = p;
            *theirs = ctl(base, p)->shape[buf] < (1ull << 34) ? (uint32_t)ctl(base, p)->shape[buf] : 0;
            return rc;
        }
    }
    if (dtype == 0)
        sum_float(base, world, h->capacity, buf, (float *)out, numel);
    else
        sum_double(base, world, h->capacity, buf, (double *)out, numel);
    return OK;
}

/* The monotonic clock in ns (the deadlines above are on it). */
long bnshm_now_ns(void) { return now_ns(); }

/* out = sum over the group's ranks of `in` (numel values; dtype 0 float32, 1 float64), in rank
 * order: issue and complete, one round per `capacity` bytes. *seq: the last round this rank
 * completed, advanced by the rounds used. On TIMEOUT, DEAD or MISMATCH, *who is the peer's group
 * rank, and on MISMATCH *seq its shape (numel * 4 + dtype; the channel is unusable after any
 * error). timeout_ns: from the call's start. */
int bnshm_all_reduce(void *base, int rank, uint32_t *seq, int dtype, const void *in, void *out,
                     long numel, long spin_ns, long timeout_ns, int *who) {
    header_t *h = (header_t *)base;
    long elsize = dtype == 0 ? 4 : dtype == 1 ? 8 : 0;
    if (elsize == 0 || rank < 0 || rank >= (int)h->world) return BAD;
    long per_round = (long)(h->capacity / elsize), deadline = now_ns() + timeout_ns;
    for (long done = 0; done < numel; done += per_round) {
        long n = numel - done < per_round ? numel - done : per_round;
        uint32_t s = *seq + 1, theirs = 0;
        int rc = bnshm_issue(base, rank, s, dtype, (const char *)in + done * elsize, n);
        if (rc == OK)
            rc = bnshm_complete(base, rank, s, dtype, (char *)out + done * elsize, n, spin_ns, deadline,
                                who, &theirs);
        if (rc != OK) {
            if (rc == MISMATCH) *seq = theirs;
            return rc;
        }
        *seq = s;
    }
    return OK;
}
