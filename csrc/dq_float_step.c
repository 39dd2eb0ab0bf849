/* Closed-form float step of decoupleQ (ALGORITHM 3.6, 6.1-6.2).
 *
 * Given the codes A, each row's dequantised weight is linear in its float
 * parameters theta = (s_1..s_G, z_1..z_G) (symmetric: s only), so the best
 * theta solves the normal equations P theta = y with
 *   P11[j,k] = a_j^T H_jk a_k   P12[j,k] = a_j^T H_jk 1   P22[j,k] = 1^T H_jk 1
 *   y1[j] = sum_{c in j} v_c a_c   y2[j] = sum_{c in j} v_c      (v = w H)
 * The returned errors are those of the float32 (S, Z), recomputed by
 * dq_row_errors (see the note at the end of dq_float_step).
 *
 * Assembly without any m x G x n temporary: rows are processed in blocks of
 * mb; for each column block b (the group for G > 1, 256 columns per channel)
 * one sgemm T = A[:, b] Hf[b, b0:] gives a_b^T H_{b,k} for every k at or
 * after b, which is all P11 needs because P11 is symmetric (half the flops of
 * A*H).  P12 and P22 come from Hs (n x G column-group sums of H, float64).
 * Working memory is O(mb * n + mb * N^2), N = 2G.
 *
 * Singular systems.  The only exact singularities are groups whose codes are
 * all equal: a_j = q 1 makes s_j and z_j interchangeable (q != 0) or s_j
 * meaningless (q == 0).  Those are detected exactly on the integer codes and
 * the redundant variable is fixed at 0 (z_j when q != 0, s_j when q == 0):
 * the fit of every other parameter stays exactly optimal, and the group is
 * still represented exactly (s_j = const/q, or z_j = const).  As a numerical
 * backstop the system is equilibrated to a unit diagonal and factored by
 * Cholesky; a pivot below PIVOT_RTOL (relative to that unit diagonal) drops
 * its variable the same way.  This differs on purpose from the reference,
 * which clamps |det| of the 2x2 system at an ABSOLUTE 1e-5 (scale dependent:
 * it distorts small-scale layers) and damps a failed per-group LU by
 * 0.01 mean(diag P), which biases every parameter of the row.  A row whose
 * solution is still not finite (only possible if H00 is not positive
 * definite, or beyond float32) falls back to theta = 0 (S = Z = 0).
 */
#include "dq_solver.h"
#include "dq_blas.h"
#include "dq_profile.h"
#include "dq_kernels.h"

#include <string.h>

/* Scaled-pivot threshold of the Cholesky backstop.  P is assembled from
 * float32 products (relative noise ~1e-7), so a pivot of that order carries
 * no information; 1e-9 only catches systems that are singular to working
 * precision after the exact all-equal-codes test has removed the structural
 * singularities. */
#define PIVOT_RTOL 1e-9

/* Error update of dq_float_step_update: its noise estimate is
 * UPDATE_NOISE * sum_k |d_k| (|P theta0|_k + |y_k|) (eps32 / 2 times a
 * safety factor of 8 over the largest ratio of actual to estimated error
 * seen on synthetic W2-W4 layers); rows where it exceeds UPDATE_RTOL of the
 * error get the GEMM error instead.  That GEMM is float32 too: against a
 * float64 evaluation its errors are off by up to 1.2e-5 (relative, W2 g64)
 * and 3.7e-5 (W4 per-channel).  At 3e-5 nearly every row of a W2 g64 float
 * step was re-measured (a full half-flop GEMM) to gain at most that much;
 * at 2e-4 about 8% are, the returned losses stay within 2.4e-5 of float64
 * (q99 1.4e-5), and the chosen parameters are the same (synthetic 576-2048
 * layers, W2-W4). */
#define UPDATE_NOISE (8.0 * 6e-8)
#define UPDATE_RTOL 2e-4

/* Columns per block of the per-channel P11 assembly (the sgemm's k): large
 * enough that the symmetric half costs few BLAS calls. */
#define CHANNEL_BLOCK 512

/* Memory caps of a row block: the packed upper triangle of P11 (float64)
 * and the T buffer (float32).  The whole layer is one block whenever they
 * fit, so a layer costs G (or n / CHANNEL_BLOCK) sgemm calls in all. */
#define P11_BUDGET_BYTES ((int64_t)64 << 20)
#define T_BUDGET_BYTES ((int64_t)64 << 20)

typedef struct {
    const dq_layer_t *L;
    const int8_t *A;      /* codes of the whole layer */
    int64_t r0;           /* first row of the current block */
    int64_t N;            /* unknowns per row: 2G, or G if symmetric */
    int64_t npair;        /* G (G + 1) / 2: packed upper triangle of P11 */
    int64_t b0, b1;       /* current column block */
    const float *T;       /* rows x (n - b0): A[:, b0:b1] Hf[b0:b1, b0:] */
    double *P11;          /* rows x npair */
    const double *Hs;     /* n x G */
    const double *P22;    /* G x G */
    float *S, *Z;
    /* Update form (S0 non-NULL): the current parameters of the same codes and
     * their errors; the new errors come from the quadratic expansion. */
    const float *S0, *Z0;
    const double *err0;
    double *err;
    uint8_t *recheck;     /* per row: the update's noise bound is too loose */
    int nomem;            /* set by a worker whose scratch allocation failed */
} ctx_t;

/* Index of (j, k), j <= k, in the packed upper triangle of a G x G matrix. */
static inline int64_t upper_index(int64_t j, int64_t k, int64_t G)
{
    return j * G - j * (j - 1) / 2 + (k - j);
}

/* sum_i t[i] * a[i] in float64 with eight fixed accumulators (lane l takes
 * i = l mod 8): the same result on every machine and in both builds below
 * (no reassociation beyond this fixed split), and vectorisable as is. */
static inline __attribute__((always_inline)) double dot_fa(const float *t, const int8_t *a,
                                                           int64_t len)
{
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        for (int l = 0; l < 8; l++) s[l] += (double)t[i + l] * (double)a[i + l];
    for (; i < len; i++) s[0] += (double)t[i] * (double)a[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* sum_i x[i] * y[i] in float64, the same fixed eight-lane split. */
static inline __attribute__((always_inline)) double dot_dd(const double *x, const double *y,
                                                           int64_t len)
{
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        for (int l = 0; l < 8; l++) s[l] += x[i + l] * y[i + l];
    for (; i < len; i++) s[0] += x[i] * y[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* Four doubles as one value: arithmetic on it is element-wise IEEE, so it
 * rounds exactly like four scalar lanes, and the compiler keeps it in one
 * register (two in the generic build).  The helpers taking it are always
 * inlined, so the ABI of passing it by value (which GCC warns about in the
 * generic, non-AVX build) never arises. */
typedef double dq_v4d __attribute__((vector_size(32)));
#pragma GCC diagnostic ignored "-Wpsabi"

static inline __attribute__((always_inline)) dq_v4d load4(const double *p)
{
    dq_v4d v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline __attribute__((always_inline)) double lanes8_sum(dq_v4d lo, dq_v4d hi)
{
    return ((lo[0] + lo[1]) + (lo[2] + lo[3])) + ((hi[0] + hi[1]) + (hi[2] + hi[3]));
}

/* Four dot_dd at once, x0..x3 against the same y: each result rounds
 * exactly as dot_dd(x_r, y, len) does (same eight lanes, same final sum),
 * while y is loaded once for the four and their accumulators hide each
 * other's latency.  Vector types because compilers keep the plain form's 32
 * accumulators in memory. */
static inline __attribute__((always_inline)) void dot4_dd(const double *x0, const double *x1,
                                                          const double *x2, const double *x3,
                                                          const double *y, int64_t len,
                                                          double out[4])
{
    const dq_v4d zero = {0, 0, 0, 0};
    dq_v4d a0 = zero, b0 = zero, a1 = zero, b1 = zero, a2 = zero, b2 = zero, a3 = zero, b3 = zero;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const dq_v4d ylo = load4(y + i), yhi = load4(y + i + 4);
        a0 += load4(x0 + i) * ylo;
        b0 += load4(x0 + i + 4) * yhi;
        a1 += load4(x1 + i) * ylo;
        b1 += load4(x1 + i + 4) * yhi;
        a2 += load4(x2 + i) * ylo;
        b2 += load4(x2 + i + 4) * yhi;
        a3 += load4(x3 + i) * ylo;
        b3 += load4(x3 + i + 4) * yhi;
    }
    for (; i < len; i++) {
        a0[0] += x0[i] * y[i];
        a1[0] += x1[i] * y[i];
        a2[0] += x2[i] * y[i];
        a3[0] += x3[i] * y[i];
    }
    out[0] = lanes8_sum(a0, b0);
    out[1] = lanes8_sum(a1, b1);
    out[2] = lanes8_sum(a2, b2);
    out[3] = lanes8_sum(a3, b3);
}

/* row[k] = sum_c a[c] hs[c, k] (c < g, hs g x G), summed in c order for
 * every k as a plain loop would; 16 columns at a time stay in registers
 * while the g codes stream by, instead of a load and store of row per code. */
static inline __attribute__((always_inline)) void p12_row(const int8_t *a, const double *hs,
                                                          int64_t g, int64_t G, double *row)
{
    int64_t k0 = 0;
    for (; k0 + 16 <= G; k0 += 16) {
        const dq_v4d zero = {0, 0, 0, 0};
        dq_v4d r0 = zero, r1 = zero, r2 = zero, r3 = zero;
        for (int64_t c = 0; c < g; c++) {
            const double ac = (double)a[c];
            if (ac == 0.0) continue;
            const dq_v4d av = {ac, ac, ac, ac};
            const double *h = hs + c * G + k0;
            r0 += av * load4(h);
            r1 += av * load4(h + 4);
            r2 += av * load4(h + 8);
            r3 += av * load4(h + 12);
        }
        memcpy(row + k0, &r0, sizeof(r0));
        memcpy(row + k0 + 4, &r1, sizeof(r1));
        memcpy(row + k0 + 8, &r2, sizeof(r2));
        memcpy(row + k0 + 12, &r3, sizeof(r3));
    }
    for (int64_t k = k0; k < G; k++) {
        double acc = 0.0;
        for (int64_t c = 0; c < g; c++)
            if (a[c] != 0) acc += (double)a[c] * hs[c * G + k];
        row[k] = acc;
    }
}

/* P11 contributions of column block [b0, b1) for the rows [begin, end). */
static inline __attribute__((always_inline)) void accumulate_p11(void *vctx, int64_t begin,
                                                                  int64_t end)
{
    ctx_t *X = (ctx_t *)vctx;
    const dq_layer_t *L = X->L;
    int64_t n = L->n, g = L->g, G = L->G, b0 = X->b0, b1 = X->b1;
    int64_t ldt = n - b0;
    for (int64_t i = begin; i < end; i++) {
        const float *t = X->T + i * ldt;
        const int8_t *a = X->A + (X->r0 + i) * n + b0;
        double *P11 = X->P11 + i * X->npair;
        if (G == 1) {
            double diag = dot_fa(t, a, b1 - b0);
            double off = dot_fa(t + (b1 - b0), a + (b1 - b0), n - b1);
            P11[0] += diag + 2.0 * off;
        } else {
            int64_t j = b0 / g;
            double *out = P11 + upper_index(j, j, G);
            for (int64_t k = j; k < G; k++)
                out[k - j] = dot_fa(t + (k - j) * g, a + (k - j) * g, dq_group_width(n, g, k));
        }
    }
}

/* Dense equilibrated Cholesky with dropped pivots; solves P theta = y in
 * place of theta.  fixed[i] != 0 forces theta_i = 0.  P (N x N, row-major,
 * symmetric) is overwritten.  Returns 0, or -1 if the result is not finite. */
static inline __attribute__((always_inline)) int solve_row(double *P, const double *y, int64_t N, const uint8_t *fixed, double *theta,
                     double *scale, double *u)
{
    for (int64_t i = 0; i < N; i++) {
        double d = P[i * N + i];
        scale[i] = (d > 0 && !fixed[i]) ? 1.0 / sqrt(d) : 0.0;
    }
    /* Lower-triangular factor in place: row i holds L[i][0..i]. */
    for (int64_t k = 0; k < N; k++) {
        double *Lk = P + k * N;
        if (scale[k] == 0.0) {
            for (int64_t i = k; i < N; i++) P[i * N + k] = 0.0;
            continue;
        }
        double d = Lk[k] * scale[k] * scale[k] - dot_dd(Lk, Lk, k);
        if (!(d > PIVOT_RTOL)) {
            scale[k] = 0.0;
            for (int64_t i = k; i < N; i++) P[i * N + k] = 0.0;
            continue;
        }
        double piv = sqrt(d);
        Lk[k] = piv;
        /* Column k below the pivot, four rows per pass over Lk (the bulk of
         * the factorisation's time); dropped rows get 0 whatever their dot. */
        int64_t i = k + 1;
        for (; i + 4 <= N; i += 4) {
            double *Li = P + i * N, dots[4];
            dot4_dd(Li, Li + N, Li + 2 * N, Li + 3 * N, Lk, k, dots);
            for (int r = 0; r < 4; r++) {
                double *Lr = Li + r * N;
                Lr[k] = scale[i + r] == 0.0 ? 0.0
                                            : (Lr[k] * scale[i + r] * scale[k] - dots[r]) / piv;
            }
        }
        for (; i < N; i++) {
            double *Li = P + i * N;
            if (scale[i] == 0.0) {
                Li[k] = 0.0;
                continue;
            }
            double s = Li[k] * scale[i] * scale[k];
            Li[k] = (s - dot_dd(Li, Lk, k)) / piv;
        }
    }
    /* Forward: L u = D^-1/2 y; backward: L^T t = u; theta = D^-1/2 t. */
    for (int64_t i = 0; i < N; i++) {
        if (scale[i] == 0.0) {
            u[i] = 0.0;
            continue;
        }
        double s = y[i] * scale[i];
        const double *Li = P + i * N;
        for (int64_t l = 0; l < i; l++) s -= Li[l] * u[l];
        u[i] = s / Li[i];
    }
    for (int64_t i = N - 1; i >= 0; i--) {
        if (scale[i] == 0.0) {
            theta[i] = 0.0;
            continue;
        }
        double s = u[i];
        for (int64_t l = i + 1; l < N; l++) s -= P[l * N + i] * theta[l];
        theta[i] = s / P[i * N + i];
    }
    int ok = 1;
    for (int64_t i = 0; i < N; i++) {
        theta[i] *= scale[i];
        if (!isfinite(theta[i])) ok = 0;
    }
    return ok ? 0 : -1;
}

/* The rest of P and y, then the solve, for the rows [begin, end). */
static inline __attribute__((always_inline)) void finish_rows(void *vctx, int64_t begin,
                                                               int64_t end)
{
    ctx_t *X = (ctx_t *)vctx;
    const dq_layer_t *L = X->L;
    int64_t n = L->n, g = L->g, G = L->G, N = X->N;
    int sym = L->symmetric;
    double *P = dq_malloc(sizeof(double) * (size_t)(2 * N * N + 7 * N));
    uint8_t *fixed = dq_malloc((size_t)N);
    if (!P || !fixed) {
        __atomic_store_n(&X->nomem, 1, __ATOMIC_RELAXED);
        dq_free(P);
        dq_free(fixed);
        return;
    }
    double *y = P + N * N, *theta = y + N, *scale = theta + N, *u = scale + N;
    double *Pc = u + N, *th0 = Pc + N * N, *grad = th0 + N, *delta = grad + N;
    for (int64_t i = begin; i < end; i++) {
        int64_t r = X->r0 + i;
        const int8_t *a = X->A + r * n;
        const float *v = L->V + r * n;
        const double *P11 = X->P11 + i * X->npair;
        memset(fixed, 0, (size_t)N);
        for (int64_t j = 0; j < G; j++)
            for (int64_t k = j; k < G; k++)
                P[j * N + k] = P[k * N + j] = P11[upper_index(j, k, G)];

        for (int64_t j = 0; j < G; j++) {
            const int8_t *aj = a + j * g;
            const float *vj = v + j * g;
            const int64_t gw = dq_group_width(n, g, j); /* the last group may be short */
            double s1 = 0, s2 = 0;
            int all_equal = 1;
            for (int64_t c = 0; c < gw; c++) {
                s1 += (double)vj[c] * aj[c];
                s2 += (double)vj[c];
                all_equal &= aj[c] == aj[0];
            }
            y[j] = s1;
            if (!sym) {
                y[G + j] = s2;
                /* s_j and z_j are interchangeable: keep s_j (a scale that
                 * reproduces the group's value), fix z_j. */
                if (all_equal && aj[0] != 0) fixed[G + j] = 1;
            }
            if (all_equal && aj[0] == 0) fixed[j] = 1;
        }
        if (!sym) {
            /* P12[j, k] = sum_{c in j} a_c Hs[c, k];  P22 is shared. */
            for (int64_t j = 0; j < G; j++) {
                double *row = P + j * N + G;
                p12_row(a + j * g, X->Hs + j * g * G, dq_group_width(n, g, j), G, row);
                for (int64_t k = 0; k < G; k++) P[(G + k) * N + j] = row[k];
            }
            for (int64_t j = 0; j < G; j++)
                for (int64_t k = 0; k < G; k++) P[(G + j) * N + G + k] = X->P22[j * G + k];
        }

        if (X->S0) {
            /* grad = P theta0 - y (half the gradient at the current
             * parameters), before the solve overwrites P. */
            for (int64_t j = 0; j < G; j++) {
                th0[j] = (double)X->S0[r * G + j];
                if (!sym) th0[G + j] = (double)X->Z0[r * G + j];
            }
            memcpy(Pc, P, sizeof(double) * (size_t)(N * N));
            for (int64_t k = 0; k < N; k++) {
                const double *pk = Pc + k * N;
                double acc = 0.0;
                for (int64_t l = 0; l < N; l++) acc += pk[l] * th0[l];
                grad[k] = acc - y[k];
            }
        }

        int bad = solve_row(P, y, N, fixed, theta, scale, u) != 0;
        for (int64_t k = 0; k < N && !bad; k++) bad = !isfinite((float)theta[k]);
        if (bad)
            for (int64_t k = 0; k < N; k++) theta[k] = 0.0;
        for (int64_t j = 0; j < G; j++) {
            X->S[r * G + j] = (float)theta[j];
            X->Z[r * G + j] = sym ? 0.0f : (float)theta[G + j];
        }
        if (X->S0) {
            /* e(theta) = e(theta0) + d^T (P d + 2 grad), d = theta - theta0,
             * theta the float32 values returned: exact for a quadratic, and
             * its rounding noise scales with |d| instead of with c_r. */
            for (int64_t k = 0; k < N; k++) delta[k] = (double)(float)theta[k] - th0[k];
            double q = 0.0;
            for (int64_t k = 0; k < N; k++) {
                if (delta[k] == 0.0) continue;
                const double *pk = Pc + k * N;
                double acc = 2.0 * grad[k];
                for (int64_t l = 0; l < N; l++) acc += pk[l] * delta[l];
                q += delta[k] * acc;
            }
            X->err[r] = X->err0[r] + q;
            /* Rounding noise of the update: P and y carry float32 products
             * (relative ~eps32 of each term), so the error of d^T(P d + 2
             * grad) is bounded by a few eps32 * sum_k |d_k| (|P theta0|_k +
             * |y_k|) with absolute values termwise.  Rows where that bound
             * could exceed UPDATE_RTOL of the error are measured exactly. */
            double bound = 0.0;
            for (int64_t k = 0; k < N; k++) {
                if (delta[k] == 0.0) continue;
                const double *pk = Pc + k * N;
                double a = fabs(y[k]);
                for (int64_t l = 0; l < N; l++) a += fabs(pk[l] * th0[l]);
                bound += delta[k] * delta[k] * a * a;
            }
            bound = 2.0 * sqrt(bound);
            X->recheck[r] = !(UPDATE_NOISE * bound <= UPDATE_RTOL * X->err[r]);
        }
    }
    dq_free(P);
    dq_free(fixed);
}

/* Generic and AVX2 builds of the two row loops: the same code, rounding
 * identically (-ffp-contract=off, fixed accumulator lanes), so the choice
 * only changes speed. */
static void accumulate_p11_generic(void *x, int64_t b, int64_t e) { accumulate_p11(x, b, e); }
static void finish_rows_generic(void *x, int64_t b, int64_t e) { finish_rows(x, b, e); }
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void accumulate_p11_avx2(void *x, int64_t b, int64_t e)
{
    accumulate_p11(x, b, e);
}
__attribute__((target("avx2,fma"))) static void finish_rows_avx2(void *x, int64_t b, int64_t e)
{
    finish_rows(x, b, e);
}
#endif

dq_status dq_float_step(const dq_layer_t *L, const int8_t *A, float *S, float *Z, double *err)
{
    return dq_float_step_update(L, A, NULL, NULL, NULL, S, Z, err);
}

dq_status dq_float_step_update(const dq_layer_t *L, const int8_t *A, const float *S0,
                               const float *Z0, const double *err0, float *S, float *Z,
                               double *err)
{
    int64_t m = L->m, n = L->n, g = L->g, G = L->G;
    if (m == 0) return DQ_OK;
    if (!L->Hf || !L->V || n < 1 || g < 1 || G != dq_num_groups(n, g)) return DQ_EINVAL;
    int64_t N = L->symmetric ? G : 2 * G;

    int64_t npair = G * (G + 1) / 2;
    int64_t mb = m;
    if (mb * npair * 8 > P11_BUDGET_BYTES) mb = P11_BUDGET_BYTES / (npair * 8);
    if (mb * n * 4 > T_BUDGET_BYTES) mb = T_BUDGET_BYTES / (n * 4);
    if (mb < 16) mb = 16;
    if (mb > m) mb = m;

    dq_status st = DQ_OK;
    uint8_t *recheck = NULL;
    double *Hs = dq_malloc(sizeof(double) * (size_t)(n * G));
    double *P22 = dq_malloc(sizeof(double) * (size_t)(G * G));
    double *P11 = dq_malloc(sizeof(double) * (size_t)(mb * npair));
    float *Af = dq_malloc(sizeof(float) * (size_t)(mb * n));
    float *T = dq_malloc(sizeof(float) * (size_t)(mb * n));
    if (!Hs || !P22 || !P11 || !Af || !T) {
        st = DQ_ENOMEM;
        goto done;
    }
    /* Column-group sums of H (float64) and their group sums: P12's and
     * P22's ingredients (asymmetric only). */
    if (!L->symmetric) {
        for (int64_t c = 0; c < n; c++) {
            const double *h = L->H + c * n;
            for (int64_t k = 0; k < G; k++) {
                double s = 0;
                for (int64_t t = k * g; t < k * g + dq_group_width(n, g, k); t++) s += h[t];
                Hs[c * G + k] = s;
            }
        }
        for (int64_t j = 0; j < G; j++)
            for (int64_t k = 0; k < G; k++) {
                double s = 0;
                const int64_t c1 = j * g + dq_group_width(n, g, j);
                for (int64_t c = j * g; c < c1; c++) s += Hs[c * G + k];
                P22[j * G + k] = s;
            }
    }

    ctx_t X = {.L = L, .A = A, .N = N, .npair = npair, .T = T, .P11 = P11, .Hs = Hs,
               .P22 = P22, .S = S, .Z = Z, .nomem = 0};
    if (S0 && err0 && err) {
        X.S0 = S0;
        X.Z0 = Z0;
        X.err0 = err0;
        X.err = err;
        recheck = dq_calloc((size_t)m);
        if (!recheck) {
            st = DQ_ENOMEM;
            goto done;
        }
        X.recheck = recheck;
    }
    int nth = dq_num_threads();
    dq_range_fn p11_fn = accumulate_p11_generic, finish_fn = finish_rows_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (dq_solver_simd()) {
        p11_fn = accumulate_p11_avx2;
        finish_fn = finish_rows_avx2;
    }
#endif
    const int prof = dq_profile_on();
    double tp = dq_wall_seconds(), t_gemm = 0.0, t_acc = 0.0, t_fin = 0.0;
    int64_t bs = G > 1 ? g : (n < CHANNEL_BLOCK ? n : CHANNEL_BLOCK);
    for (int64_t r0 = 0; r0 < m; r0 += mb) {
        int64_t rows = m - r0 < mb ? m - r0 : mb;
        X.r0 = r0;
        for (int64_t i = 0; i < rows * n; i++) Af[i] = (float)A[r0 * n + i];
        memset(P11, 0, sizeof(double) * (size_t)(rows * npair));
        for (int64_t b0 = 0; b0 < n; b0 += bs) {
            if (dq_interrupted()) {
                st = DQ_EINTR;
                goto done;
            }
            int64_t b1 = b0 + bs < n ? b0 + bs : n;
            dq_sgemm_rows(rows, n - b0, b1 - b0, 1.0f, Af + b0, n, L->Hf + b0 * n + b0, n, 0.0f,
                          T, n - b0);
            if (prof) t_gemm += dq_lap_seconds(&tp);
            X.b0 = b0;
            X.b1 = b1;
            st = dq_parallel_for(rows, 8, nth, p11_fn, &X);
            if (st != DQ_OK) goto done;
            if (prof) t_acc += dq_lap_seconds(&tp);
        }
        st = dq_parallel_for(rows, 4, nth, finish_fn, &X);
        if (prof) t_fin += dq_lap_seconds(&tp);
        if (st == DQ_OK && X.nomem) st = DQ_ENOMEM;
        if (st != DQ_OK) goto done;
    }
    /* Errors of the float32 (S, Z) actually returned, by the same GEMM as
     * every other error of the solver.  The cheaper identity
     * e* = c_r - theta^T y cancels catastrophically: c_r and y come from
     * V = W Hf (float32), and e* is a small difference of the two (measured
     * on synthetic W2 layers: up to 4e-5 relative error per channel, 2e-4 at
     * g64, against 1e-6 / 5e-6 for this recomputation). */
    if (prof)
        fprintf(stderr, "[decoupleq profile]   (float step: gemm %.3f s, p11 %.3f s, solve %.3f s)\n",
                t_gemm, t_acc, t_fin);
    if (X.S0) {
        int64_t k = 0;
        int64_t *rows = dq_malloc(sizeof(int64_t) * (size_t)m);
        if (!rows) {
            st = DQ_ENOMEM;
            goto done;
        }
        for (int64_t r = 0; r < m; r++)
            if (recheck[r]) rows[k++] = r;
        if (prof)
            fprintf(stderr, "[decoupleq profile]   (float step: %lld of %lld rows measured exactly)\n",
                    (long long)k, (long long)m);
        st = dq_row_errors_rows(L, rows, k, A, S, L->symmetric ? NULL : Z, err);
        dq_free(rows);
    }
    if (err && !X.S0) {
        st = dq_row_errors(L, A, S, Z, err);
        dq_profile_lap(prof, &tp, "  (its row errors)", -1);
    }
done:
    dq_free(recheck);
    dq_free(Hs);
    dq_free(P22);
    dq_free(P11);
    dq_free(Af);
    dq_free(T);
    return st;
}
