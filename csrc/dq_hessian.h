/* Streaming accumulation of a layer's Hessian H = sum_t w_t x_t x_t^T / sum_t w_t
 * (ALGORITHM 1.1, 6.7) with symmetric rank-k updates.
 *
 * Precision design: float64 batches go through dsyrk straight into the float64
 * sum S.  float32 batches go through ssyrk into a float32 partial sum P, which
 * is added into S ("flushed") before it would hold more than flush_tokens rows;
 * so at most flush_tokens products are ever summed in float32, and the
 * worst-case rounding error of an entry is about (flush_tokens + 8) * 2^-24
 * times sum_t w_t |x_ti x_tj| (typically sqrt(flush_tokens) times less).  The
 * flush reads P and updates S once, n^2/2 entries per flush_tokens tokens, a
 * small fraction of the ssyrk's flush_tokens * n^2 flops.
 *
 * A float32 token with an entry (times sqrt(w)) of magnitude >= 2^48 is summed
 * in float64 instead, so float32 squares can never overflow.  Products below
 * float32's normal range (|x_i x_j| < 1.2e-38) lose relative precision.
 *
 * Batches of fewer than DQ_HESS_DIRECT_ROWS rows (and batches with masked,
 * weighted or skipped rows) are copied into a row buffer of about
 * DQ_HESS_STAGE_BYTES, so every syrk call gets enough rows to run near peak
 * and a threaded BLAS call is not paid for a handful of rows: adding one token
 * costs O(n), not a rank-1 update.
 *
 * Only the upper triangle (row-major) of S and P is maintained.
 * A dq_hess_t must not be used by two threads at once; distinct ones may.
 */
#ifndef DQ_HESSIAN_H
#define DQ_HESSIAN_H

#include "dq_common.h"

/* Batches with at least this many rows go to syrk straight from the caller's
 * memory: enough rows for OpenBLAS to reach most of its peak. */
#define DQ_HESS_DIRECT_ROWS 256
/* Size of each row buffer (at least DQ_HESS_DIRECT_ROWS rows). */
#define DQ_HESS_STAGE_BYTES ((int64_t)4 << 20)
/* Default float32 rows summed between two flushes into float64. */
#define DQ_HESS_FLUSH_TOKENS 4096

typedef struct {
    int64_t n;
    int64_t flush_tokens;  /* K: float32 rows summed in P between flushes */
    int64_t stage32_cap;   /* rows of stage32: DQ_HESS_STAGE_BYTES worth, >= 256, <= K */
    int64_t stage64_cap;   /* rows of stage64: DQ_HESS_STAGE_BYTES worth, >= 256 */
    int skip_nonfinite;    /* 1: rows with NaN/Inf are counted and skipped */
    double *S;             /* n x n float64 sum (upper triangle), zero-initialised */
    float *P;              /* n x n float32 partial sum, lazily allocated, zero when P_rows == 0 */
    int64_t P_rows;        /* rows summed into P since the last flush */
    float *stage32;        /* stage32_cap x n staged float32 rows (already scaled by sqrt(w)) */
    int64_t stage32_rows;
    double *stage64;       /* stage64_cap x n staged float64 rows (and wide float32 ones) */
    int64_t stage64_rows;
    int64_t n_tokens;      /* rows with weight > 0 accumulated */
    int64_t n_skipped;     /* rows with weight > 0 skipped as non-finite */
    double total_weight;   /* sum of the accumulated weights (== n_tokens when unweighted) */
} dq_hess_t;

/* flush_tokens >= 1; DQ_EINVAL for n < 1 or n too large for BLAS, DQ_ENOMEM. */
dq_status dq_hess_init(dq_hess_t *h, int64_t n, int64_t flush_tokens, int skip_nonfinite);
void dq_hess_free(dq_hess_t *h);

/* Add `rows` tokens X (rows x n, C-contiguous).  w (rows, may be NULL for all
 * ones) are per-token weights: 0 excludes a token (it is neither checked nor
 * counted).  All-or-nothing: on any error nothing is accumulated and
 * *bad_row names the offending row.
 *   DQ_EINVAL      w[*bad_row] is negative or not finite
 *   DQ_ENONFINITE  X row *bad_row has a NaN/Inf (only when !skip_nonfinite)
 *   DQ_ENOMEM      a buffer could not be allocated (*bad_row = -1) */
dq_status dq_hess_add_f32(dq_hess_t *h, const float *X, int64_t rows, const double *w,
                          int64_t *bad_row);
dq_status dq_hess_add_f64(dq_hess_t *h, const double *X, int64_t rows, const double *w,
                          int64_t *bad_row);

/* out (n x n, full symmetric) = S / total_weight after folding in everything
 * pending.  DQ_EINVAL when no token has been accumulated (total_weight == 0). */
dq_status dq_hess_mean(dq_hess_t *h, double *out);

/* Benchmark baseline: C (n x n float32, upper triangle) += X^T X, one plain
 * ssyrk call on X (rows x n). */
void dq_hess_bare_ssyrk(const float *X, int64_t rows, int64_t n, float *C);

#endif
