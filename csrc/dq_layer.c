/* One layer's problem: argument validation and the per-layer products
 * (Hf = float32 H00, V = W Hf, c_r = w_r H00 w_r^T) that every later step
 * reuses (ALGORITHM 6.1). */
#include "dq_solver.h"
#include "dq_blas.h"

#include <string.h>

/* Row chunk for the elementwise loops: big enough that a thread's share
 * outweighs the cost of starting it. */
#define ROW_CHUNK_ELEMS 65536
/* Rows of V = W Hf per GEMM (between two interrupt polls). */
#define V_BLOCK_ROWS 512

typedef struct {
    const float *V, *W;
    int64_t n;
    double *c;
} rowdot_ctx_t;

static void rowdot_range(void *vctx, int64_t begin, int64_t end)
{
    const rowdot_ctx_t *x = (const rowdot_ctx_t *)vctx;
    for (int64_t r = begin; r < end; r++) {
        const float *v = x->V + r * x->n, *w = x->W + r * x->n;
        double acc = 0.0;
        for (int64_t j = 0; j < x->n; j++) acc += (double)v[j] * (double)w[j];
        x->c[r] = acc;
    }
}

static int64_t min_rows(int64_t n)
{
    int64_t r = ROW_CHUNK_ELEMS / (n > 0 ? n : 1);
    return r < 1 ? 1 : r;
}

static dq_status layer_setup(dq_layer_t *L, const float *W, const double *H, int64_t m, int64_t n,
                             int64_t group_size, int bits, int symmetric, int rule)
{
    memset(L, 0, sizeof(*L));
    if (!W || m < 1 || n < 1) return DQ_EINVAL;
    /* BLAS takes 32-bit sizes. */
    if (m > INT32_MAX || n > INT32_MAX) return DQ_EINVAL;
    if (bits < 2 || bits > 8) return DQ_EINVAL;
    if (rule != DQ_ROUND_HALF_UP && rule != DQ_ROUND_HALF_EVEN) return DQ_EINVAL;
    int64_t g = group_size == -1 ? n : group_size;
    if (g < 1) return DQ_EINVAL;
    if (g > n) g = n; /* one group per row either way */
    L->m = m;
    L->n = n;
    L->g = g;
    L->G = dq_num_groups(n, g); /* the last group is short when g does not divide n */
    L->bits = bits;
    L->qmin = dq_qmin(bits);
    L->qmax = dq_qmax(bits);
    L->symmetric = symmetric ? 1 : 0;
    L->rule = rule;
    L->W = W;
    L->H = H;
    if (H) {
        L->Hf = dq_malloc(sizeof(float) * (size_t)(n * n));
        if (!L->Hf) return DQ_ENOMEM;
        for (int64_t i = 0; i < n * n; i++) L->Hf[i] = (float)H[i];
    }
    return DQ_OK;
}

dq_status dq_layer_init_basic(dq_layer_t *L, const float *W, const double *H, int64_t m, int64_t n,
                              int64_t group_size, int bits, int symmetric, int rule)
{
    dq_status st = layer_setup(L, W, H, m, n, group_size, bits, symmetric, rule);
    if (st != DQ_OK) dq_layer_free(L);
    return st;
}

dq_status dq_layer_init(dq_layer_t *L, const float *W, const double *H, int64_t m, int64_t n,
                        int64_t group_size, int bits, int symmetric, int rule)
{
    dq_status st = layer_setup(L, W, H, m, n, group_size, bits, symmetric, rule);
    if (st == DQ_OK && !H) st = DQ_EINVAL;
    if (st != DQ_OK) goto fail;
    L->V = dq_malloc(sizeof(float) * (size_t)(m * n));
    L->c = dq_malloc(sizeof(double) * (size_t)m);
    if (!L->V || !L->c) {
        st = DQ_ENOMEM;
        goto fail;
    }
    /* Hf is symmetric, so W Hf is V without a transpose.  In row blocks, so
     * a long product can be interrupted between them (each row of V is its
     * own dot products: the blocks do not change the result). */
    for (int64_t r0 = 0; r0 < m; r0 += V_BLOCK_ROWS) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto fail;
        }
        const int64_t rows = m - r0 < V_BLOCK_ROWS ? m - r0 : V_BLOCK_ROWS;
        dq_sgemm_rows(rows, n, n, 1.0f, W + r0 * n, n, L->Hf, n, 0.0f, L->V + r0 * n, n);
    }
    rowdot_ctx_t ctx = {L->V, W, n, L->c};
    st = dq_parallel_for(m, min_rows(n), dq_num_threads(), rowdot_range, &ctx);
    if (st != DQ_OK) goto fail;
    return DQ_OK;
fail:
    dq_layer_free(L);
    return st;
}

void dq_layer_free(dq_layer_t *L)
{
    if (!L) return;
    dq_free(L->Hf);
    dq_free(L->V);
    dq_free(L->c);
    L->Hf = NULL;
    L->V = NULL;
    L->c = NULL;
}
