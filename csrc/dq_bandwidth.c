/* The machine's streaming read bandwidth: the yardstick the benchmarks hold
 * the low-bit GEMV to (a GEMV at batch 1 can go no faster than its weights
 * can be read). */
#include "dq_kernels.h"

#include <string.h>
#include <time.h>

typedef struct {
    uint64_t *buf;
    int64_t per_item; /* uint64 per item */
    uint64_t sink[256];
    int64_t items;
} bw_ctx;

static void fill(void *vctx, int64_t i0, int64_t i1)
{
    bw_ctx *c = (bw_ctx *)vctx;
    /* Each thread touches its own pages first (first-touch placement). */
    for (int64_t i = i0 * c->per_item; i < i1 * c->per_item; i++) c->buf[i] = (uint64_t)i;
}

static void read_range(void *vctx, int64_t i0, int64_t i1)
{
    bw_ctx *c = (bw_ctx *)vctx;
    const uint64_t *p = c->buf + i0 * c->per_item;
    int64_t n = (i1 - i0) * c->per_item;
    /* Integer sums vectorise without reassociation concerns. */
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = 0; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    /* Keep the sums observable so the loads cannot be dropped. */
    c->sink[(i0 * 256) / (c->items ? c->items : 1)] ^= s0 ^ s1 ^ s2 ^ s3;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

dq_status dq_read_bandwidth(size_t bytes, int nthreads, int repeats, double *gbps)
{
    if (nthreads < 1) nthreads = dq_num_threads();
    if (repeats < 1) repeats = 1;
    /* Items of 64 KiB so every thread gets whole, equal-sized pieces. */
    const int64_t item_bytes = 65536;
    int64_t items = (int64_t)(bytes / (size_t)item_bytes);
    if (items < nthreads) items = nthreads;
    bw_ctx c;
    memset(&c, 0, sizeof c);
    c.per_item = item_bytes / 8;
    c.items = items;
    c.buf = (uint64_t *)dq_malloc((size_t)(items * item_bytes));
    if (!c.buf) return DQ_ENOMEM;
    dq_status st = dq_parallel_for(items, 1, nthreads, fill, &c);
    double best = 1e30;
    for (int rep = 0; rep < repeats && st == DQ_OK; rep++) {
        double t0 = now_s();
        st = dq_parallel_for(items, 1, nthreads, read_range, &c);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    dq_free(c.buf);
    if (st != DQ_OK) return st;
    *gbps = (double)(items * item_bytes) / best / 1e9;
    return DQ_OK;
}
