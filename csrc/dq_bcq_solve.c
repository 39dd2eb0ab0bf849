/* decoupleQ over BCQ levels (see dq_bcq_solve.h for the contract).
 *
 * Float step.  Row r's weight is B theta with theta = (alpha_{j,0..b-1},
 * delta_j) for each group j (index j (b+1) + i, delta at i = b) and B's
 * column (j, i) the sign plane beta_i restricted to group j (the group's
 * ones for delta).  The normal matrix P = B^T H B couples every pair of
 * groups through H.  Its alpha rows are assembled for a whole block of rows
 * with one dgemm per (group, plane): X = S_ij H[j, j:] (S_ij the block's
 * signs of plane i on group j's columns), then P[(j,i),(k,l)] is the sum of
 * X times plane l over group k's columns.  The delta rows need no product
 * per row: 1^T H[j, :] (Hs) and 1^T H_jk 1 (P22) are the same for every row.
 * Only the upper triangle (in theta order) is assembled, then mirrored.
 * This is b m n^2 / 2 dgemm flops per step, the float step of decoupleQ
 * with b planes instead of one code matrix.
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
 * Assignment.  GPTQ's column sweep with U the upper Cholesky factor of
 * (H + lambda I)^-1: each column, with the error feedback of those before
 * it, takes the nearest level of its group; e = (w~ - level) / U_ii and the
 * later columns get w~_t -= e U_it.  float64 throughout, one row per task,
 * in the same operation order as the twin, so indices agree with it except
 * where U's last bits decide a tie.
 *
 * Every step's result is scored by the exact objective of its float32
 * parameters (levels rounded as the BCQ format rounds them, one dgemm per
 * row block), and a row keeps its best state: the float step alone can
 * never raise the objective in exact arithmetic, the assignment can.
 *
 * Rows never interact; threads split rows (the dgemms use BLAS's own
 * threads), so results do not depend on the thread count.
 */
#include "dq_bcq_solve.h"
#include "dq_blas.h"

#include <string.h>

/* Scaled-pivot threshold of the Cholesky backstop (as in dq_float_step.c):
 * the system is equilibrated to a unit diagonal, so a pivot this small is
 * rounding noise once the structural singularities are removed. */
#define PIVOT_RTOL 1e-9
/* Relative tolerance of the exact rank test on +-1 pattern columns: the
 * Gram-Schmidt residuals there are either 0 up to rounding or at least
 * 1/(b+1)^2 of the column's norm, far apart. */
#define RANK_RTOL 1e-9
/* Working memory of one row block (P, X and the sign buffer). */
#define BLOCK_BUDGET_BYTES ((int64_t)96 << 20)
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
    /* best state (the caller's arrays) and its objective */
    uint8_t *best_idx;
    float *best_alpha, *best_offset;
    double *best_err;
    /* precomputed */
    double *V;          /* m x n: W H */
    double *Hs;         /* G x n: Hs[j][d] = sum_{c in j} H[c][d] */
    double *P22;        /* G x G */
    double *U;          /* n x n upper: (H + lambda I)^-1 = U^T U */
    /* row block */
    int64_t r0, rows;
    double *X;          /* rows x n */
    double *P;          /* rows x N x N */
    double *S;          /* rows x g */
    int64_t j, i;       /* the (group, plane) of X */
    double *e;          /* rows: objective of the working state */
    int nomem, interrupted;
} ctx_t;

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

/* ---- objective ------------------------------------------------------- */

/* X[i] = w_hat - w of the working state, rows [begin, end) of the block. */
static void residual_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G;
    const int b = x->b;
    double lv[1 << DQ_BCQ_SOLVE_MAX_BITS];
    for (int64_t i = begin; i < end; i++) {
        const int64_t r = x->r0 + i;
        double *d = x->X + i * n;
        for (int64_t j = 0; j < G; j++) {
            group_levels(x->alpha + (r * G + j) * b, x->offset[r * G + j], b, lv);
            for (int64_t c = j * g; c < (j + 1) * g; c++)
                d[c] = lv[x->idx[r * n + c]] - (double)x->W[r * n + c];
        }
    }
}

/* e[i] = sum_c D[i, c] (D H)[i, c], summed in column order. */
static void objective_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n;
    for (int64_t i = begin; i < end; i++) {
        const double *d = x->X + i * n, *dh = x->P + i * n;
        double s = 0.0;
        for (int64_t c = 0; c < n; c++) s += d[c] * dh[c];
        x->e[x->r0 + i] = s;
    }
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

/* e of the working state for every row (uses the block buffers X and P). */
static dq_status evaluate(ctx_t *x, int64_t rb)
{
    const int nth = dq_num_threads();
    for (int64_t r0 = 0; r0 < x->m; r0 += rb) {
        if (dq_interrupted()) return DQ_EINTR;
        x->r0 = r0;
        x->rows = x->m - r0 < rb ? x->m - r0 : rb;
        dq_status st = dq_parallel_for(x->rows, 8, nth, residual_rows, x);
        if (st != DQ_OK) return st;
        dq_cblas_dgemm(DqRowMajor, DqNoTrans, DqNoTrans, (int)x->rows, (int)x->n, (int)x->n, 1.0,
                       x->X, (int)x->n, x->H, (int)x->n, 0.0, x->P, (int)x->n);
        st = dq_parallel_for(x->rows, 8, nth, objective_rows, x);
        if (st != DQ_OK) return st;
    }
    return DQ_OK;
}

/* ---- float step ------------------------------------------------------ */

/* P[(j,i),(k,l)] += sum_{d in k} X[d] beta_l(d) for k >= j (upper part). */
static void accumulate_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G, N = x->N, j = x->j, i = x->i;
    const int b = x->b;
    const int64_t ldx = n - j * g;
    for (int64_t t = begin; t < end; t++) {
        const int64_t r = x->r0 + t;
        const double *X = x->X + t * ldx;
        const uint8_t *k_of = x->idx + r * n;
        double *prow = x->P + t * N * N + (j * (b + 1) + i) * N;
        for (int64_t k = j; k < G; k++) {
            /* Within group j only l >= i is in the upper triangle. */
            for (int l = (k == j ? i : 0); l <= b; l++) {
                double s = 0.0;
                for (int64_t c = k * g; c < (k + 1) * g; c++)
                    s += X[c - j * g] * sgn(k_of[c], b, l);
                prow[k * (b + 1) + l] = s;
            }
        }
    }
}

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

/* The delta rows of P, y, and the solve, for rows [begin, end) of the block. */
static void finish_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G, N = x->N;
    const int b = x->b, B1 = b + 1;
    double *buf = dq_malloc(sizeof(double) * (size_t)(6 * N));
    uint8_t *fixed = dq_malloc((size_t)N);
    if (!buf || !fixed) {
        __atomic_store_n(&x->nomem, 1, __ATOMIC_RELAXED);
        dq_free(buf);
        dq_free(fixed);
        return;
    }
    double *y = buf, *th = y + N, *rhs = th + N, *d = rhs + N, *scale = d + N, *u = scale + N;
    for (int64_t t = begin; t < end; t++) {
        const int64_t r = x->r0 + t;
        const uint8_t *k_of = x->idx + r * n;
        const double *v = x->V + r * n;
        double *P = x->P + t * N * N;
        /* Delta rows: P[(j,b),(k,l)] for k > j (and (j,b),(j,b)). */
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
                th[j * B1 + i] = i < b ? (double)x->alpha[(r * G + j) * b + i]
                                       : (double)x->offset[r * G + j];
            }
        }
        for (int64_t p = 0; p < N; p++) {
            double s = y[p];
            for (int64_t q = 0; q < N; q++) s -= P[p * N + q] * th[q];
            rhs[p] = s;
        }
        structural_fixed(k_of, g, G, b, fixed);
        if (solve_update(P, rhs, N, fixed, d, scale, u) != 0) continue;
        int ok = 1;
        for (int64_t p = 0; p < N; p++) ok &= isfinite((float)(th[p] + d[p]));
        if (!ok) continue;
        for (int64_t j = 0; j < G; j++) {
            for (int i = 0; i < b; i++) x->alpha[(r * G + j) * b + i] = (float)(th[j * B1 + i] + d[j * B1 + i]);
            x->offset[r * G + j] = (float)(th[j * B1 + b] + d[j * B1 + b]);
        }
    }
    dq_free(buf);
    dq_free(fixed);
}

static dq_status float_step(ctx_t *x, int64_t rb)
{
    const int64_t n = x->n, g = x->g, G = x->G, N = x->N;
    const int b = x->b, nth = dq_num_threads();
    for (int64_t r0 = 0; r0 < x->m; r0 += rb) {
        x->r0 = r0;
        x->rows = x->m - r0 < rb ? x->m - r0 : rb;
        memset(x->P, 0, sizeof(double) * (size_t)(x->rows * N * N));
        for (int64_t j = 0; j < G; j++) {
            for (int i = 0; i < b; i++) {
                if (dq_interrupted()) return DQ_EINTR;
                for (int64_t t = 0; t < x->rows; t++)
                    for (int64_t c = 0; c < g; c++)
                        x->S[t * g + c] = sgn(x->idx[(r0 + t) * n + j * g + c], b, i);
                dq_cblas_dgemm(DqRowMajor, DqNoTrans, DqNoTrans, (int)x->rows, (int)(n - j * g),
                               (int)g, 1.0, x->S, (int)g, x->H + j * g * n + j * g, (int)n, 0.0,
                               x->X, (int)(n - j * g));
                x->j = j;
                x->i = i;
                dq_status st = dq_parallel_for(x->rows, 8, nth, accumulate_rows, x);
                if (st != DQ_OK) return st;
            }
        }
        if (dq_interrupted()) return DQ_EINTR;
        dq_status st = dq_parallel_for(x->rows, 4, nth, finish_rows, x);
        if (st != DQ_OK) return st;
        if (x->nomem) return DQ_ENOMEM;
    }
    return DQ_OK;
}

/* ---- assignment ------------------------------------------------------ */

static void sweep_rows(void *vctx, int64_t begin, int64_t end)
{
    ctx_t *x = (ctx_t *)vctx;
    const int64_t n = x->n, g = x->g, G = x->G;
    const int b = x->b, nl = x->nl;
    double *w = dq_malloc(sizeof(double) * (size_t)n);
    double *lv = dq_malloc(sizeof(double) * (size_t)(G * nl));
    if (!w || !lv) {
        __atomic_store_n(&x->nomem, 1, __ATOMIC_RELAXED);
        dq_free(w);
        dq_free(lv);
        return;
    }
    for (int64_t r = begin; r < end; r++) {
        if (dq_interrupted()) {
            __atomic_store_n(&x->interrupted, 1, __ATOMIC_RELAXED);
            break;
        }
        for (int64_t j = 0; j < G; j++)
            group_levels(x->alpha + (r * G + j) * b, x->offset[r * G + j], b, lv + j * nl);
        for (int64_t c = 0; c < n; c++) w[c] = (double)x->W[r * n + c];
        for (int64_t c = 0; c < n; c++) {
            const double *L = lv + (c / g) * nl;
            int best = 0;
            double bd = fabs(w[c] - L[0]);
            for (int k = 1; k < nl; k++) {
                const double dk = fabs(w[c] - L[k]);
                if (dk < bd) {
                    bd = dk;
                    best = k;
                }
            }
            x->idx[r * n + c] = (uint8_t)best;
            const double *Uc = x->U + c * n;
            const double e = (w[c] - L[best]) / Uc[c];
            for (int64_t t = c + 1; t < n; t++) w[t] = w[t] - e * Uc[t];
        }
    }
    dq_free(w);
    dq_free(lv);
}

/* U upper with (H + lambda I)^-1 = U^T U, lambda = t mean(diag H) for the
 * first t of the ladder where every factorisation succeeds. */
static dq_status inverse_factor(const double *H, int64_t n, double *U)
{
    double mean = 0.0;
    for (int64_t i = 0; i < n; i++) mean += H[i * n + i];
    mean /= (double)n;
    const int ni = (int)n;
    for (size_t t = 0; t < sizeof(LADDER) / sizeof(LADDER[0]); t++) {
        const double lam = LADDER[t] * mean;
        /* Row-major upper triangle == column-major lower: "L" for LAPACK. */
        for (int64_t i = 0; i < n; i++)
            for (int64_t k = 0; k < n; k++) U[i * n + k] = k >= i ? H[i * n + k] + (k == i ? lam : 0.0) : 0.0;
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

dq_status dq_bcq_solve(const float *W, const double *H, int64_t m, int64_t n, int64_t g, int bits,
                       int iters, uint8_t *idx, float *alpha, float *offset, double *err,
                       double *history)
{
    if (!W || !H || !idx || !alpha || !offset || !err || m < 1 || n < 1 || g < 1 || n % g != 0 ||
        bits < 1 || bits > DQ_BCQ_SOLVE_MAX_BITS || iters < 0 || n > INT32_MAX)
        return DQ_EINVAL;
    const int64_t G = n / g, N = (int64_t)(bits + 1) * G;
    /* Rows per block: P (N^2; the objective reuses it for D H, n), X (n)
     * and S (g), all float64; at least 1. */
    const int64_t pcap = N * N > n ? N * N : n;
    int64_t rb = BLOCK_BUDGET_BYTES / (8 * (pcap + n + g));
    if (rb < 1) rb = 1;
    if (rb > m) rb = m;
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
    x.N = N;
    x.best_idx = idx;
    x.best_alpha = alpha;
    x.best_offset = offset;
    x.best_err = err;
    dq_status st = DQ_OK;
    double *Wd = NULL;
    x.idx = dq_malloc((size_t)(m * n));
    x.alpha = dq_malloc(sizeof(float) * (size_t)(m * G * bits));
    x.offset = dq_malloc(sizeof(float) * (size_t)(m * G));
    x.V = dq_malloc(sizeof(double) * (size_t)(m * n));
    x.Hs = dq_malloc(sizeof(double) * (size_t)(G * n));
    x.P22 = dq_malloc(sizeof(double) * (size_t)(G * G));
    x.U = dq_malloc(sizeof(double) * (size_t)(n * n));
    x.X = dq_malloc(sizeof(double) * (size_t)(rb * n));
    x.P = dq_malloc(sizeof(double) * (size_t)(rb * pcap));
    x.S = dq_malloc(sizeof(double) * (size_t)(rb * g));
    x.e = dq_malloc(sizeof(double) * (size_t)m);
    Wd = dq_malloc(sizeof(double) * (size_t)(m * n));
    if (!x.idx || !x.alpha || !x.offset || !x.V || !x.Hs || !x.P22 || !x.U || !x.X || !x.P || !x.S ||
        !x.e || !Wd) {
        st = DQ_ENOMEM;
        goto done;
    }
    memcpy(x.idx, idx, (size_t)(m * n));
    memcpy(x.alpha, alpha, sizeof(float) * (size_t)(m * G * bits));
    memcpy(x.offset, offset, sizeof(float) * (size_t)(m * G));
    for (int64_t k = 0; k < m * n; k++) Wd[k] = (double)W[k];
    dq_cblas_dgemm(DqRowMajor, DqNoTrans, DqNoTrans, (int)m, (int)n, (int)n, 1.0, Wd, (int)n, H,
                   (int)n, 0.0, x.V, (int)n);
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
    if ((st = inverse_factor(H, n, x.U)) != DQ_OK) goto done;

    const int nth = dq_num_threads();
    if ((st = evaluate(&x, rb)) != DQ_OK) goto done;
    memcpy(err, x.e, sizeof(double) * (size_t)m);
    if (history) history[0] = total(err, m);
    for (int t = 0; t <= iters; t++) {
        if (t > 0) {
            st = dq_parallel_for(m, 1, nth, sweep_rows, &x);
            if (st == DQ_OK && x.nomem) st = DQ_ENOMEM;
            if (st == DQ_OK && (x.interrupted || dq_interrupted())) st = DQ_EINTR;
            if (st != DQ_OK) goto done;
            if ((st = evaluate(&x, rb)) != DQ_OK) goto done;
            if ((st = dq_parallel_for(m, 64, nth, keep_best_rows, &x)) != DQ_OK) goto done;
        }
        if ((st = float_step(&x, rb)) != DQ_OK) goto done;
        if ((st = evaluate(&x, rb)) != DQ_OK) goto done;
        if ((st = dq_parallel_for(m, 64, nth, keep_best_rows, &x)) != DQ_OK) goto done;
        if (history) history[t + 1] = total(err, m);
    }
done:
    dq_free(x.idx);
    dq_free(x.alpha);
    dq_free(x.offset);
    dq_free(x.V);
    dq_free(x.Hs);
    dq_free(x.P22);
    dq_free(x.U);
    dq_free(x.X);
    dq_free(x.P);
    dq_free(x.S);
    dq_free(x.e);
    dq_free(Wd);
    return st;
}
