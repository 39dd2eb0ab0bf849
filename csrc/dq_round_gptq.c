/* GPTQ column sweep with Hessian-inverse error feedback: decoupleQ's
 * integer step (ALGORITHM 2.2) and the reference GPTQ baseline (2.1).
 *
 * Speed (ALGORITHM 6.3, 6.4):
 * - the factor and the act-order permutation are computed once per layer
 *   (dq_gptq_factor) and reused by every sweep;
 * - lazy blocks: inside a block of B columns each row runs its own
 *   quantise-and-update recurrence (rows are independent, so they are split
 *   across threads), and the block's effect on the columns to its right is
 *   one GEMM;
 * - no matrix inverse: GPTQ's recurrence with U (H_round^-1 = U^T U) is
 *   rewritten with R = U^-1, the factor of H_round = R R^T with R upper,
 *   which one Cholesky of the reversed matrix gives.  From Delta = Q - W =
 *   -E U (E the scaled errors), E = -Delta R, and the weight column i sees
 *   when it is quantised is
 *       w~_i = w_i - sum_{k<i} Delta_k R_ki / R_ii,
 *   with e_i = (w~_i - q_i) R_ii.  Same maths as GPTQ's Cholesky -> inverse
 *   -> Cholesky, at n^3/3 flops instead of 4n^3/3, and no explicit inverse;
 *   The one exception is the baseline with dynamic groups: their parameters
 *   are found from GPTQ's partially updated weights w_k - sum_{j<c} e_j U_jk
 *   (k >= c), which only the U form carries, so that case also inverts
 *   the factor (dtrtri) and sweeps with U;
 * - row errors come for free from the sweep: Delta H_round Delta^T =
 *   sum_i e_i^2, so e_r(H00) = sum_i e_i^2 - lambda_extra * ||Delta_r||^2.
 */
#include "dq_solver.h"
#include "dq_blas.h"
#include "dq_kernels.h"
#include "dq_profile.h"

#include <float.h>
#include <string.h>

/* Damping ladders t (times mean(diag H00)) tried in turn. */
static const double LADDER_DECOUPLEQ[] = {0.01, 0.1, 1.0, 10.0, 100.0};
static const double LADDER_BASELINE[] = {0.0, 0.01, 0.1, 1.0, 10.0, 100.0};

/* Rows per thread in a block sweep: below this, starting a thread costs
 * more than the rows' work. */
#define SWEEP_MIN_ROWS 16

/* Safe division of ALGORITHM 1.4 in float32 (plain division whenever
 * |y| >= 1e-15), as in the reference. */
static inline float safe_divf(float x, float y)
{
    float ay = fabsf(y);
    if (!(ay >= 1e-15f)) ay = 1e-15f;
    return x / (y < 0.0f ? -ay : ay);
}

/* ---- the factor -------------------------------------------------------- */

/* Diagonal entry as the factor sees it.  The baseline follows reference
 * GPTQ's dead-input rule: a zero diagonal (a feature that never fired; only
 * possible when H00 was not damped) counts as 1. */
static inline double diag_entry(const double *H, int64_t n, int64_t i, int dead_to_one)
{
    const double d = H[i * n + i];
    return (dead_to_one && d == 0.0) ? 1.0 : d;
}

typedef struct {
    double d;
    int64_t i;
} keyed_t;

/* Descending by value, ties by ascending index: a total order, so the
 * permutation does not depend on the sort's stability. */
static int cmp_desc(const void *pa, const void *pb)
{
    const keyed_t *a = (const keyed_t *)pa, *b = (const keyed_t *)pb;
    if (a->d > b->d) return -1;
    if (a->d < b->d) return 1;
    return (a->i > b->i) - (a->i < b->i);
}

static dq_status make_perm(const double *H, int64_t n, int act_order, int dead_to_one,
                           int64_t *perm)
{
    if (!act_order) {
        for (int64_t i = 0; i < n; i++) perm[i] = i;
        return DQ_OK;
    }
    keyed_t *k = dq_malloc(sizeof(keyed_t) * (size_t)n);
    if (!k) return DQ_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        k[i].d = diag_entry(H, n, i, dead_to_one);
        k[i].i = i;
    }
    qsort(k, (size_t)n, sizeof(keyed_t), cmp_desc);
    for (int64_t i = 0; i < n; i++) perm[i] = k[i].i;
    dq_free(k);
    return DQ_OK;
}

/* One rung: R upper with P H P^T + lam I = R R^T, as N (R with each column
 * divided by its diagonal, float32) and rdiag (diag R).  With J the
 * reversal, J (P H P^T + lam I) J = Lt Lt^T gives R = J Lt J.  Returns 0
 * when the rung factors. */
static int factor_rung(const double *H, int64_t n, const int64_t *perm, int dead_to_one,
                       double lam, double tol, double *M, double *d, float *N, float *rdiag,
                       float *U)
{
    /* Row-major lower triangle of M = J P H P^T J + lam I (what LAPACK sees
     * as the column-major upper triangle). */
    for (int64_t i = 0; i < n; i++) {
        const double *hrow = H + perm[n - 1 - i] * n;
        double *mrow = M + i * n;
        for (int64_t j = 0; j < i; j++) mrow[j] = hrow[perm[n - 1 - j]];
        mrow[i] = diag_entry(H, n, perm[n - 1 - i], dead_to_one) + lam;
    }
    const int ni = (int)n;
    int info = 0;
    dq_blas_serial_begin(); /* threaded dpotrf rounds differently with 2 threads (n = 2048) */
    dq_dpotrf_("U", &ni, M, &ni, &info, 1);
    dq_blas_serial_end();
    if (info != 0) return -1;
    /* d[i] = R_ii.  A pivot at rounding-noise level means H_round is
     * singular in float64: the factor would be noise, so take the next rung
     * instead. */
    for (int64_t i = 0; i < n; i++) {
        const double p = M[(n - 1 - i) * n + (n - 1 - i)];
        if (!(p > 0.0) || !(p * p > tol) || !isfinite(p) || !isfinite((float)p)) return -1;
        d[i] = p;
        rdiag[i] = (float)p;
    }
    for (int64_t i = 0; i < n; i++) {
        const double *lrow = M + (n - 1 - i) * n;
        float *nrow = N + i * n;
        for (int64_t j = 0; j < i; j++) nrow[j] = 0.0f;
        for (int64_t j = i; j < n; j++) {
            const float v = (float)(lrow[n - 1 - j] / d[j]);
            if (!isfinite(v)) return -1;
            nrow[j] = v;
        }
    }
    if (!U) return 0;
    /* U = R^-1 = J Lt^-1 J. */
    dq_blas_serial_begin();
    dq_dtrtri_("U", "N", &ni, M, &ni, &info, 1, 1);
    dq_blas_serial_end();
    if (info != 0) return -1;
    for (int64_t i = 0; i < n; i++) {
        const double *lrow = M + (n - 1 - i) * n;
        float *urow = U + i * n;
        for (int64_t j = 0; j < i; j++) urow[j] = 0.0f;
        for (int64_t j = i; j < n; j++) {
            const float v = (float)lrow[n - 1 - j];
            if (!isfinite(v)) return -1;
            urow[j] = v;
        }
    }
    return 0;
}

dq_status dq_act_order_perm(const double *H, int64_t n, int64_t *perm)
{
    return make_perm(H, n, 1, 0, perm);
}

dq_status dq_gptq_factor(const dq_layer_t *L, int act_order, int decoupleq_damping,
                         dq_gptq_factor_t *F)
{
    memset(F, 0, sizeof(*F));
    const int64_t n = L->n;
    if (!L->H || n < 1 || n > INT32_MAX) return DQ_EINVAL;
    dq_status st = DQ_OK;
    double *M = NULL, *d = NULL;
    F->n = n;
    F->act_order = act_order ? 1 : 0;
    F->perm = dq_malloc(sizeof(int64_t) * (size_t)n);
    F->N = dq_malloc(sizeof(float) * (size_t)(n * n));
    F->rdiag = dq_malloc(sizeof(float) * (size_t)n);
    M = dq_malloc(sizeof(double) * (size_t)(n * n));
    d = dq_malloc(sizeof(double) * (size_t)n);
    if (!F->perm || !F->N || !F->rdiag || !M || !d) {
        st = DQ_ENOMEM;
        goto fail;
    }
    if (!decoupleq_damping && !act_order && L->G > 1) {
        F->U = dq_malloc(sizeof(float) * (size_t)(n * n));
        if (!F->U) {
            st = DQ_ENOMEM;
            goto fail;
        }
    }
    const int dead_to_one = !decoupleq_damping;
    if ((st = make_perm(L->H, n, act_order, dead_to_one, F->perm)) != DQ_OK) goto fail;

    double sum = 0.0, dmax = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = diag_entry(L->H, n, i, dead_to_one);
        sum += d;
        if (fabs(d) > dmax) dmax = fabs(d);
    }
    const double mean = sum / (double)n;
    const double *ladder = decoupleq_damping ? LADDER_DECOUPLEQ : LADDER_BASELINE;
    const int rungs = decoupleq_damping ? 5 : 6;
    for (int k = 0; k < rungs; k++) {
        const double lam = ladder[k] * mean;
        if (!isfinite(lam)) break;
        const double tol = (double)n * DBL_EPSILON * (dmax + fabs(lam));
        if (factor_rung(L->H, n, F->perm, dead_to_one, lam, tol, M, d, F->N, F->rdiag, F->U) == 0) {
            F->lambda_extra = lam;
            dq_free(M);
            dq_free(d);
            return DQ_OK;
        }
    }
    st = DQ_ENOTPD;
fail:
    dq_free(M);
    dq_free(d);
    dq_gptq_factor_free(F);
    return st;
}

void dq_gptq_factor_free(dq_gptq_factor_t *F)
{
    if (!F) return;
    dq_free(F->perm);
    dq_free(F->N);
    dq_free(F->rdiag);
    dq_free(F->U);
    F->U = NULL;
    F->perm = NULL;
    F->N = NULL;
    F->rdiag = NULL;
}

/* ---- the sweep ---------------------------------------------------------- */

typedef struct {
    const dq_layer_t *L;
    const dq_gptq_factor_t *F;
    const int64_t *gcol; /* natural group of each permuted column */
    int identity;        /* perm is the identity */
    float *Wp;           /* m x n working weights, permuted order, updated in place */
    const float *W0;     /* m x n original weights, permuted order (L->W if identity) */
    float *E;            /* m x B: what the block feeds forward (Delta, or e in U form) */
    const float *Mf;     /* the matrix it is fed forward with: N, or U in U form */
    int u_form;
    int64_t B, i1, cnt;  /* block [i1, i1 + cnt) */
    int8_t *A;           /* m x n codes, natural order */
    int8_t *Ap;          /* m x n codes, permuted order (A if identity) */
    double *esum, *dsum; /* per row: sum e_i^2 and ||Q - W||^2 */
    double *wd;          /* per row: sum_j w_j^2 H_jj, for the identity's accuracy */
    const double *hdiag; /* diag H00, permuted order */
    /* decoupleQ step: fixed parameters */
    const float *S, *Z;
    /* baseline: parameters found during the sweep (S is the output) */
    float *Sb;
    int32_t *zeta;
    int static_groups;
} sweep_t;

/* Copy W into permuted column order: the working copy, and (with a real
 * permutation) the original too, so the sweep reads both contiguously. */
static void permute_range(void *vctx, int64_t begin, int64_t end)
{
    const sweep_t *x = (const sweep_t *)vctx;
    const int64_t n = x->L->n;
    const int64_t *perm = x->F->perm;
    for (int64_t r = begin; r < end; r++) {
        const float *w = x->L->W + r * n;
        float *wp = x->Wp + r * n;
        if (x->identity) {
            memcpy(wp, w, sizeof(float) * (size_t)n);
            continue;
        }
        float *w0 = (float *)x->W0 + r * n;
        for (int64_t j = 0; j < n; j++) w0[j] = w[perm[j]];
        memcpy(wp, w0, sizeof(float) * (size_t)n);
    }
}

static void unpermute_codes_range(void *vctx, int64_t begin, int64_t end)
{
    const sweep_t *x = (const sweep_t *)vctx;
    const int64_t n = x->L->n;
    const int64_t *perm = x->F->perm;
    for (int64_t r = begin; r < end; r++) {
        const int8_t *ap = x->Ap + r * n;
        int8_t *a = x->A + r * n;
        for (int64_t j = 0; j < n; j++) a[perm[j]] = ap[j];
    }
}

/* The rest of the block's row takes column c's correction: x[k] -= e * u[k]. */
static inline __attribute__((always_inline)) void row_update(float *restrict x,
                                                             const float *restrict u, float e,
                                                             int64_t len)
{
    for (int64_t k = 0; k < len; k++) x[k] -= e * u[k];
}

/* Rows are swept ROW_TILE at a time, column by column: each column's
 * quantisation is a chain of dependent scalar operations (divide, round,
 * clamp, dequantise) that would stall one row; the tile's rows give the CPU
 * independent chains to overlap. */
#define ROW_TILE 8

/* decoupleQ's step on rows [r0, r0 + nr) of the current block. */
static inline __attribute__((always_inline)) void round_tile(const sweep_t *x, int64_t r0,
                                                             int64_t nr)
{
    const dq_layer_t *L = x->L;
    const int64_t n = L->n, G = L->G, i1 = x->i1, cnt = x->cnt, B = x->B;
    const float *N = x->F->N, *rdiag = x->F->rdiag;
    const int64_t *gcol = x->gcol;
    const double *hdiag = x->hdiag;
    const float qmin = (float)L->qmin, qmax = (float)L->qmax;
    const int sym = L->symmetric, rule = L->rule;
    double es[ROW_TILE] = {0}, ds[ROW_TILE] = {0}, wd[ROW_TILE] = {0};
    float dv[ROW_TILE];
    for (int64_t j = 0; j < cnt; j++) {
        const int64_t c = i1 + j, gi = gcol[c];
        const float rd = rdiag[c];
        const double hd = hdiag[c];
        for (int64_t t = 0; t < nr; t++) {
            const int64_t r = r0 + t;
            const float s = x->S[r * G + gi], z = sym ? 0.0f : x->Z[r * G + gi];
            const float w = x->Wp[r * n + c], w0 = x->W0[r * n + c];
            float q = dq_round(safe_divf(sym ? w : w - z, s), rule);
            /* Written so a NaN lands on qmin: the int8 cast below is then
             * defined for every input (the boundary reports the NaN). */
            if (!(q >= qmin)) q = qmin;
            if (q > qmax) q = qmax;
            const float Q = s * q + z;
            const float dj = Q - w0;
            const float ej = (w - Q) * rd;
            dv[t] = dj;
            x->E[r * B + j] = dj;
            x->Ap[r * n + c] = (int8_t)q;
            es[t] += (double)ej * (double)ej;
            const double d = (double)Q - (double)w0;
            ds[t] += d * d;
            wd[t] += (double)w0 * (double)w0 * hd;
        }
        for (int64_t t = 0; t < nr; t++)
            row_update(x->Wp + (r0 + t) * n + c + 1, N + c * n + c + 1, dv[t], cnt - j - 1);
    }
    for (int64_t t = 0; t < nr; t++) {
        x->esum[r0 + t] += es[t];
        x->dsum[r0 + t] += ds[t];
        x->wd[r0 + t] += wd[t];
    }
}

static void round_range_generic(void *vctx, int64_t begin, int64_t end)
{
    for (int64_t r = begin; r < end; r += ROW_TILE)
        round_tile((const sweep_t *)vctx, r, end - r < ROW_TILE ? end - r : ROW_TILE);
}

/* The same code compiled for AVX2: 8-wide updates and a one-instruction
 * floor; without FMA contraction (-ffp-contract=off) every operation rounds
 * as in the generic build, so the results are bit-identical. */
__attribute__((target("avx2,fma"))) static void round_range_avx2(void *vctx, int64_t begin,
                                                                 int64_t end)
{
    for (int64_t r = begin; r < end; r += ROW_TILE)
        round_tile((const sweep_t *)vctx, r, end - r < ROW_TILE ? end - r : ROW_TILE);
}

/* GPTQ's min-max quantiser of one group, on the unsigned grid 0..maxq with
 * an integer zero (ALGORITHM 2.1 step 2). */
static void baseline_params(const float *w, int64_t len, const dq_layer_t *L, float *s_out,
                            int32_t *zeta_out)
{
    const float maxq = (float)((1 << L->bits) - 1);
    float lo = 0.0f, hi = 0.0f;
    for (int64_t c = 0; c < len; c++) {
        if (w[c] < lo) lo = w[c];
        if (w[c] > hi) hi = w[c];
    }
    if (L->symmetric) {
        if (-lo > hi) hi = -lo;
        if (lo < 0.0f) lo = -hi;
    }
    if (lo == 0.0f && hi == 0.0f) {
        lo = -1.0f;
        hi = 1.0f;
    }
    const float s = (hi - lo) / maxq;
    float zeta;
    if (L->symmetric) {
        zeta = (float)(1 << (L->bits - 1));
    } else {
        /* -lo/s lies in [0, maxq] up to rounding: the clamp never binds
         * on a normal scale and keeps the int cast defined on a tiny one. */
        zeta = dq_round(safe_divf(-lo, s), L->rule);
        if (!(zeta >= 0.0f)) zeta = 0.0f;
        if (zeta > maxq) zeta = maxq;
    }
    *s_out = s;
    *zeta_out = (int32_t)zeta;
}

static void static_params_range(void *vctx, int64_t begin, int64_t end)
{
    const sweep_t *x = (const sweep_t *)vctx;
    const dq_layer_t *L = x->L;
    for (int64_t r = begin; r < end; r++)
        for (int64_t j = 0; j < L->G; j++)
            baseline_params(L->W + r * L->n + j * L->g, dq_group_width(L->n, L->g, j), L,
                            x->Sb + r * L->G + j, x->zeta + r * L->G + j);
}

/* The GPTQ baseline on rows [r0, r0 + nr) of the current block. */
static inline __attribute__((always_inline)) void baseline_tile(const sweep_t *x, int64_t r0,
                                                                int64_t nr)
{
    const dq_layer_t *L = x->L;
    const int64_t n = L->n, G = L->G, g = L->g, i1 = x->i1, cnt = x->cnt, B = x->B;
    const float *Mf = x->Mf, *rdiag = x->F->rdiag;
    const int64_t *gcol = x->gcol;
    const double *hdiag = x->hdiag;
    const float maxq = (float)((1 << L->bits) - 1);
    const int qmin = L->qmin, rule = L->rule, u_form = x->u_form;
    double es[ROW_TILE] = {0}, ds[ROW_TILE] = {0}, wd[ROW_TILE] = {0};
    float dv[ROW_TILE];
    for (int64_t j = 0; j < cnt; j++) {
        const int64_t c = i1 + j, gi = gcol[c];
        const float rd = rdiag[c];
        const double hd = hdiag[c];
        /* Dynamic groups start from the current weights: the block layout
         * guarantees every column of the group has received all the
         * updates of the columns before it. */
        if (!x->static_groups && c % g == 0)
            for (int64_t t = 0; t < nr; t++)
                baseline_params(x->Wp + (r0 + t) * n + c, dq_group_width(n, g, c / g), L,
                                x->Sb + (r0 + t) * G + c / g, x->zeta + (r0 + t) * G + c / g);
        for (int64_t t = 0; t < nr; t++) {
            const int64_t r = r0 + t;
            const float s = x->Sb[r * G + gi];
            const int32_t zi = x->zeta[r * G + gi];
            const float w = x->Wp[r * n + c], w0 = x->W0[r * n + c];
            float qu = dq_round(safe_divf(w, s), rule) + (float)zi;
            /* NaN-safe clamp: the int cast below is defined for every input. */
            if (!(qu >= 0.0f)) qu = 0.0f;
            if (qu > maxq) qu = maxq;
            /* Dequantise in the output's own convention (signed code, float
             * zero) so the sweep feeds back exactly what the caller gets. */
            const int a = (int)qu + qmin;
            const float z = s * (float)(-(qmin + zi));
            const float Q = s * (float)a + z;
            const float dj = Q - w0;
            const float ej = (w - Q) * rd;
            const float v = u_form ? ej : dj;
            dv[t] = v;
            x->E[r * B + j] = v;
            x->Ap[r * n + c] = (int8_t)a;
            es[t] += (double)ej * (double)ej;
            const double d = (double)Q - (double)w0;
            ds[t] += d * d;
            wd[t] += (double)w0 * (double)w0 * hd;
        }
        for (int64_t t = 0; t < nr; t++)
            row_update(x->Wp + (r0 + t) * n + c + 1, Mf + c * n + c + 1, dv[t], cnt - j - 1);
    }
    for (int64_t t = 0; t < nr; t++) {
        x->esum[r0 + t] += es[t];
        x->dsum[r0 + t] += ds[t];
        x->wd[r0 + t] += wd[t];
    }
}

static void baseline_range_generic(void *vctx, int64_t begin, int64_t end)
{
    for (int64_t r = begin; r < end; r += ROW_TILE)
        baseline_tile((const sweep_t *)vctx, r, end - r < ROW_TILE ? end - r : ROW_TILE);
}

__attribute__((target("avx2,fma"))) static void baseline_range_avx2(void *vctx, int64_t begin,
                                                                    int64_t end)
{
    for (int64_t r = begin; r < end; r += ROW_TILE)
        baseline_tile((const sweep_t *)vctx, r, end - r < ROW_TILE ? end - r : ROW_TILE);
}

/* End of the block starting at i1.  With dynamic groups the block is cut at
 * group boundaries so a group's parameters always see fully updated
 * weights: groups no wider than B lie inside one block, wider ones start a
 * block. */
static int64_t block_end(int64_t i1, int64_t B, int64_t n, int64_t g, int cut_at_groups)
{
    int64_t end = i1 + B < n ? i1 + B : n;
    /* A block that reaches n ends with the last (possibly short) group. */
    if (cut_at_groups && end < n) {
        const int64_t gb = (end / g) * g;
        if (gb > i1) end = gb;
    }
    return end;
}

/* x->wd (m, zeroed) is the caller's. */
static dq_status sweep(sweep_t *x, dq_range_fn fn, int cut_at_groups, double *err)
{
    const dq_layer_t *L = x->L;
    const int64_t m = L->m, n = L->n;
    const int nt = dq_num_threads();
    const int64_t *perm = x->F->perm;
    dq_status st = DQ_OK;
    float *W0 = NULL;
    int8_t *Ap = NULL;
    x->identity = 1;
    for (int64_t c = 0; c < n; c++)
        if (perm[c] != c) x->identity = 0;
    x->Wp = dq_malloc(sizeof(float) * (size_t)(m * n));
    x->E = dq_malloc(sizeof(float) * (size_t)(m * x->B));
    x->esum = dq_calloc(sizeof(double) * (size_t)m);
    x->dsum = dq_calloc(sizeof(double) * (size_t)m);
    int64_t *gcol = dq_malloc(sizeof(int64_t) * (size_t)n);
    double *hdiag = dq_malloc(sizeof(double) * (size_t)n);
    if (!x->identity) {
        W0 = dq_malloc(sizeof(float) * (size_t)(m * n));
        Ap = dq_malloc((size_t)(m * n));
    }
    if (!x->Wp || !x->E || !x->esum || !x->dsum || !gcol || !hdiag ||
        (!x->identity && (!W0 || !Ap))) {
        st = DQ_ENOMEM;
        goto done;
    }
    x->W0 = x->identity ? L->W : W0;
    x->Ap = x->identity ? x->A : Ap;
    for (int64_t c = 0; c < n; c++) hdiag[c] = L->H[perm[c] * n + perm[c]];
    x->hdiag = hdiag;
    for (int64_t c = 0; c < n; c++) gcol[c] = x->F->perm[c] / L->g;
    x->gcol = gcol;
    dq_parallel_for(m, SWEEP_MIN_ROWS, nt, permute_range, x);
    for (int64_t i1 = 0; i1 < n;) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto done;
        }
        const int64_t i2 = block_end(i1, x->B, n, L->g, cut_at_groups);
        x->i1 = i1;
        x->cnt = i2 - i1;
        dq_parallel_for(m, SWEEP_MIN_ROWS, nt, fn, x);
        if (i2 < n)
            dq_sgemm_rows(m, n - i2, x->cnt, -1.0f, x->E, x->B, x->Mf + i1 * n + i2, n, 1.0f,
                          x->Wp + i2, n);
        i1 = i2;
    }
    if (!x->identity) dq_parallel_for(m, SWEEP_MIN_ROWS, nt, unpermute_codes_range, x);
    const double lam = x->F->lambda_extra;
    for (int64_t r = 0; r < m; r++) err[r] = x->esum[r] - lam * x->dsum[r];
done:
    dq_free(W0);
    dq_free(Ap);
    x->W0 = NULL;
    x->Ap = NULL;
    dq_free(x->Wp);
    dq_free(x->E);
    dq_free(x->esum);
    dq_free(x->dsum);
    dq_free(gcol);
    dq_free(hdiag);
    x->Wp = x->E = NULL;
    x->esum = x->dsum = NULL;
    return st;
}

/* The identity's error comes from the float32 recurrence: its rounding noise
 * in the updated weights is about eps*|w|, while Delta shrinks with the grid
 * step, so at high bit widths the identity loses digits (2 bits: ~1e-6
 * relative; 8 bits: up to ~5e-4).  On synthetic layers (n = 33..512, bits
 * 2..8, with and without act-order) the relative error stayed below
 * 15 * eps * sqrt(sum_j w_j^2 H_jj / e_r); rows where 32 times that estimate
 * exceeds IDENTITY_TOL are measured directly with one GEMM on those rows.
 * The same tolerance as the float step's update (UPDATE_RTOL, which says why
 * 2e-4 and not the GEMM's own noise level). */
#define IDENTITY_TOL 2e-4
#define IDENTITY_SAFETY 32.0

/* err_ref (NULL, or m): a row whose identity error is above err_ref[r] by
 * more than its estimated noise keeps the identity value (still above
 * err_ref[r]): a caller that only takes rows below err_ref does not need it
 * exact. */
static dq_status refine_errors(const dq_layer_t *L, const double *wd, const int8_t *A,
                               const float *S, const float *Z, const double *err_ref,
                               double *err)
{
    const int64_t m = L->m;
    int64_t *rows = dq_malloc(sizeof(int64_t) * (size_t)m);
    if (!rows) return DQ_ENOMEM;
    int64_t k = 0;
    const double eps = (double)FLT_EPSILON / 2.0;
    for (int64_t r = 0; r < m; r++) {
        const double est = IDENTITY_SAFETY * eps * sqrt(wd[r] / err[r]);
        if (err[r] > 0.0 && est <= IDENTITY_TOL) continue;
        if (err_ref && err[r] > 0.0 && est < 0.5 && err[r] * (1.0 - est) >= err_ref[r]) continue;
        rows[k++] = r;
    }
    dq_status st = dq_row_errors_rows(L, rows, k, A, S, Z, err);
    dq_free(rows);
    return st;
}

static int64_t clamp_block(int64_t blocksize, int64_t n)
{
    return blocksize > n ? n : blocksize;
}

dq_status dq_round_gptq(const dq_layer_t *L, const dq_gptq_factor_t *F, const float *S,
                        const float *Z, int64_t blocksize, int8_t *A, double *err)
{
    return dq_round_gptq_vs(L, F, S, Z, blocksize, NULL, A, err);
}

dq_status dq_round_gptq_vs(const dq_layer_t *L, const dq_gptq_factor_t *F, const float *S,
                           const float *Z, int64_t blocksize, const double *err_ref, int8_t *A,
                           double *err)
{
    if (blocksize < 1 || !F || F->n != L->n || !F->N || !F->perm) return DQ_EINVAL;
    sweep_t x;
    memset(&x, 0, sizeof(x));
    x.L = L;
    x.F = F;
    x.B = clamp_block(blocksize, L->n);
    x.A = A;
    x.S = S;
    x.Z = Z;
    x.Mf = F->N;
    x.wd = dq_calloc(sizeof(double) * (size_t)L->m);
    if (!x.wd) return DQ_ENOMEM;
    const int prof = dq_profile_on();
    double t0 = dq_wall_seconds();
    dq_status st = sweep(&x, dq_solver_simd() ? round_range_avx2 : round_range_generic, 0, err);
    dq_profile_lap(prof, &t0, "  (its sweep)", -1);
    if (st == DQ_OK) st = refine_errors(L, x.wd, A, S, L->symmetric ? NULL : Z, err_ref, err);
    dq_profile_lap(prof, &t0, "  (its refine)", -1);
    dq_free(x.wd);
    return st;
}

dq_status dq_gptq_baseline(const dq_layer_t *L, const dq_gptq_factor_t *F, int64_t blocksize,
                           int8_t *A, float *S, float *Z, double *err)
{
    if (blocksize < 1 || !F || F->n != L->n || !F->N || !F->perm || !L->H) return DQ_EINVAL;
    const int64_t m = L->m, n = L->n, G = L->G;
    dq_status st = DQ_OK;
    float *Wd = NULL;
    dq_layer_t Ld = *L;
    /* Reference GPTQ zeroes the weights of dead inputs (zero diagonal, also
     * treated as 1 by the factor).  The sweep then runs on those weights and
     * the error identity no longer refers to W, so errors are measured
     * directly; dead inputs only occur with an undamped H00. */
    int64_t n_dead = 0;
    for (int64_t c = 0; c < n; c++) n_dead += L->H[c * n + c] == 0.0;
    if (n_dead) {
        Wd = dq_malloc(sizeof(float) * (size_t)(m * n));
        if (!Wd) return DQ_ENOMEM;
        memcpy(Wd, L->W, sizeof(float) * (size_t)(m * n));
        for (int64_t c = 0; c < n; c++)
            if (L->H[c * n + c] == 0.0)
                for (int64_t r = 0; r < m; r++) Wd[r * n + c] = 0.0f;
        Ld.W = Wd;
    }
    sweep_t x;
    memset(&x, 0, sizeof(x));
    x.L = &Ld;
    x.F = F;
    x.B = clamp_block(blocksize, n);
    x.A = A;
    x.Sb = S;
    x.zeta = dq_malloc(sizeof(int32_t) * (size_t)(m * G));
    x.wd = dq_calloc(sizeof(double) * (size_t)m);
    if (!x.zeta || !x.wd) {
        st = DQ_ENOMEM;
        goto done;
    }
    /* With act-order, groups of permuted columns would need a g_idx at
     * inference: the parameters come from the original W's natural groups
     * instead.  Per-channel, the one group sees the original W either way. */
    x.static_groups = F->act_order && G > 1;
    x.u_form = !x.static_groups && G > 1;
    x.Mf = x.u_form ? F->U : F->N;
    if (!x.Mf) {
        st = DQ_EINVAL; /* dynamic groups need the factor made for the baseline */
        goto done;
    }
    if (x.static_groups)
        dq_parallel_for(m, SWEEP_MIN_ROWS, dq_num_threads(), static_params_range, &x);
    if ((st = sweep(&x, dq_solver_simd() ? baseline_range_avx2 : baseline_range_generic,
                    !x.static_groups, err)) != DQ_OK)
        goto done;
    for (int64_t i = 0; i < m * G; i++) Z[i] = S[i] * (float)(-(L->qmin + x.zeta[i]));
    st = n_dead ? dq_row_errors(L, A, S, Z, err) : refine_errors(L, x.wd, A, S, Z, NULL, err);
done:
    dq_free(x.zeta);
    dq_free(x.wd);
    dq_free(Wd);
    return st;
}
