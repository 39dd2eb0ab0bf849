/* Min-max initialisation, round-to-nearest codes and row errors
 * (ALGORITHM 1.2, 3.2 step 1, 6.1).
 *
 * The scalar float32 expressions below are written in the same operation
 * order as the NumPy reference (compiled with -ffp-contract=off), so codes,
 * scales and zeros are bit-identical to it.
 */
#include "dq_solver.h"
#include "dq_blas.h"

#include <string.h>

#define ROW_CHUNK_ELEMS 65536
/* Rows per GEMM in dq_row_errors: caps its two m x n work buffers. */
#define ERR_CHUNK_ELEMS (1 << 22)

/* Safe division of ALGORITHM 1.4 in float32, as the reference does it:
 * plain division whenever |y| >= 1e-15. */
static inline float safe_divf(float x, float y)
{
    float ay = fabsf(y);
    if (!(ay >= 1e-15f)) ay = 1e-15f;
    return x / (y < 0.0f ? -ay : ay);
}

static int64_t min_rows(int64_t n)
{
    int64_t r = ROW_CHUNK_ELEMS / (n > 0 ? n : 1);
    return r < 1 ? 1 : r;
}

/* ---- min-max parameters ------------------------------------------------ */

typedef struct {
    const dq_layer_t *L;
    const float *p_row;
    float *S, *Z;
} minmax_ctx_t;

static void minmax_range(void *vctx, int64_t begin, int64_t end)
{
    const minmax_ctx_t *x = (const minmax_ctx_t *)vctx;
    const dq_layer_t *L = x->L;
    const float maxq = (float)((1 << L->bits) - 1);
    const float qmin = (float)L->qmin;
    for (int64_t r = begin; r < end; r++) {
        const float *w = L->W + r * L->n;
        for (int64_t j = 0; j < L->G; j++) {
            const float *wg = w + j * L->g;
            const int64_t gw = dq_group_width(L->n, L->g, j);
            /* The range always contains 0. */
            float lo = 0.0f, hi = 0.0f;
            for (int64_t c = 0; c < gw; c++) {
                if (wg[c] < lo) lo = wg[c];
                if (wg[c] > hi) hi = wg[c];
            }
            if (lo == 0.0f && hi == 0.0f) {
                lo = -1.0f;
                hi = 1.0f;
            }
            if (L->symmetric) {
                if (-lo > hi) hi = -lo;
                if (lo < 0.0f) lo = -hi;
            }
            if (x->p_row) {
                const float p = x->p_row[r];
                lo = p * lo;
                hi = p * hi;
            }
            const float s = (hi - lo) / maxq;
            x->S[r * L->G + j] = s;
            x->Z[r * L->G + j] = L->symmetric ? 0.0f : lo - s * qmin;
        }
    }
}

void dq_minmax_params(const dq_layer_t *L, const float *p_row, float *S, float *Z)
{
    minmax_ctx_t ctx = {L, p_row, S, Z};
    dq_parallel_for(L->m, min_rows(L->n), dq_num_threads(), minmax_range, &ctx);
}

/* ---- round to nearest -------------------------------------------------- */

typedef struct {
    const dq_layer_t *L;
    const float *S, *Z;
    int8_t *A;
} rtn_ctx_t;

static void rtn_range(void *vctx, int64_t begin, int64_t end)
{
    const rtn_ctx_t *x = (const rtn_ctx_t *)vctx;
    const dq_layer_t *L = x->L;
    const float qmin = (float)L->qmin, qmax = (float)L->qmax;
    for (int64_t r = begin; r < end; r++) {
        const float *w = L->W + r * L->n;
        int8_t *a = x->A + r * L->n;
        for (int64_t j = 0; j < L->G; j++) {
            const float s = x->S[r * L->G + j];
            const float z = L->symmetric ? 0.0f : x->Z[r * L->G + j];
            for (int64_t c = j * L->g; c < j * L->g + dq_group_width(L->n, L->g, j); c++) {
                const float t = safe_divf(L->symmetric ? w[c] : w[c] - z, s);
                float q = dq_round(t, L->rule);
                if (!(q >= qmin)) q = qmin; /* NaN too: the cast stays defined */
                if (q > qmax) q = qmax;
                a[c] = (int8_t)q;
            }
        }
    }
}

void dq_rtn_codes(const dq_layer_t *L, const float *S, const float *Z, int8_t *A)
{
    rtn_ctx_t ctx = {L, S, Z, A};
    dq_parallel_for(L->m, min_rows(L->n), dq_num_threads(), rtn_range, &ctx);
}

/* ---- row errors -------------------------------------------------------- */

typedef struct {
    const dq_layer_t *L;
    const int64_t *rows; /* NULL: rows r0, r0 + 1, ... */
    const int8_t *A;
    const float *S, *Z;  /* Z NULL: zero */
    int64_t r0;          /* first entry of the chunk */
    float *D, *P;        /* chunk rows x n */
    double *err;
} err_ctx_t;

static inline int64_t row_of(const err_ctx_t *x, int64_t i)
{
    return x->rows ? x->rows[x->r0 + i] : x->r0 + i;
}

static void diff_range(void *vctx, int64_t begin, int64_t end)
{
    const err_ctx_t *x = (const err_ctx_t *)vctx;
    const dq_layer_t *L = x->L;
    for (int64_t i = begin; i < end; i++) {
        const int64_t r = row_of(x, i);
        const float *w = L->W + r * L->n;
        const int8_t *a = x->A + r * L->n;
        float *d = x->D + i * L->n;
        for (int64_t j = 0; j < L->G; j++) {
            const float s = x->S[r * L->G + j], z = x->Z ? x->Z[r * L->G + j] : 0.0f;
            for (int64_t c = j * L->g; c < j * L->g + dq_group_width(L->n, L->g, j); c++) {
                const float what = (float)a[c] * s + z;
                d[c] = what - w[c];
            }
        }
    }
}

static void dot_range(void *vctx, int64_t begin, int64_t end)
{
    const err_ctx_t *x = (const err_ctx_t *)vctx;
    const int64_t n = x->L->n;
    for (int64_t i = begin; i < end; i++) {
        const float *d = x->D + i * n, *p = x->P + i * n;
        double acc = 0.0;
        for (int64_t c = 0; c < n; c++) acc += (double)d[c] * (double)p[c];
        x->err[row_of(x, i)] = acc;
    }
}

/* Half-flop form: e = sum over column blocks b of d_b . (d_b H_bb) +
 * 2 d_b . (H_b,>b d_>b^T), from one sgemm per block on the block's rows of
 * Hf right of its start (H is symmetric), m n^2 (1 + HALF_BLOCK / n) flops
 * instead of 2 m n^2. */
#define HALF_BLOCK 512

typedef struct {
    const err_ctx_t *e;
    int64_t b0, b1;
    const float *T;  /* chunk rows x (n - b0) */
    double *acc;     /* chunk rows */
} half_ctx_t;

static void half_dot_range(void *vctx, int64_t begin, int64_t end)
{
    const half_ctx_t *h = (const half_ctx_t *)vctx;
    const int64_t n = h->e->L->n, b0 = h->b0, b1 = h->b1, ld = n - b0;
    for (int64_t i = begin; i < end; i++) {
        const float *d = h->e->D + i * n, *t = h->T + i * ld;
        double diag = 0.0, off = 0.0;
        for (int64_t c = b0; c < b1; c++) diag += (double)d[c] * (double)t[c - b0];
        for (int64_t c = b1; c < n; c++) off += (double)d[c] * (double)t[c - b0];
        h->acc[i] += diag + 2.0 * off;
    }
}

/* DH (m x n, or NULL): where every row's D Hf goes, for a caller that reuses
 * the product (rows NULL only). */
static dq_status row_errors_impl(const dq_layer_t *L, const int64_t *rows, int64_t k,
                                 const int8_t *A, const float *S, const float *Z, double *err,
                                 float *DH)
{
    const int64_t n = L->n;
    if (!L->Hf) return DQ_EINVAL;
    if (k <= 0) return DQ_OK;
    int64_t chunk = ERR_CHUNK_ELEMS / n;
    if (chunk < 64) chunk = 64;
    if (chunk > k) chunk = k;
    float *D = dq_malloc(sizeof(float) * (size_t)(chunk * n));
    float *P = DH ? NULL : dq_malloc(sizeof(float) * (size_t)(chunk * n));
    if (!D || (!DH && !P)) {
        dq_free(D);
        dq_free(P);
        return DQ_ENOMEM;
    }
    const int nt = dq_num_threads();
    const int half = !DH && n >= 2 * HALF_BLOCK;
    double *acc = half ? dq_malloc(sizeof(double) * (size_t)chunk) : NULL;
    if (half && !acc) {
        dq_free(D);
        dq_free(P);
        return DQ_ENOMEM;
    }
    dq_status st = DQ_OK;
    for (int64_t r0 = 0; r0 < k; r0 += chunk) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            break;
        }
        const int64_t cnt = (k - r0) < chunk ? (k - r0) : chunk;
        float *Pc = DH ? DH + r0 * n : P;
        err_ctx_t ctx = {L, rows, A, S, Z, r0, D, Pc, err};
        dq_parallel_for(cnt, min_rows(n), nt, diff_range, &ctx);
        if (half) {
            memset(acc, 0, sizeof(double) * (size_t)cnt);
            for (int64_t b0 = 0; b0 < n; b0 += HALF_BLOCK) {
                const int64_t b1 = b0 + HALF_BLOCK < n ? b0 + HALF_BLOCK : n;
                dq_sgemm_rows(cnt, n - b0, b1 - b0, 1.0f, D + b0, n, L->Hf + b0 * n + b0, n, 0.0f, P,
                              n - b0);
                half_ctx_t h = {&ctx, b0, b1, P, acc};
                dq_parallel_for(cnt, min_rows(n), nt, half_dot_range, &h);
            }
            for (int64_t i = 0; i < cnt; i++) err[row_of(&ctx, i)] = acc[i];
            continue;
        }
        dq_sgemm_rows(cnt, n, n, 1.0f, D, n, L->Hf, n, 0.0f, Pc, n);
        dq_parallel_for(cnt, min_rows(n), nt, dot_range, &ctx);
    }
    dq_free(acc);
    dq_free(D);
    dq_free(P);
    return st;
}

dq_status dq_row_errors_rows(const dq_layer_t *L, const int64_t *rows, int64_t k, const int8_t *A,
                             const float *S, const float *Z, double *err)
{
    return row_errors_impl(L, rows, k, A, S, Z, err, NULL);
}

dq_status dq_row_errors_keep(const dq_layer_t *L, const int8_t *A, const float *S, const float *Z,
                             double *err, float *DH)
{
    return row_errors_impl(L, NULL, L->m, A, S, Z, err, DH);
}

dq_status dq_row_errors(const dq_layer_t *L, const int8_t *A, const float *S, const float *Z,
                        double *err)
{
    return dq_row_errors_rows(L, NULL, L->m, A, S, Z, err);
}
