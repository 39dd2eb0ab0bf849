/* UniQuanF's unified initialisation (ALGORITHM 8 "Unified initialisation").
 *
 * Each (row, group) is independent: min-max uniform scale s and zero z, an
 * optional clipping-ratio search, and for each candidate a BCQ fit of the
 * transformed weights u = w/s + z - c (c = (2^b - 1)/2): greedy start, then
 * alternating refinements of alpha (b x b normal equations, solved exactly
 * by Cholesky) and beta (exhaustive nearest level).  The candidate with the
 * lowest mean |w - w_hat|^2.4 wins.
 *
 * Optional column weights (the diagonal of the layer's Hessian) turn every
 * mean into a weighted mean and the least-squares fit into a weighted one:
 * the weights a Hessian gives the columns are what the layer's output error
 * depends on, and an unweighted fit spends its levels on weights that matter
 * little (see UniQuanFConfig.init_weighting for the measurements).
 *
 * Everything runs in float64 in a fixed operation order (sums sequential in
 * column order, compiled with -ffp-contract=off), the order of
 * decoupleq/reference/bcq.py, so the chosen indices are identical to it.
 * Rows are split over the core's thread pool; the split never changes a
 * result, since rows do not interact.
 */
#include "dq_bcq_init.h"

#include <stdatomic.h>
#include <string.h>

/* Scale floor of the min-max step (the reference's eps): a constant group
 * gets s = 1e-8 instead of 0. */
#define SCALE_FLOOR 1e-8
/* A Cholesky pivot at or below this fraction of its diagonal entry counts as
 * a failure (the sign matrix is rank deficient: two planes equal or
 * opposite); the system is then solved again with RIDGE * g on the diagonal. */
#define PIVOT_TOL 1e-10
#define RIDGE 1e-6
/* The exponent of the candidate-selection error (the reference's lp loss). */
#define SELECT_P 2.4

/* Cholesky solve of the b x b system A x = rhs; 0 on success, -1 if a pivot
 * is not clearly positive (x untouched then). */
static int chol_solve(const double *A, const double *rhs, int b, double *x)
{
    double L[DQ_BCQ_MAX_BITS * DQ_BCQ_MAX_BITS];
    double y[DQ_BCQ_MAX_BITS];
    for (int i = 0; i < b; i++) {
        for (int j = 0; j <= i; j++) {
            double s = A[i * b + j];
            for (int k = 0; k < j; k++) s -= L[i * b + k] * L[j * b + k];
            if (i == j) {
                if (!(s > PIVOT_TOL * A[i * b + i])) return -1;
                L[i * b + i] = sqrt(s);
            } else {
                L[i * b + j] = s / L[j * b + j];
            }
        }
    }
    for (int i = 0; i < b; i++) {
        double s = rhs[i];
        for (int k = 0; k < i; k++) s -= L[i * b + k] * y[k];
        y[i] = s / L[i * b + i];
    }
    for (int i = b - 1; i >= 0; i--) {
        double s = y[i];
        for (int k = i + 1; k < b; k++) s -= L[k * b + i] * x[k];
        x[i] = s / L[i * b + i];
    }
    return 0;
}

/* beta_i of level index k: +1 where bit (b-1-i) of k is 0, else -1. */
static inline int neg_bit(int k, int b, int i) { return (k >> (b - 1 - i)) & 1; }

/* levels[k] = sum_i alpha_i beta_i(k), summed in i order from 0. */
static void make_levels(const double *alpha, int b, double *levels)
{
    const int nl = 1 << b;
    for (int k = 0; k < nl; k++) {
        double v = 0.0;
        for (int i = 0; i < b; i++) v += neg_bit(k, b, i) ? -alpha[i] : alpha[i];
        levels[k] = v;
    }
}

/* First index of the smallest |v - levels[k]|. */
static inline int nearest(double v, const double *levels, int nl)
{
    int best = 0;
    double bd = fabs(v - levels[0]);
    for (int k = 1; k < nl; k++) {
        double d = fabs(v - levels[k]);
        if (d < bd) {
            bd = d;
            best = k;
        }
    }
    return best;
}

/* BCQ fit of u (g values) under column weights d (g values, NULL: all 1,
 * sum_d their sequential sum): alpha (b), shift *delta, indices in idx (g).
 * Weights multiply each squared error; the nearest level does not depend on
 * them. */
static void bcq_fit(const double *u, const double *d, double sum_d, int64_t g, int b, int iters,
                    int fit_shift, double *r, uint8_t *idx, double *alpha, double *delta)
{
    const int nl = 1 << b;
    double levels[1 << DQ_BCQ_MAX_BITS];
    double count[1 << DQ_BCQ_MAX_BITS];

    /* Greedy start: each plane takes the signs of the residual (sign(0) = +1,
     * so every beta is +-1) and the mean magnitude of it. */
    memcpy(r, u, (size_t)g * sizeof *r);
    memset(idx, 0, (size_t)g);
    for (int i = 0; i < b; i++) {
        double s = 0.0;
        for (int64_t j = 0; j < g; j++) s += (d ? d[j] : 1.0) * fabs(r[j]);
        const double a = s / sum_d;
        alpha[i] = a;
        for (int64_t j = 0; j < g; j++) {
            if (r[j] >= 0.0) {
                r[j] -= a;
            } else {
                r[j] += a;
                idx[j] |= (uint8_t)(1u << (b - 1 - i));
            }
        }
    }
    *delta = 0.0;

    for (int t = 0; t < iters; t++) {
        /* Normal equations of alpha for the current signs, on u - delta.
         * B^T D B only depends on the total weight of each pattern. */
        double A[DQ_BCQ_MAX_BITS * DQ_BCQ_MAX_BITS], rhs[DQ_BCQ_MAX_BITS];
        memset(count, 0, (size_t)nl * sizeof *count);
        for (int i = 0; i < b; i++) rhs[i] = 0.0;
        const double d0 = *delta;
        for (int64_t j = 0; j < g; j++) {
            const int k = idx[j];
            const double dj = d ? d[j] : 1.0;
            const double v = dj * (u[j] - d0);
            count[k] += dj;
            for (int i = 0; i < b; i++) rhs[i] += neg_bit(k, b, i) ? -v : v;
        }
        for (int i = 0; i < b; i++)
            for (int l = 0; l < b; l++) {
                double a = 0.0;
                for (int k = 0; k < nl; k++) {
                    const double c = count[k];
                    a += (neg_bit(k, b, i) == neg_bit(k, b, l)) ? c : -c;
                }
                A[i * b + l] = a;
            }
        double x[DQ_BCQ_MAX_BITS];
        if (chol_solve(A, rhs, b, x) != 0) {
            for (int i = 0; i < b; i++) A[i * b + i] += RIDGE * sum_d;
            if (chol_solve(A, rhs, b, x) != 0)
                for (int i = 0; i < b; i++) x[i] = alpha[i]; /* keep the previous alpha */
        }
        /* |alpha| in descending order (insertion sort: b is tiny). */
        for (int i = 0; i < b; i++) {
            double v = fabs(x[i]);
            int p = i;
            while (p > 0 && alpha[p - 1] < v) {
                alpha[p] = alpha[p - 1];
                p--;
            }
            alpha[p] = v;
        }
        make_levels(alpha, b, levels);
        for (int64_t j = 0; j < g; j++) idx[j] = (uint8_t)nearest(u[j] - d0, levels, nl);
        if (fit_shift) {
            double s = 0.0;
            for (int64_t j = 0; j < g; j++) s += (d ? d[j] : 1.0) * (u[j] - levels[idx[j]]);
            *delta = s / sum_d;
        }
    }
}

typedef struct {
    const float *W;
    const float *hdiag; /* (n,) column weights or NULL */
    int64_t m, n, g, G;
    int bits, clip_steps, iters;
    float *S, *Z, *alpha, *delta;
    uint8_t *idx;
    _Atomic int failed; /* an allocation failed in some worker */
} bcq_ctx_t;

static void bcq_range(void *vctx, int64_t begin, int64_t end)
{
    bcq_ctx_t *x = (bcq_ctx_t *)vctx;
    const int64_t g = x->g, G = x->G, n = x->n;
    const int b = x->bits;
    const double c = ((double)((1 << b) - 1)) / 2.0;
    const int K = x->clip_steps > 0 ? x->clip_steps : 1;
    const int fit_shift = x->clip_steps == 0;
    double *u = dq_malloc((size_t)g * sizeof *u);
    double *r = dq_malloc((size_t)g * sizeof *r);
    double *dw = dq_malloc((size_t)g * sizeof *dw);
    uint8_t *cur = dq_malloc((size_t)g);
    double levels[1 << DQ_BCQ_MAX_BITS];
    if (!u || !r || !dw || !cur) {
        atomic_store(&x->failed, 1);
        goto done;
    }
    for (int64_t row = begin; row < end; row++) {
        for (int64_t gi = 0; gi < G; gi++) {
            const float *w = x->W + row * n + gi * g;
            /* Column weights of this group; a group whose weights are all 0
             * is fitted unweighted (no column of it matters more than another). */
            const double *d = NULL;
            double sum_d = (double)g;
            if (x->hdiag) {
                double sd = 0.0;
                for (int64_t j = 0; j < g; j++) {
                    dw[j] = (double)x->hdiag[gi * g + j];
                    sd += dw[j];
                }
                if (sd > 0.0) {
                    d = dw;
                    sum_d = sd;
                }
            }
            float lo = w[0], hi = w[0];
            for (int64_t j = 1; j < g; j++) {
                if (w[j] < lo) lo = w[j];
                if (w[j] > hi) hi = w[j];
            }
            double s0 = ((double)hi - (double)lo) / (double)((1 << b) - 1);
            if (s0 < SCALE_FLOOR) s0 = SCALE_FLOOR;
            double best_err = INFINITY;
            const int64_t o = row * G + gi;
            for (int k = 1; k <= K; k++) {
                const float s = (float)(s0 * (double)k / (double)K);
                const float z = (float)(-(double)lo / (double)s);
                for (int64_t j = 0; j < g; j++) u[j] = (double)w[j] / (double)s + (double)z - c;
                double alpha[DQ_BCQ_MAX_BITS], delta;
                bcq_fit(u, d, sum_d, g, b, x->iters, fit_shift, r, cur, alpha, &delta);
                make_levels(alpha, b, levels);
                double e = 0.0;
                for (int64_t j = 0; j < g; j++) {
                    const double wh = (double)s * (levels[cur[j]] + delta + c - (double)z);
                    e += (d ? d[j] : 1.0) * pow(fabs((double)w[j] - wh), SELECT_P);
                }
                e /= sum_d;
                /* Strictly lower: on a tie the earlier candidate (the smaller
                 * clipping ratio, as in the reference's search) stays. */
                if (k == 1 || e < best_err) {
                    best_err = e;
                    x->S[o] = s;
                    x->Z[o] = z;
                    x->delta[o] = (float)delta;
                    for (int i = 0; i < b; i++) x->alpha[o * b + i] = (float)alpha[i];
                    memcpy(x->idx + row * n + gi * g, cur, (size_t)g);
                }
            }
        }
    }
done:
    dq_free(u);
    dq_free(r);
    dq_free(dw);
    dq_free(cur);
}

dq_status dq_bcq_init(const float *W, const float *hdiag, int64_t m, int64_t n, int64_t g, int bits,
                      int clip_steps, int iters, float *S, float *Z, float *alpha, float *delta,
                      uint8_t *idx)
{
    if (!W || m < 1 || n < 1 || g < 1 || n % g != 0 || bits < 1 || bits > DQ_BCQ_MAX_BITS ||
        clip_steps < 0 || iters < 0)
        return DQ_EINVAL;
    bcq_ctx_t ctx = {W, hdiag, m, n, g, n / g, bits, clip_steps, iters, S, Z, alpha, delta, idx, 0};
    /* About 2^b * (iters + 1) * n flops per row and candidate: a few rows per chunk. */
    int64_t min_chunk = 16384 / n;
    if (min_chunk < 1) min_chunk = 1;
    dq_status st = dq_parallel_for(m, min_chunk, dq_num_threads(), bcq_range, &ctx);
    if (st != DQ_OK) return st;
    return atomic_load(&ctx.failed) ? DQ_ENOMEM : DQ_OK;
}
