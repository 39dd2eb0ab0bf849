/* The driver of the BCQ kernels and their run-time choice.
 *
 * Same plan as the uniform driver (dq_matmul.c):
 *   batch <= DQ_SMALL_BATCH_MAX: the kernel's dot straight from the packed
 *       words, output rows split over dq_parallel_for (x copied once into a
 *       zero-padded buffer, so no kernel needs a tail case for the columns);
 *   larger batches: dequantize a tile of rows (our threads), then one sgemm
 *       per tile (OpenBLAS's threads), never overlapping.
 * The choice of kernel follows the uniform kernels' switch: the reference
 * under DECOUPLEQ_KERNEL=reference or without AVX2; AVX2 under
 * DECOUPLEQ_KERNEL=avx2; else AVX-512 where the CPU has it (its batch-1
 * dot; it hands everything else to the AVX2 kernel), else AVX2.  Nothing
 * is timed: each kernel's own paths are never slower than the one below.
 */
#include "dq_kernels_bcq.h"
#include "dq_blas.h"
#include "dq_kernels.h"

#include <stdlib.h>
#include <string.h>

#define ROWS_PER_ITEM 4
#define MIN_WORK_PER_THREAD ((int64_t)1 << 19)
#define TILE_FLOATS ((int64_t)1 << 26)

const dq_bcq_kernel_t *dq_bcq_kernel_default(void)
{
    const char *env = getenv("DECOUPLEQ_KERNEL");
    if (env && strcmp(env, "reference") == 0) return &dq_bcq_kernel_ref;
    if (!dq_cpu_has_avx2()) return &dq_bcq_kernel_ref;
    /* DECOUPLEQ_KERNEL=avx2 (or avx2_subnormal) asks for the AVX2 builds */
    if (env && strncmp(env, "avx2", 4) == 0) return &dq_bcq_kernel_avx2;
    return dq_cpu_has_avx512() ? &dq_bcq_kernel_avx512 : &dq_bcq_kernel_avx2;
}

const dq_bcq_kernel_t *dq_bcq_kernel_by_name(const char *name)
{
    if (strcmp(name, "auto") == 0) return dq_bcq_kernel_default();
    if (strcmp(name, "reference") == 0) return &dq_bcq_kernel_ref;
    if (strcmp(name, "avx2") == 0 && dq_cpu_has_avx2()) return &dq_bcq_kernel_avx2;
    if (strcmp(name, "avx512") == 0 && dq_cpu_has_avx512()) return &dq_bcq_kernel_avx512;
    return NULL;
}

static const dq_bcq_kernel_t *resolve(const dq_bcq_t *W, const dq_bcq_kernel_t *k)
{
    if (!k) k = dq_bcq_kernel_default();
    return k->supports(W) ? k : &dq_bcq_kernel_ref;
}

static int64_t min_items(int64_t work_per_item)
{
    if (work_per_item < 1) work_per_item = 1;
    return (MIN_WORK_PER_THREAD + work_per_item - 1) / work_per_item;
}

typedef struct {
    const dq_bcq_t *W;
    const dq_bcq_kernel_t *k;
    const float *xs;
    int64_t stride, batch;
    float *Y;
    volatile int failed; /* any worker's failure, read after the join */
} dot_ctx;

static void dot_items(void *vctx, int64_t i0, int64_t i1)
{
    dot_ctx *c = (dot_ctx *)vctx;
    int64_t r0 = i0 * ROWS_PER_ITEM, r1 = i1 * ROWS_PER_ITEM;
    if (r1 > c->W->out) r1 = c->W->out;
    dq_status st = c->k->dot(c->W, c->xs, c->stride, c->batch, r0, r1, c->Y, c->W->out);
    if (st != DQ_OK) c->failed = (int)st;
}

typedef struct {
    const dq_bcq_t *W;
    const dq_bcq_kernel_t *k;
    float *out;
    int64_t row0, ldo;
} deq_ctx;

static void dequant_rows(void *vctx, int64_t i0, int64_t i1)
{
    deq_ctx *c = (deq_ctx *)vctx;
    c->k->dequant(c->W, c->row0 + i0, c->row0 + i1, c->out + i0 * c->ldo, c->ldo);
}

dq_status dq_bcq_dequantize(const dq_bcq_t *W, float *out, int nthreads,
                            const dq_bcq_kernel_t *kernel)
{
    const dq_bcq_kernel_t *k = resolve(W, kernel);
    if (nthreads < 1) nthreads = dq_num_threads();
    deq_ctx c = {W, k, out, 0, W->in};
    return dq_parallel_for(W->out, min_items(W->in), nthreads, dequant_rows, &c);
}

static dq_status matmul_small(const dq_bcq_t *W, const float *x, int64_t batch, float *y,
                              int nthreads, const dq_bcq_kernel_t *k)
{
    /* every step of the stored blocks is readable: padding columns are 0 */
    int64_t stride = W->row_words / 8 * W->slots * 8;
    float *xs = (float *)dq_calloc((size_t)(batch * stride) * sizeof(float));
    if (!xs) return DQ_ENOMEM;
    for (int64_t b = 0; b < batch; b++)
        memcpy(xs + b * stride, x + b * W->in, (size_t)W->in * sizeof(float));
    dot_ctx c = {W, k, xs, stride, batch, y, 0};
    int64_t items = (W->out + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    dq_status st = dq_parallel_for(items, min_items(ROWS_PER_ITEM * W->in * batch), nthreads,
                                   dot_items, &c);
    dq_free(xs);
    if (st == DQ_OK && c.failed) st = (dq_status)c.failed;
    return st;
}

static dq_status matmul_tiles(const dq_bcq_t *W, const float *x, int64_t batch, float *y,
                              int nthreads, const dq_bcq_kernel_t *k, int64_t tile)
{
    if (batch > INT32_MAX || W->out > INT32_MAX || W->in > INT32_MAX) return DQ_EINVAL;
    if (tile < 1) {
        tile = TILE_FLOATS / W->in;
        if (tile < 16) tile = 16;
    }
    if (tile > W->out) tile = W->out;
    float *buf = (float *)dq_malloc((size_t)(tile * W->in) * sizeof(float));
    if (!buf) return DQ_ENOMEM;
    dq_status st = DQ_OK;
    for (int64_t r0 = 0; r0 < W->out && st == DQ_OK; r0 += tile) {
        int64_t rows = W->out - r0 < tile ? W->out - r0 : tile;
        deq_ctx c = {W, k, buf, r0, W->in};
        st = dq_parallel_for(rows, min_items(W->in), nthreads, dequant_rows, &c);
        if (st != DQ_OK) break;
        dq_cblas_sgemm(DqRowMajor, DqNoTrans, DqTrans, (int)batch, (int)rows, (int)W->in, 1.0f, x,
                       (int)W->in, buf, (int)W->in, 0.0f, y + r0, (int)W->out);
    }
    dq_free(buf);
    return st;
}

dq_status dq_bcq_matmul(const dq_bcq_t *W, const float *x, int64_t batch, float *y, int nthreads,
                        const dq_bcq_kernel_t *kernel, int64_t tile_rows)
{
    if (batch < 0) return DQ_EINVAL;
    if (batch == 0 || W->out == 0) return DQ_OK;
    const dq_bcq_kernel_t *k = resolve(W, kernel);
    if (nthreads < 1) nthreads = dq_num_threads();
    if (batch <= DQ_SMALL_BATCH_MAX) return matmul_small(W, x, batch, y, nthreads, k);
    return matmul_tiles(W, x, batch, y, nthreads, k, tile_rows);
}
