/* decoupleQ over BCQ levels (see dq_bcq_solve.h for the contract).
 *
 * Float step.  Row r's weight is B theta with theta = (alpha_{j,0..b-1},
 * delta_j) for each group j (index j (b+1) + i, delta at i = b) and B's
 * column (j, i) the sign plane beta_i restricted to group j (the group's
 * ones for delta).  The normal matrix P = B^T H B couples every pair of
 * groups through H.  Its alpha rows come from x_{j,i} = sum_{c in j}
 * beta_i(c) H[c, j g:] (one pass over group j's rows of H, all planes at
 * once), then P[(j,i),(k,l)] is the sum of x_{j,i} times plane l over group
 * k's columns.  The delta rows need no product per row: 1^T H[j, :] (Hs)
 * and 1^T H_jk 1 (P22) are the same for every row.  Only the upper triangle
 * (in theta order) is assembled, then mirrored: b n^2 / 2 multiply-adds
 * per row, the float step of decoupleQ with b planes instead of one code
 * vector.
 *
 * The system is solved for the update d = theta - theta_cur:
 * P d = y - P theta_cur.  A parameter the row's used sign patterns cannot
 * determine (its column is a combination of the group's earlier columns,
 * tested exactly on the patterns, delta first, then alpha_0, alpha_1, ...)
 * keeps its current value (d = 0).  Keeping it instead of zeroing it costs
 * nothing in this step's objective (the span is the same) and keeps the
 * group's unused levels where they were, so the next assignment can still
 * use them.  As a numerical backstop the system is equilibrated to a unit
 * diagonal and factored by Cholesky; a pivot below PIVOT_RTOL drops its
 * variable the same way (d = 0), and a row whose result is not finite in
 * float32 keeps its current parameters.
 *
 * Assignment.  GPTQ's column sweep, in act-order (decreasing diag H, as
 * decoupleQ's integer step; optional) or natural order, with U the upper
 * Cholesky factor of (H + lambda I)^-1 in that order: each column, with the
 * error feedback of those before it, takes the nearest level of its group; e = (w~ - level) / U_ii and the
 * later columns get w~_t -= e U_it.  float64 throughout, in the twin's
 * operation order, so indices agree with it except where U's last bits
 * decide a tie.
 *
 * Every step's result is scored by the exact objective of its float32
 * parameters (levels rounded as the BCQ format rounds them), and a row
 * keeps its best state: the float step alone can never raise the objective
 * in exact arithmetic, the assignment can.
 *
 * No BLAS in the row loops: OpenBLAS's dgemm rounds differently with
 * another thread count, and a row's best state is chosen by comparing
 * objectives, so every per-row product is written out here (element-wise
 * updates x[t] += s h[t], no reassociation: the same bits whatever the
 * threads).  Rows go in tiles of TILE that share each pass over H or U:
 * the tile only changes the memory traffic, not any result.
 */
#include "dq_bcq_solve.h"
#include "dq_blas.h"
#include "dq_kernels.h"
#include "dq_solver.h"

#include <string.h>

/* Scaled-pivot threshold of the Cholesky backstop (as in dq_float_step.c):
 * the system is equilibrated to a unit diagonal, so a pivot this small is
 * rounding noise once the structural singularities are removed. */
#define PIVOT_RTOL 1e-9
/* Relative tolerance of the exact rank test on +-1 pattern columns: the
 * Gram-Schmidt residuals there are either 0 up to rounding or at least
 * 1/(b+1)^2 of the column's norm, far apart. */
#define RANK_RTOL 1e-9
/* Rows sharing one pass over H or U (see the top of the file), and the
 * columns of H per block of that pass: TILE x COLS float64 accumulators
 * (16 KiB) stay in L1 while H's rows stream by. */
#define TILE 8
#define COLS 256
/* decoupleQ's damping ladder of the sweep's factor (times mean diag H). */
static const double LADDER[] = {0.01, 0.1, 1.0, 10.0, 100.0};

typedef struct {
    const float *W;
    const double *H;
    int64_t m, n, g, G;
    int b, nl;
    int64_t N;          /* (b + 1) G unknowns per row */
    /* working state */
    uint8_t *idx;
    float *alpha, *offset;
    double *e;          /* m: objective of the working state */
    /* best state (the caller's arrays) and its objective */
    uint8_t *best_idx;
    float *best_alpha, *best_offset;
    double *best_err;
    /* precomputed */
    double *V;          /* m x n: W H */
    double *Hs;         /* G x n: Hs[j][d] = sum_{c in j} H[c][d] */
    double *P22;        /* G x G */
    int64_t *perm;      /* n: the sweep's column order (act-order or identity) */
    double *U;          /* n x n upper: (H_perm + lambda I)^-1 = U^T U, sweep order */
    int nomem, interrupted; /* set (relaxed atomics) by any worker */
} ctx_t;

static void set_flag(int *f) { __atomic_store_n(f, 1, __ATOMIC_RELAXED); }

/* beta_i of level index k as +-1.0 (i == b: the group's ones). */
static inline double sgn(int k, int b, int i)
{
    if (i == b) return 1.0;
    return ((k >> (b - 1 - i)) & 1) ? -1.0 : 1.0;
}

/* The 2^b levels of one group, rounded as the BCQ format specifies:
 * ((0 + s_0 alpha_0) + s_1 alpha_1) + ... + offset, in float32. */
static inline void group_levels(const float *alpha, float offset, int b, double *lv)
{
    for (int k = 0; k < (1 << b); k++) {
        float acc = 0.0f;
        for (int i = 0; i < b; i++) acc = acc + (((k >> (b - 1 - i)) & 1) ? -alpha[i] : alpha[i]);
        lv[k] = (double)(acc + offset);
    }
}

/* x[t] += a h[t]: element-wise, vectorisable without reassociation. */
static inline __attribute__((always_inline)) void axpy(double *x, double a, const double *h, int64_t len)
{
    for (int64_t t = 0; t < len; t++) x[t] = x[t] + a * h[t];
}

/* Rows in the tile starting at r0 of [r0, end): TILE, fewer at the end, 0
 * past it or once the user interrupted (the flag is raised for the driver,
 * the loop stops before its next tile).  The row loops step with it:
 *     for (int64_t r0 = begin, T; (T = next_tile(x, r0, end)) > 0; r0 += T) */
static inline int64_t next_tile(ctx_t *x, int64_t r0, int64_t end)
{
    if (r0 >= end) return 0;
    if (dq_interrupted()) {
        set_flag(&x->interrupted);
        return 0;
    }
    return end - r0 < TILE ? end - r0 : TILE;
}

/* A[t, :] = sum_c D[t, c] H[c, :] for the T (<= TILE) rows of a tile, each
 * element summed in c order, COLS columns at a time. */
static inline __attribute__((always_inline)) void rows_times_h(const double *D, int64_t T,
                                                               const double *H, int64_t n, double *A)
{
    for (int64_t b0 = 0; b0 < n; b0 += COLS) {
        const int64_t len = n - b0 < COLS ? n - b0 : COLS;
        for (int64_t t = 0; t < T; t++) memset(A + t * n + b0, 0, sizeof(double) * (size_t)len);
        for (int64_t c = 0; c < n; c++)
            for (int64_t t = 0; t < T; t++) axpy(A + t * n + b0, D[t * n + c], H + c * n + b0, len);
    }
}

/* ---- objective ------------------------------------------------------- */

/* e[r] = d H d^T, d = w_hat - w of the working state, for rows [begin, end):
 * a = sum_c d_c H[c, :] in c order, then sum_t d_t a_t in t order. */
static inline __attribute__((always_inline)) void objective_body(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G;
    const int b = x->b;
    double *D = dq_malloc(sizeof(double) * (size_t)(2 * TILE * n));
    if (!D) {
        set_flag(&x->nomem);
        return;
    }
    double *A = D + TILE * n;
    double lv[1 << DQ_BCQ_SOLVE_MAX_BITS];
    for (int64_t r0 = begin, T; (T = next_tile(x, r0, end)) > 0; r0 += T) {
        for (int64_t t = 0; t < T; t++) {
            const int64_t r = r0 + t;
            double *d = D + t * n;
            for (int64_t j = 0; j < G; j++) {
                group_levels(x->alpha + (r * G + j) * b, x->offset[r * G + j], b, lv);
                for (int64_t c = j * g; c < (j + 1) * g; c++)
                    d[c] = lv[x->idx[r * n + c]] - (double)x->W[r * n + c];
            }
        }
        rows_times_h(D, T, x->H, n, A);
        for (int64_t t = 0; t < T; t++) {
            double s = 0.0;
            for (int64_t c = 0; c < n; c++) s += D[t * n + c] * A[t * n + c];
            x->e[r0 + t] = s;
        }
    }
    dq_free(D);
}

/* V = W H for rows [begin, end) (H symmetric: row r is (H w_r^T)^T). */
static inline __attribute__((always_inline)) void products_body(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n;
    double *D = dq_malloc(sizeof(double) * (size_t)(TILE * n));
    if (!D) {
        set_flag(&x->nomem);
        return;
    }
    for (int64_t r0 = begin, T; (T = next_tile(x, r0, end)) > 0; r0 += T) {
        for (int64_t k = 0; k < T * n; k++) D[k] = (double)x->W[r0 * n + k];
        rows_times_h(D, T, x->H, n, x->V + r0 * n);
    }
    dq_free(D);
}

/* Rows whose working state beats their best take it. */
static void keep_best_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, G = x->G;
    const int b = x->b;
    for (int64_t r = begin; r < end; r++) {
        if (!(x->e[r] < x->best_err[r])) continue;
        x->best_err[r] = x->e[r];
        memcpy(x->best_idx + r * n, x->idx + r * n, (size_t)n);
        memcpy(x->best_alpha + r * G * b, x->alpha + r * G * b, sizeof(float) * (size_t)(G * b));
        memcpy(x->best_offset + r * G, x->offset + r * G, sizeof(float) * (size_t)G);
    }
}

/* ---- float step ------------------------------------------------------ */

/* 1 where column `col` of the group (over the used patterns) is a
 * combination of the kept columns in q (Gram-Schmidt, orthonormal rows). */
static int dependent(const double *col, int np, double *q, int nq)
{
    double v[1 << DQ_BCQ_SOLVE_MAX_BITS], norm0 = 0.0, norm = 0.0;
    for (int p = 0; p < np; p++) {
        v[p] = col[p];
        norm0 += v[p] * v[p];
    }
    for (int t = 0; t < nq; t++) {
        double dot = 0.0;
        for (int p = 0; p < np; p++) dot += q[t * np + p] * v[p];
        for (int p = 0; p < np; p++) v[p] -= dot * q[t * np + p];
    }
    for (int p = 0; p < np; p++) norm += v[p] * v[p];
    if (!(norm > RANK_RTOL * norm0)) return 1;
    const double inv = 1.0 / sqrt(norm);
    for (int p = 0; p < np; p++) q[nq * np + p] = v[p] * inv;
    return 0;
}

/* fixed[j (b+1) + i] = 1 for the parameters of group j that its used
 * patterns leave undetermined (delta tested first, then alpha_0, ...). */
static void structural_fixed(const uint8_t *k_of, int64_t g, int64_t G, int b, uint8_t *fixed)
{
    const int nl = 1 << b;
    for (int64_t j = 0; j < G; j++) {
        int used[1 << DQ_BCQ_SOLVE_MAX_BITS], np = 0;
        uint8_t seen[1 << DQ_BCQ_SOLVE_MAX_BITS] = {0};
        for (int64_t c = j * g; c < (j + 1) * g; c++) seen[k_of[c]] = 1;
        for (int k = 0; k < nl; k++)
            if (seen[k]) used[np++] = k;
        double q[(DQ_BCQ_SOLVE_MAX_BITS + 1) << DQ_BCQ_SOLVE_MAX_BITS];
        double col[1 << DQ_BCQ_SOLVE_MAX_BITS];
        int nq = 0;
        for (int t = 0; t <= b; t++) {
            const int i = t == 0 ? b : t - 1; /* delta, alpha_0, alpha_1, ... */
            for (int p = 0; p < np; p++) col[p] = sgn(used[p], b, i);
            if (dependent(col, np, q, nq)) {
                fixed[j * (b + 1) + i] = 1;
            } else {
                fixed[j * (b + 1) + i] = 0;
                nq++;
            }
        }
    }
}

/* Equilibrated Cholesky solve of P d = rhs (N x N, full symmetric, row
 * major, overwritten); fixed or dropped variables get d = 0.  Returns 0, or
 * -1 if d is not finite. */
static int solve_update(double *P, const double *rhs, int64_t N, const uint8_t *fixed, double *d,
                        double *scale, double *u)
{
    for (int64_t i = 0; i < N; i++) {
        const double p = P[i * N + i];
        scale[i] = (p > 0 && !fixed[i]) ? 1.0 / sqrt(p) : 0.0;
    }
    for (int64_t k = 0; k < N; k++) {
        double *Lk = P + k * N;
        if (scale[k] != 0.0) {
            double s = Lk[k] * scale[k] * scale[k];
            for (int64_t l = 0; l < k; l++) s -= Lk[l] * Lk[l];
            if (s > PIVOT_RTOL) {
                const double piv = sqrt(s);
                Lk[k] = piv;
                for (int64_t i = k + 1; i < N; i++) {
                    double *Li = P + i * N;
                    if (scale[i] == 0.0) {
                        Li[k] = 0.0;
                        continue;
                    }
                    double t = Li[k] * scale[i] * scale[k];
                    for (int64_t l = 0; l < k; l++) t -= Li[l] * Lk[l];
                    Li[k] = t / piv;
                }
                continue;
            }
            scale[k] = 0.0;
        }
        for (int64_t i = k; i < N; i++) P[i * N + k] = 0.0;
    }
    for (int64_t i = 0; i < N; i++) {
        if (scale[i] == 0.0) {
            u[i] = 0.0;
            continue;
        }
        double s = rhs[i] * scale[i];
        for (int64_t l = 0; l < i; l++) s -= P[i * N + l] * u[l];
        u[i] = s / P[i * N + i];
    }
    int ok = 1;
    for (int64_t i = N - 1; i >= 0; i--) {
        if (scale[i] == 0.0) {
            d[i] = 0.0;
            continue;
        }
        double s = u[i];
        for (int64_t l = i + 1; l < N; l++) s -= P[l * N + i] * d[l];
        d[i] = s / P[i * N + i];
    }
    for (int64_t i = 0; i < N; i++) {
        d[i] *= scale[i];
        if (!isfinite(d[i])) ok = 0;
    }
    return ok ? 0 : -1;
}

/* P's delta rows, y, and the solve of one row whose alpha rows of P are
 * assembled (upper triangle); writes the working alpha and offset. */
static void solve_row(ctx_t *x, int64_t r, double *P, double *buf, uint8_t *fixed)
{
    const int64_t n = x->n, g = x->g, G = x->G, N = x->N;
    const int b = x->b, B1 = b + 1;
    const uint8_t *k_of = x->idx + r * n;
    const double *v = x->V + r * n;
    double *y = buf, *th = y + N, *rhs = th + N, *d = rhs + N, *scale = d + N, *u = scale + N;
    /* Delta rows: P[(j,b),(k,l)] for k > j, and (j,b),(j,b). */
    for (int64_t j = 0; j < G; j++) {
        double *prow = P + (j * B1 + b) * N;
        const double *hs = x->Hs + j * n;
        prow[j * B1 + b] = x->P22[j * G + j];
        for (int64_t k = j + 1; k < G; k++) {
            for (int l = 0; l < b; l++) {
                double s = 0.0;
                for (int64_t c = k * g; c < (k + 1) * g; c++) s += hs[c] * sgn(k_of[c], b, l);
                prow[k * B1 + l] = s;
            }
            prow[k * B1 + b] = x->P22[j * G + k];
        }
    }
    for (int64_t p = 0; p < N; p++)
        for (int64_t q = 0; q < p; q++) P[p * N + q] = P[q * N + p];
    for (int64_t j = 0; j < G; j++) {
        for (int i = 0; i <= b; i++) {
            double s = 0.0;
            for (int64_t c = j * g; c < (j + 1) * g; c++) s += sgn(k_of[c], b, i) * v[c];
            y[j * B1 + i] = s;
            th[j * B1 + i] = i < b ? (double)x->alpha[(r * G + j) * b + i] : (double)x->offset[r * G + j];
        }
    }
    for (int64_t p = 0; p < N; p++) {
        double s = y[p];
        for (int64_t q = 0; q < N; q++) s -= P[p * N + q] * th[q];
        rhs[p] = s;
    }
    structural_fixed(k_of, g, G, b, fixed);
    if (solve_update(P, rhs, N, fixed, d, scale, u) != 0) return;
    for (int64_t p = 0; p < N; p++)
        if (!isfinite((float)(th[p] + d[p]))) return;
    for (int64_t j = 0; j < G; j++) {
        for (int i = 0; i < b; i++) x->alpha[(r * G + j) * b + i] = (float)(th[j * B1 + i] + d[j * B1 + i]);
        x->offset[r * G + j] = (float)(th[j * B1 + b] + d[j * B1 + b]);
    }
}

/* The float step of rows [begin, end), a tile at a time: per group j, one
 * pass over H's rows of j gives x_{j,i} for every plane and row of the tile,
 * then P's alpha rows of j. */
static inline __attribute__((always_inline)) void float_body(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G, N = x->N;
    const int b = x->b, B1 = b + 1;
    double *X = dq_malloc(sizeof(double) * (size_t)(TILE * b * COLS));
    double *P = dq_malloc(sizeof(double) * (size_t)(TILE * N * N));
    double *buf = dq_malloc(sizeof(double) * (size_t)(6 * N));
    uint8_t *fixed = dq_malloc((size_t)N);
    if (!X || !P || !buf || !fixed) {
        set_flag(&x->nomem);
        goto done;
    }
    for (int64_t r0 = begin, T; (T = next_tile(x, r0, end)) > 0; r0 += T) {
        memset(P, 0, sizeof(double) * (size_t)(T * N * N));
        for (int64_t j = 0; j < G; j++) {
            const int64_t c0 = j * g;
            for (int64_t b0 = c0; b0 < n; b0 += COLS) {
                const int64_t len = n - b0 < COLS ? n - b0 : COLS;
                memset(X, 0, sizeof(double) * (size_t)(T * b * COLS));
                for (int64_t c = c0; c < c0 + g; c++) {
                    const double *h = x->H + c * n + b0;
                    for (int64_t t = 0; t < T; t++) {
                        const int k = x->idx[(r0 + t) * n + c];
                        for (int i = 0; i < b; i++) axpy(X + (t * b + i) * COLS, sgn(k, b, i), h, len);
                    }
                }
                /* P[(j,i),(k,l)] += x_{j,i}[d] beta_l(d), d in this block, in d order. */
                for (int64_t t = 0; t < T; t++) {
                    const uint8_t *k_of = x->idx + (r0 + t) * n;
                    for (int i = 0; i < b; i++) {
                        const double *xi = X + (t * b + i) * COLS - b0; /* indexed by column */
                        double *prow = P + t * N * N + (j * B1 + i) * N;
                        for (int64_t d = b0; d < b0 + len; d++) {
                            const int64_t k = d / g;
                            const int kd = k_of[d];
                            for (int l = (k == j ? i : 0); l <= b; l++)
                                prow[k * B1 + l] += xi[d] * sgn(kd, b, l);
                        }
                    }
                }
            }
        }
        for (int64_t t = 0; t < T; t++) solve_row(x, r0 + t, P + t * N * N, buf, fixed);
    }
done:
    dq_free(X);
    dq_free(P);
    dq_free(buf);
    dq_free(fixed);
}

/* ---- assignment ------------------------------------------------------ */

/* GPTQ sweep of rows [begin, end), a tile sharing each row of U. */
static inline __attribute__((always_inline)) void sweep_body(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G;
    const int b = x->b, nl = x->nl;
    double *w = dq_malloc(sizeof(double) * (size_t)(TILE * n));
    double *lv = dq_malloc(sizeof(double) * (size_t)(TILE * G * nl));
    if (!w || !lv) {
        set_flag(&x->nomem);
        goto done;
    }
    for (int64_t r0 = begin, T; (T = next_tile(x, r0, end)) > 0; r0 += T) {
        for (int64_t t = 0; t < T; t++) {
            const int64_t r = r0 + t;
            for (int64_t j = 0; j < G; j++)
                group_levels(x->alpha + (r * G + j) * b, x->offset[r * G + j], b, lv + (t * G + j) * nl);
            for (int64_t c = 0; c < n; c++) w[t * n + c] = (double)x->W[r * n + x->perm[c]];
        }
        /* c counts sweep positions; column perm[c] of the weight. */
        for (int64_t c = 0; c < n; c++) {
            const double *Uc = x->U + c * n;
            const int64_t col = x->perm[c];
            for (int64_t t = 0; t < T; t++) {
                double *wt = w + t * n;
                const double *L = lv + (t * G + col / g) * nl;
                int best = 0;
                double bd = fabs(wt[c] - L[0]);
                for (int k = 1; k < nl; k++) {
                    const double dk = fabs(wt[c] - L[k]);
                    if (dk < bd) {
                        bd = dk;
                        best = k;
                    }
                }
                x->idx[(r0 + t) * n + col] = (uint8_t)best;
                axpy(wt + c + 1, -((wt[c] - L[best]) / Uc[c]), Uc + c + 1, n - c - 1);
            }
        }
    }
done:
    dq_free(w);
    dq_free(lv);
}

/* Generic and AVX2 builds of the three row loops: the same code, rounding
 * identically (-ffp-contract=off, no reassociation), so the choice only
 * changes speed. */
static void products_generic(void *x, int64_t b, int64_t e) { products_body(x, b, e); }
static void objective_generic(void *x, int64_t b, int64_t e) { objective_body(x, b, e); }
static void float_generic(void *x, int64_t b, int64_t e) { float_body(x, b, e); }
static void sweep_generic(void *x, int64_t b, int64_t e) { sweep_body(x, b, e); }
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void products_avx2(void *x, int64_t b, int64_t e)
{
    products_body(x, b, e);
}
__attribute__((target("avx2,fma"))) static void objective_avx2(void *x, int64_t b, int64_t e)
{
    objective_body(x, b, e);
}
__attribute__((target("avx2,fma"))) static void float_avx2(void *x, int64_t b, int64_t e)
{
    float_body(x, b, e);
}
__attribute__((target("avx2,fma"))) static void sweep_avx2(void *x, int64_t b, int64_t e)
{
    sweep_body(x, b, e);
}
#endif

/* U upper with (H[perm][:, perm] + lambda I)^-1 = U^T U, lambda = t mean(diag H)
 * for the first t of the ladder where every factorisation succeeds. */
static dq_status inverse_factor(const double *H, int64_t n, const int64_t *perm, double *U)
{
    double mean = 0.0;
    for (int64_t i = 0; i < n; i++) mean += H[i * n + i];
    mean /= (double)n;
    const int ni = (int)n;
    for (size_t t = 0; t < sizeof(LADDER) / sizeof(LADDER[0]); t++) {
        const double lam = LADDER[t] * mean;
        /* Row-major upper triangle == column-major lower: "L" for LAPACK. */
        for (int64_t i = 0; i < n; i++)
            for (int64_t k = 0; k < n; k++)
                U[i * n + k] = k >= i ? H[perm[i] * n + perm[k]] + (k == i ? lam : 0.0) : 0.0;
        int info = 0;
        dq_dpotrf_("L", &ni, U, &ni, &info, 1);
        if (info != 0) continue;
        dq_dpotri_("L", &ni, U, &ni, &info, 1);
        if (info != 0) continue;
        dq_dpotrf_("L", &ni, U, &ni, &info, 1);
        if (info != 0) continue;
        /* Column-major lower L with Hinv = L L^T: row-major that is the upper
         * triangle of L^T =: U with Hinv = U^T U. */
        int ok = 1;
        for (int64_t i = 0; i < n; i++) {
            for (int64_t k = 0; k < i; k++) U[i * n + k] = 0.0;
            for (int64_t k = i; k < n; k++) ok &= isfinite(U[i * n + k]);
            ok &= U[i * n + i] > 0.0;
        }
        if (ok) return DQ_OK;
    }
    return DQ_ENOTPD;
}

/* ---- driver ---------------------------------------------------------- */

static double total(const double *e, int64_t m)
{
    double s = 0.0;
    for (int64_t r = 0; r < m; r++) s += e[r];
    return s;
}

/* One parallel pass over the rows, then the flags its workers raised. */
static dq_status pass(ctx_t *x, dq_range_fn fn, int64_t min_chunk)
{
    dq_status st = dq_parallel_for(x->m, min_chunk, dq_num_threads(), fn, x);
    if (st != DQ_OK) return st;
    if (x->nomem) return DQ_ENOMEM;
    if (x->interrupted || dq_interrupted()) return DQ_EINTR;
    return DQ_OK;
}

dq_status dq_bcq_solve(const float *W, const double *H, int64_t m, int64_t n, int64_t g, int bits,
                       int iters, int act_order, uint8_t *idx, float *alpha, float *offset,
                       double *err, double *history)
{
    if (!W || !H || !idx || !alpha || !offset || !err || m < 1 || n < 1 || g < 1 || n % g != 0 ||
        bits < 1 || bits > DQ_BCQ_SOLVE_MAX_BITS || iters < 0 || n > INT32_MAX)
        return DQ_EINVAL;
    const int64_t G = n / g;
    ctx_t x;
    memset(&x, 0, sizeof(x));
    x.W = W;
    x.H = H;
    x.m = m;
    x.n = n;
    x.g = g;
    x.G = G;
    x.b = bits;
    x.nl = 1 << bits;
    x.N = (int64_t)(bits + 1) * G;
    x.best_idx = idx;
    x.best_alpha = alpha;
    x.best_offset = offset;
    x.best_err = err;
    dq_range_fn products_fn = products_generic, objective_fn = objective_generic, float_fn = float_generic, sweep_fn = sweep_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (dq_solver_simd()) {
        products_fn = products_avx2;
        objective_fn = objective_avx2;
        float_fn = float_avx2;
        sweep_fn = sweep_avx2;
    }
#endif
    dq_status st = DQ_OK;
    x.idx = dq_malloc((size_t)(m * n));
    x.alpha = dq_malloc(sizeof(float) * (size_t)(m * G * bits));
    x.offset = dq_malloc(sizeof(float) * (size_t)(m * G));
    x.e = dq_malloc(sizeof(double) * (size_t)m);
    x.V = dq_malloc(sizeof(double) * (size_t)(m * n));
    x.Hs = dq_malloc(sizeof(double) * (size_t)(G * n));
    x.P22 = dq_malloc(sizeof(double) * (size_t)(G * G));
    x.U = dq_malloc(sizeof(double) * (size_t)(n * n));
    x.perm = dq_malloc(sizeof(int64_t) * (size_t)n);
    if (!x.idx || !x.alpha || !x.offset || !x.e || !x.V || !x.Hs || !x.P22 || !x.U || !x.perm) {
        st = DQ_ENOMEM;
        goto done;
    }
    memcpy(x.idx, idx, (size_t)(m * n));
    memcpy(x.alpha, alpha, sizeof(float) * (size_t)(m * G * bits));
    memcpy(x.offset, offset, sizeof(float) * (size_t)(m * G));
    /* V = W H in the objective's element-wise order (H symmetric). */
    if ((st = pass(&x, products_fn, TILE)) != DQ_OK) goto done;
    for (int64_t j = 0; j < G; j++)
        for (int64_t d = 0; d < n; d++) {
            double s = 0.0;
            for (int64_t c = j * g; c < (j + 1) * g; c++) s += H[c * n + d];
            x.Hs[j * n + d] = s;
        }
    for (int64_t j = 0; j < G; j++)
        for (int64_t k = 0; k < G; k++) {
            double s = 0.0;
            for (int64_t d = k * g; d < (k + 1) * g; d++) s += x.Hs[j * n + d];
            x.P22[j * G + k] = s;
        }
    if (act_order) {
        if ((st = dq_act_order_perm(H, n, x.perm)) != DQ_OK) goto done;
    } else {
        for (int64_t c = 0; c < n; c++) x.perm[c] = c;
    }
    if ((st = inverse_factor(H, n, x.perm, x.U)) != DQ_OK) goto done;

    if ((st = pass(&x, objective_fn, TILE)) != DQ_OK) goto done;
    memcpy(err, x.e, sizeof(double) * (size_t)m);
    if (history) history[0] = total(err, m);
    for (int t = 0; t <= iters; t++) {
        if (t > 0) {
            if ((st = pass(&x, sweep_fn, TILE)) != DQ_OK) goto done;
            if ((st = pass(&x, objective_fn, TILE)) != DQ_OK) goto done;
            if ((st = pass(&x, keep_best_rows, 64)) != DQ_OK) goto done;
        }
        if ((st = pass(&x, float_fn, TILE)) != DQ_OK) goto done;
        if ((st = pass(&x, objective_fn, TILE)) != DQ_OK) goto done;
        if ((st = pass(&x, keep_best_rows, 64)) != DQ_OK) goto done;
        if (history) history[t + 1] = total(err, m);
    }
done:
    dq_free(x.idx);
    dq_free(x.alpha);
    dq_free(x.offset);
    dq_free(x.e);
    dq_free(x.V);
    dq_free(x.Hs);
    dq_free(x.P22);
    dq_free(x.U);
    dq_free(x.perm);
    return st;
}
