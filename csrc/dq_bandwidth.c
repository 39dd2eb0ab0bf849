/* The machine's streaming read bandwidth: the yardstick the benchmarks hold
 * the low-bit GEMV to (a GEMV at batch 1 can go no faster than its weights
 * can be read). */
#include "dq_kernels.h"
#include "dq_profile.h"

#include <string.h>

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
        double t0 = dq_wall_seconds();
        st = dq_parallel_for(items, 1, nthreads, read_range, &c);
        double dt = dq_wall_seconds() - t0;
        if (dt < best) best = dt;
    }
    dq_free(c.buf);
    if (st != DQ_OK) return st;
    *gbps = (double)(items * item_bytes) / best / 1e9;
    return DQ_OK;
}

/* ---- the compute ceiling of a one-multiply-add-per-weight kernel --------
 *
 * The batch-1 kernels do one fp32 multiply-add per weight (the codes are
 * exact small integers, x stays fp32), so besides the read bandwidth their
 * speed is capped by how many fp32 multiply-adds the cores can issue.  This
 * measures that: independent FMA chains (more than latency x throughput, so
 * no chain waits), registers only, on every thread at once. */

/* Iterations of the timed loop per thread and repeat: ~0.1 s at 2-3 GHz. */
#define FMA_ITERS 20000000L

typedef struct {
    long iters;
    float sink[256];
    int64_t items;
} fma_ctx;

#define FMA_CHAIN(a) a = a * x + y;

static float fma_loop_scalar(long iters)
{
    /* 8 chains of 8-wide vectors, written with GCC vector extensions so the
     * generic build still issues SIMD multiply-adds where it can. */
    typedef float v8 __attribute__((vector_size(32)));
    v8 x = {0.999999f, 0.999999f, 0.999999f, 0.999999f, 0.999999f, 0.999999f, 0.999999f, 0.999999f};
    v8 y = x * 1e-7f;
    v8 a0 = x, a1 = x + 1, a2 = x + 2, a3 = x + 3, a4 = x + 4, a5 = x + 5, a6 = x + 6, a7 = x + 7;
    for (long k = 0; k < iters; k++) {
        FMA_CHAIN(a0) FMA_CHAIN(a1) FMA_CHAIN(a2) FMA_CHAIN(a3)
        FMA_CHAIN(a4) FMA_CHAIN(a5) FMA_CHAIN(a6) FMA_CHAIN(a7)
    }
    v8 s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    return s[0];
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* Twelve chains: covers FMA latency (4-5 cycles) x two FMA units. */
__attribute__((target("avx2,fma"))) static float fma_loop_avx2(long iters)
{
    const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
    __m256 a0 = x, a1 = _mm256_add_ps(x, x), a2 = _mm256_add_ps(a1, x), a3 = _mm256_add_ps(a2, x);
    __m256 a4 = _mm256_add_ps(a3, x), a5 = _mm256_add_ps(a4, x), a6 = _mm256_add_ps(a5, x);
    __m256 a7 = _mm256_add_ps(a6, x), a8 = _mm256_add_ps(a7, x), a9 = _mm256_add_ps(a8, x);
    __m256 a10 = _mm256_add_ps(a9, x), a11 = _mm256_add_ps(a10, x);
#define FMA_AVX2(a) a = _mm256_fmadd_ps(a, x, y);
    for (long k = 0; k < iters; k++) {
        FMA_AVX2(a0) FMA_AVX2(a1) FMA_AVX2(a2) FMA_AVX2(a3) FMA_AVX2(a4) FMA_AVX2(a5)
        FMA_AVX2(a6) FMA_AVX2(a7) FMA_AVX2(a8) FMA_AVX2(a9) FMA_AVX2(a10) FMA_AVX2(a11)
    }
#undef FMA_AVX2
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    return _mm256_cvtss_f32(s);
}
#endif

static int fma_use_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
    return dq_cpu_has_avx2();
#else
    return 0;
#endif
}

static void fma_range(void *vctx, int64_t i0, int64_t i1)
{
    fma_ctx *c = (fma_ctx *)vctx;
    float s = 0.0f;
    for (int64_t i = i0; i < i1; i++) {
#if defined(__x86_64__) || defined(__i386__)
        if (fma_use_avx2()) {
            s += fma_loop_avx2(c->iters);
            continue;
        }
#endif
        /* Without AVX2: the generic build's own vector code. */
        s += fma_loop_scalar(c->iters);
    }
    c->sink[(i0 * 256) / (c->items ? c->items : 1)] = s;
}

dq_status dq_fma_throughput(int nthreads, int repeats, double *gmacs)
{
    if (nthreads < 1) nthreads = dq_num_threads();
    if (repeats < 1) repeats = 1;
    const int avx2 = fma_use_avx2();
    const double chains = avx2 ? 12.0 : 8.0; /* 8-lane multiply-adds per iteration */
    fma_ctx c;
    memset(&c, 0, sizeof c);
    c.iters = (long)(FMA_ITERS / chains);
    c.items = nthreads; /* one item per thread: every core busy at once */
    double best = 1e30;
    dq_status st = DQ_OK;
    for (int rep = 0; rep < repeats && st == DQ_OK; rep++) {
        double t0 = dq_wall_seconds();
        st = dq_parallel_for(c.items, 1, nthreads, fma_range, &c);
        double dt = dq_wall_seconds() - t0;
        if (dt < best) best = dt;
    }
    if (st != DQ_OK) return st;
    *gmacs = chains * 8.0 * (double)c.iters * (double)c.items / best / 1e9;
    return DQ_OK;
}
