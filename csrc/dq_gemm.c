/* Solver GEMMs whose every output bit is independent of the thread count.
 *
 * OpenBLAS's sgemm is not bit-identical across its own thread counts: with
 * more threads it splits C differently and small shapes take different
 * kernels, so an element's sum over k can round differently (a 100 x 128 by
 * 128 x 128 product already differs in the last bits between 1 and 2
 * threads).  The solvers feed those products back into roundings, so codes
 * moved with set_blas_threads.
 *
 * dq_sgemm_rows therefore splits C into blocks of DQ_GEMM_CHUNK_ROWS rows, a
 * size fixed at compile time, and computes each block by a single-threaded
 * sgemm call of the same shape whatever the thread count; the blocks are
 * spread over the core's own pool (dq_parallel_for).  Each output element is
 * then produced by the same call on the same operands, so 1, 2 or 3 threads
 * give the same bits.
 *
 * Single-threaded BLAS: the vendored OpenBLAS has only a process-wide thread
 * count, so while any caller is inside dq_blas_serial_begin/_end that count
 * is 1 and the caller's wish is kept aside (dq_blas_threads reports it, and
 * dq_blas_set_threads updates it, applied when the last caller leaves).  So
 * only one pool runs at a time: OpenBLAS's is idle while the core's runs the
 * blocks.  Other BLAS users in the process run single-threaded meanwhile,
 * which costs them speed, never correctness.
 */
#include "dq_common.h"
#include "dq_blas.h"

#include <pthread.h>

static pthread_mutex_t serial_lock = PTHREAD_MUTEX_INITIALIZER;
static int serial_depth = 0;   /* callers inside a serial section */
static int serial_saved = 1;   /* the thread count to restore when the last one leaves */

void dq_blas_serial_begin(void)
{
    pthread_mutex_lock(&serial_lock);
    if (serial_depth++ == 0) {
        serial_saved = dq_openblas_get_num_threads();
        if (serial_saved != 1) dq_openblas_set_num_threads(1);
    }
    pthread_mutex_unlock(&serial_lock);
}

void dq_blas_serial_end(void)
{
    pthread_mutex_lock(&serial_lock);
    if (serial_depth > 0 && --serial_depth == 0 && serial_saved != 1)
        dq_openblas_set_num_threads(serial_saved);
    pthread_mutex_unlock(&serial_lock);
}

int dq_blas_threads(void)
{
    pthread_mutex_lock(&serial_lock);
    int n = serial_depth > 0 ? serial_saved : dq_openblas_get_num_threads();
    pthread_mutex_unlock(&serial_lock);
    return n >= 1 ? n : 1;
}

void dq_blas_set_threads(int n)
{
    if (n < 1) n = 1;
    pthread_mutex_lock(&serial_lock);
    if (serial_depth > 0)
        serial_saved = n;  /* applied when the last serial section ends */
    else
        dq_openblas_set_num_threads(n);
    pthread_mutex_unlock(&serial_lock);
}

typedef struct {
    int64_t m, n, k;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int64_t lda, ldb, ldc;
} gemm_ctx;

/* Blocks [begin, end) of DQ_GEMM_CHUNK_ROWS rows, one sgemm call each. */
static void gemm_blocks(void *arg, int64_t begin, int64_t end)
{
    const gemm_ctx *g = (const gemm_ctx *)arg;
    for (int64_t b = begin; b < end; b++) {
        const int64_t r0 = b * DQ_GEMM_CHUNK_ROWS;
        const int64_t rows = g->m - r0 < DQ_GEMM_CHUNK_ROWS ? g->m - r0 : DQ_GEMM_CHUNK_ROWS;
        dq_cblas_sgemm(DqRowMajor, DqNoTrans, DqNoTrans, (int)rows, (int)g->n, (int)g->k, g->alpha,
                       g->A + r0 * g->lda, (int)g->lda, g->B, (int)g->ldb, g->beta,
                       g->C + r0 * g->ldc, (int)g->ldc);
    }
}

void dq_sgemm_rows(int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (m <= 0 || n <= 0) return;
    gemm_ctx g = {m, n, k, alpha, beta, A, B, C, lda, ldb, ldc};
    const int64_t blocks = (m + DQ_GEMM_CHUNK_ROWS - 1) / DQ_GEMM_CHUNK_ROWS;
    dq_blas_serial_begin();
    dq_parallel_for(blocks, 1, dq_num_threads(), gemm_blocks, &g);
    dq_blas_serial_end();
}
