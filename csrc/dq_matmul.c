/* The driver of the packed kernels: picks the path by batch size and runs
 * the chosen kernel over output rows on dq_parallel_for.
 *
 *   batch <= DQ_SMALL_BATCH_MAX: the kernel's code dot, straight from the
 *       packed words (x prepared once: scaled copy and per-group sums);
 *   larger batches: dequantize a tile of rows (our threads), then one sgemm
 *       per tile (OpenBLAS's threads).  The two never overlap, so the
 *       machine is never oversubscribed, and BLAS is never called from
 *       inside a worker.
 */
#include "dq_kernels.h"
#include "dq_blas.h"

/* Rows per work item: the batch-1 kernel handles four rows at once. */
#define ROWS_PER_ITEM 4
/* Below this many multiply-adds per thread, starting a thread costs more
 * than it saves. */
#define MIN_WORK_PER_THREAD ((int64_t)1 << 19)
/* Floats in one dequantized tile (64 MiB, e.g. a whole 4096 x 4096 layer).
 * Few, large tiles matter more than cache reuse: after every sgemm OpenBLAS's
 * idle workers keep spinning for a while, so each switch between our
 * dequantization threads and BLAS costs contended cores, and sgemm itself is
 * less efficient on narrow tiles.  Measured on 2 cores at batch 128: 4 MiB
 * tiles took 2-4x the time of one sgemm on the fp32 weight, 32 MiB ~1.3x. */
#define TILE_FLOATS ((int64_t)1 << 24)

typedef struct {
    const dq_packed_t *W;
    const dq_xprep_t *X;
    const dq_kernel_t *k;
    float *Y;
    /* Any worker's failure; every failure writes the same kind of value, so
     * the unsynchronised write is only read after the join. */
    volatile int failed;
} qdot_ctx;

static void qdot_items(void *vctx, int64_t i0, int64_t i1)
{
    qdot_ctx *c = (qdot_ctx *)vctx;
    int64_t r0 = i0 * ROWS_PER_ITEM, r1 = i1 * ROWS_PER_ITEM;
    if (r1 > c->W->out) r1 = c->W->out;
    dq_status st = c->k->qdot(c->W, c->X, r0, r1, c->Y, c->W->out);
    if (st != DQ_OK) c->failed = (int)st;
}

typedef struct {
    const dq_packed_t *W;
    const dq_kernel_t *k;
    float *out;
    int64_t row0, ldo;
} deq_ctx;

static void dequant_rows(void *vctx, int64_t i0, int64_t i1)
{
    deq_ctx *c = (deq_ctx *)vctx;
    c->k->dequant(c->W, c->row0 + i0, c->row0 + i1, c->out + i0 * c->ldo, c->ldo);
}

static int64_t min_items(int64_t work_per_item)
{
    if (work_per_item < 1) work_per_item = 1;
    return (MIN_WORK_PER_THREAD + work_per_item - 1) / work_per_item;
}

static const dq_kernel_t *resolve(const dq_packed_t *W, const dq_kernel_t *k)
{
    if (!k) k = dq_kernel_default();
    return k->supports(W) ? k : &dq_kernel_ref;
}

dq_status dq_packed_dequantize(const dq_packed_t *W, float *out, int nthreads,
                               const dq_kernel_t *kernel)
{
    const dq_kernel_t *k = resolve(W, kernel);
    if (nthreads < 1) nthreads = dq_num_threads();
    deq_ctx c = {W, k, out, 0, W->in};
    return dq_parallel_for(W->out, min_items(W->in), nthreads, dequant_rows, &c);
}

static dq_status matmul_small(const dq_packed_t *W, const float *x, int64_t batch, float *y,
                              int nthreads, const dq_kernel_t *k)
{
    dq_xprep_t X;
    dq_status st = dq_xprep_init(&X, W, x, batch, k->xmode);
    if (st != DQ_OK) return st;
    qdot_ctx c = {W, &X, k, y, 0};
    int64_t items = (W->out + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    st = dq_parallel_for(items, min_items(ROWS_PER_ITEM * W->in * batch), nthreads, qdot_items,
                         &c);
    dq_xprep_free(&X);
    if (st == DQ_OK && c.failed) st = (dq_status)c.failed;
    return st;
}

static dq_status matmul_tiles(const dq_packed_t *W, const float *x, int64_t batch, float *y,
                              int nthreads, const dq_kernel_t *k, int64_t tile)
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

dq_status dq_packed_matmul(const dq_packed_t *W, const float *x, int64_t batch, float *y,
                           int nthreads, const dq_kernel_t *kernel, int64_t tile_rows)
{
    if (batch < 0) return DQ_EINVAL;
    if (batch == 0 || W->out == 0) return DQ_OK;
    const dq_kernel_t *k = resolve(W, kernel);
    if (nthreads < 1) nthreads = dq_num_threads();
    if (batch <= DQ_SMALL_BATCH_MAX) return matmul_small(W, x, batch, y, nthreads, k);
    return matmul_tiles(W, x, batch, y, nthreads, k, tile_rows);
}
