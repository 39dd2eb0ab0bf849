/* Integer step "pgd" (decoupleQ's round_fn = "train"), ALGORITHM 3.5 and 6.6.
 *
 * Everything runs in the permuted column order, so "the columns not yet
 * rounded" is always the trailing block [c+1, n) and every matrix involved is
 * an offset view with leading dimension n: no copies per column.
 *
 * Gradient bookkeeping (6.6).  The faithful gradient of the remaining columns
 * is (V - W) H[:, c+1:], an m x n x (n-c-1) GEMM per Adam step.  We keep G
 * (the gradient of every column still moving) up to date instead:
 *   - after an Adam step changing V by D on the columns [c+1, n):
 *         G[:, c+1:] += D[:, c+1:] H[c+1:, c+1:]
 *   - after snapping column c by delta:
 *         G[:, c+1:] += delta (x) H[c, c+1:]
 * The last step's update before a snap and the snap itself are merged into
 * one GEMM over the columns [c, n): D[:, c] then holds (last step's change +
 * snap change) of column c, and column c's own gradient, never needed again,
 * is not computed.  So each Adam step costs one m x r x r GEMM (r = columns
 * left), K2 m n^3 / 3 multiply-adds in all instead of K2 m n^3 / 2.
 *
 * The result equals the faithful one up to float rounding (the same sums in a
 * different order), but the rounding of the incremental G accumulates over
 * the n K2 steps and PGD's snaps turn some of it into different codes (up to
 * 0.13% of codes against the reference measured on small layers).  So G is
 * recomputed exactly, (V - W) H[:, c+1:] in one m x n x r GEMM, at the first
 * snap after every PGD_REFRESH_STEPS incremental steps.  That bounds the
 * drift (100% equal codes on the same 72 layers with a refresh every 16, 32,
 * 64 or 128 steps) and is cheap: a refresh at r remaining columns costs
 * m r (n - r) more than the merged update it replaces, summing to m n^3 / 6
 * over all columns, and one column in 64/K2 refreshes: K2 m n^3 / 384, or
 * 1/128 of the steps' K2 m n^3 / 3 whatever K2.
 *
 * Batching steps further is not possible without changing the algorithm:
 * every remaining column moves at every step and its next move depends on
 * all the others' moves through H, so step k+1 needs all of step k's GEMM.
 *
 * Elementwise work (Adam, clamp, snap) is plain float32 with the operation
 * order of the NumPy reference, parallel over rows; BLAS stays outside.
 */
#include "dq_solver.h"
#include "dq_blas.h"
#include "dq_kernels.h"

#include <string.h>

/* Adam constants of the reference (moq_quant.MyAdam / round_train). */
#define PGD_BETA1 0.9
#define PGD_BETA2 0.999
#define PGD_EPS_A 1e-5  /* phase A */
#define PGD_EPS_B 1e-4  /* phase B, inner steps */
#define PGD_LR_B 1e-3   /* phase B: the reference does not pass --lr on */

/* Incremental Adam steps between two exact recomputations of G (see top). */
#define PGD_REFRESH_STEPS 64

/* x / y with |y| floored at 1e-15 and sign(0) = +1 (ALGORITHM 1.4), in
 * float32 like the reference. */
static inline float safe_divf(float x, float y)
{
    float ay = fabsf(y);
    if (!(ay > 1e-15f)) ay = 1e-15f;
    return x / (y < 0.0f ? -ay : ay);
}

/* The grid point nearest v for one element: s * clamp(R((v - z) / s)) + z. */
static inline float snap1(float v, float s, float z, float qmin, float qmax, int rule)
{
    float q = dq_clampf(dq_round(safe_divf(v - z, s), rule), qmin, qmax);
    return q * s + z;
}

/* Constants of one Adam step (float32, as the reference's arrays see them). */
typedef struct {
    float one_b1, b2, one_b2, bc2_sqrt, eps, step, qmin, qmax;
} adam_consts;

/* One projected Adam step on one row's elements [0, k), in float32 with the
 * reference's order of operations (the moment as torch's lerp):
 *   m = m + (1-b1) (g - m);  v = b2 v + ((1-b2) g) g;
 *   V = clamp(V - step * (m / (sqrt(v) / sqrt(bc2) + eps)), L, U)
 * with L, U = min, max(qmin s + z, qmax s + z); then dout = new V - ref
 * (ref = W in phase A; NULL = the old V in phase B).  Only IEEE-exact
 * operations and no FMA, so every vector width gives the same bits: the AVX2
 * clone is the same source compiled wider. */
#define ADAM_ROW_ARGS                                                                  \
    int64_t k, const adam_consts *cst, const float *restrict g, const float *restrict s, \
        const float *restrict z, const float *restrict ref, float *restrict v,         \
        float *restrict dout, float *restrict mo, float *restrict ve
#define ADAM_ROW_BODY                                                                  \
    const float ob1 = cst->one_b1, b2 = cst->b2, ob2 = cst->one_b2;                    \
    const float bc2s = cst->bc2_sqrt, eps = cst->eps, step = cst->step;                \
    const float qmin = cst->qmin, qmax = cst->qmax;                                    \
    for (int64_t j = 0; j < k; j++) {                                                  \
        float gj = g[j];                                                               \
        float mj = mo[j] + ob1 * (gj - mo[j]);                                         \
        float vj = b2 * ve[j] + (ob2 * gj) * gj;                                       \
        mo[j] = mj;                                                                    \
        ve[j] = vj;                                                                    \
        float den = sqrtf(vj) / bc2s + eps;                                            \
        float lo = qmin * s[j] + z[j], hi = qmax * s[j] + z[j];                        \
        float L = lo < hi ? lo : hi, U = lo < hi ? hi : lo;                            \
        float old = v[j];                                                              \
        float nv = old - step * (mj / den);                                            \
        nv = nv < L ? L : nv;                                                          \
        nv = nv > U ? U : nv;                                                          \
        v[j] = nv;                                                                     \
        dout[j] = nv - (ref ? ref[j] : old);                                           \
    }

typedef void (*adam_row_fn)(ADAM_ROW_ARGS);

static void adam_row_plain(ADAM_ROW_ARGS) { ADAM_ROW_BODY }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void adam_row_avx2(ADAM_ROW_ARGS) { ADAM_ROW_BODY }
#endif

/* AVX2 where the CPU has it, unless DECOUPLEQ_KERNEL=reference asks for the
 * portable build (the results are the same bits either way). */
static adam_row_fn pick_adam_row(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (dq_solver_simd()) return adam_row_avx2;
#endif
    return adam_row_plain;
}

typedef struct {
    int64_t m, n;
    float qmin, qmax;
    int rule;
    const float *W;  /* m x n, permuted */
    const float *S;  /* m x n, S expanded per column, permuted */
    const float *Z;  /* m x n, likewise (zeros when symmetric) */
    float *V, *G, *D, *Mo, *Ve;  /* iterate, gradient, change, Adam moments */
    int8_t *A;                   /* natural order output */
    const int64_t *perm;         /* NULL: identity */
    adam_row_fn row;
    /* the current Adam step */
    int64_t c0;   /* first moving column */
    int phase_a;  /* D <- V - W (phase A) instead of D <- change of V */
    adam_consts k;
} pgd_ctx;

/* Adam step on the columns [c0, n) of rows [r0, r1). */
static void adam_rows(void *vctx, int64_t r0, int64_t r1)
{
    const pgd_ctx *x = (const pgd_ctx *)vctx;
    const int64_t n = x->n, c0 = x->c0;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * n + c0;
        x->row(n - c0, &x->k, x->G + o, x->S + o, x->Z + o, x->phase_a ? x->W + o : NULL,
               x->V + o, x->D + o, x->Mo + o, x->Ve + o);
    }
}

/* D <- V - W on every column (the exact starting point of phase B's G). */
static void diff_rows(void *vctx, int64_t r0, int64_t r1)
{
    const pgd_ctx *x = (const pgd_ctx *)vctx;
    const int64_t n = x->n;
    for (int64_t i = r0 * n; i < r1 * n; i++) x->D[i] = x->V[i] - x->W[i];
}

/* Final snap of every column, then the codes recovered from the dequantised
 * value as the reference does: A = clamp(R((Q - z) / s)), natural order. */
static void codes_rows(void *vctx, int64_t r0, int64_t r1)
{
    const pgd_ctx *x = (const pgd_ctx *)vctx;
    const int64_t n = x->n;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * n;
        for (int64_t j = 0; j < n; j++) {
            float s = x->S[o + j], z = x->Z[o + j];
            float q = snap1(x->V[o + j], s, z, x->qmin, x->qmax, x->rule);
            float a = dq_clampf(dq_round(safe_divf(q - z, s), x->rule), x->qmin, x->qmax);
            x->A[o + (x->perm ? x->perm[j] : j)] = (int8_t)a;
        }
    }
}

static void set_adam(pgd_ctx *x, int64_t t, double lr, double eps)
{
    /* Bias corrections in double, as Python computes them, then float32. */
    x->k.one_b1 = (float)(1.0 - PGD_BETA1);
    x->k.b2 = (float)PGD_BETA2;
    x->k.one_b2 = (float)(1.0 - PGD_BETA2);
    x->k.bc2_sqrt = (float)pow(1.0 - pow(PGD_BETA2, (double)t), 0.5);
    x->k.step = (float)(lr / (1.0 - pow(PGD_BETA1, (double)t)));
    x->k.eps = (float)eps;
    x->k.qmin = x->qmin;
    x->k.qmax = x->qmax;
}

/* G[:, j0:] (+)= D[:, k0:] H[k0:, j0:], k0 <= j0: the change of the columns
 * [k0, n) pushed into the gradient of the columns [j0, n). */
static void grad_update(const pgd_ctx *x, const float *H, int64_t k0, int64_t j0, float beta)
{
    const int64_t n = x->n;
    if (j0 >= n || x->m == 0) return;
    dq_sgemm_rows(x->m, n - j0, n - k0, 1.0f, x->D + k0, n, H + k0 * n + j0, n, beta, x->G + j0, n);
}

/* Row chunks big enough that a thread has real work (~32k elements). */
static int64_t rows_per_chunk(int64_t cols)
{
    int64_t c = cols > 0 ? 32768 / cols : 1;
    return c < 1 ? 1 : c;
}

dq_status dq_round_pgd(const dq_layer_t *L, const int64_t *perm, const float *S, const float *Z,
                       const dq_pgd_opts_t *opts, int8_t *A, double *err)
{
    if (!L || !L->W || !L->Hf || !S || !Z || !opts || !A || !err) return DQ_EINVAL;
    const int64_t m = L->m, n = L->n, g = L->g, G = L->G;
    const int64_t K1 = opts->steps_before_round, K2 = opts->steps_per_column;
    if (K1 < 0 || K2 < 0 || !(opts->lr > 0.0) || !isfinite(opts->lr)) return DQ_EINVAL;
    if (m == 0 || n == 0) return m == 0 ? DQ_OK : DQ_EINVAL;
    if ((int64_t)(int)m != m || (int64_t)(int)n != n) return DQ_EINVAL;  /* BLAS is LP64 */

    if (perm) {  /* an identity order needs no permuted copies */
        int64_t j = 0;
        while (j < n && perm[j] == j) j++;
        if (j == n) perm = NULL;
    }
    const size_t mn = (size_t)m * (size_t)n;
    const int need_grad = K1 > 0 || K2 > 0;
    const int nth = dq_num_threads();
    dq_status st = DQ_OK;
    float *Wp = NULL, *Sp = NULL, *Zp = NULL, *V = NULL, *Gr = NULL, *D = NULL, *Mo = NULL,
          *Ve = NULL, *Hp = NULL;

    /* Work arrays in the permuted column order. */
    Sp = dq_malloc(mn * sizeof(float));
    Zp = dq_malloc(mn * sizeof(float));
    V = dq_malloc(mn * sizeof(float));
    if (perm) Wp = dq_malloc(mn * sizeof(float));
    if (need_grad) {
        Gr = dq_malloc(mn * sizeof(float));
        D = dq_malloc(mn * sizeof(float));
        Mo = dq_calloc(mn * sizeof(float));
        Ve = dq_calloc(mn * sizeof(float));
        if (perm) Hp = dq_malloc((size_t)n * (size_t)n * sizeof(float));
    }
    if (!Sp || !Zp || !V || (perm && !Wp) ||
        (need_grad && (!Gr || !D || !Mo || !Ve || (perm && !Hp)))) {
        st = DQ_ENOMEM;
        goto done;
    }
    for (int64_t r = 0; r < m; r++) {
        const float *wr = L->W + r * n;
        for (int64_t j = 0; j < n; j++) {
            int64_t cj = perm ? perm[j] : j;
            Sp[r * n + j] = S[r * G + cj / g];
            Zp[r * n + j] = L->symmetric ? 0.0f : Z[r * G + cj / g];
            if (perm) Wp[r * n + j] = wr[cj];
        }
    }
    if (Hp)
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) Hp[i * n + j] = L->Hf[perm[i] * n + perm[j]];
    const float *Wk = perm ? Wp : L->W;
    const float *H = perm ? Hp : L->Hf;
    memcpy(V, Wk, mn * sizeof(float));

    pgd_ctx x = {
        .m = m, .n = n, .qmin = (float)L->qmin, .qmax = (float)L->qmax, .rule = L->rule,
        .W = Wk, .S = Sp, .Z = Zp, .V = V, .G = Gr, .D = D, .Mo = Mo, .Ve = Ve, .A = A,
        .perm = perm, .row = pick_adam_row(),
    };
    int64_t t = 0;

    /* Phase A: projected Adam on the whole relaxation.  V starts at W, so the
     * first gradient is exactly zero. */
    if (K1 > 0) memset(Gr, 0, mn * sizeof(float));
    x.c0 = 0;
    x.phase_a = 1;
    for (int64_t k = 0; k < K1; k++) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto done;
        }
        set_adam(&x, ++t, opts->lr, PGD_EPS_A);
        if ((st = dq_parallel_for(m, rows_per_chunk(n), nth, adam_rows, &x)) != DQ_OK) goto done;
        if (k + 1 < K1)  /* G = (V - W) H */
            dq_sgemm_rows(m, n, n, 1.0f, D, n, H, n, 0.0f, Gr, n);
    }

    int64_t since_refresh = 0;
    /* Phase B: snap column c, then K2 steps on the columns [c+1, n). */
    x.phase_a = 0;
    for (int64_t c = 0; c + 1 < n; c++) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto done;
        }
        for (int64_t r = 0; r < m; r++) {
            const int64_t i = r * n + c;
            float nv = snap1(V[i], Sp[i], Zp[i], x.qmin, x.qmax, x.rule);
            if (K2 > 0 && c > 0) D[i] += nv - V[i];
            V[i] = nv;
        }
        if (K2 == 0) continue;
        if (c == 0 || since_refresh >= PGD_REFRESH_STEPS) {
            since_refresh = 0;
            /* Exact start: G[:, c+1:] = (V - W) H[:, c+1:]. */
            if ((st = dq_parallel_for(m, rows_per_chunk(n), nth, diff_rows, &x)) != DQ_OK)
                goto done;
            grad_update(&x, H, 0, c + 1, 0.0f);
        } else {
            grad_update(&x, H, c, c + 1, 1.0f);
        }
        since_refresh += K2;
        x.c0 = c + 1;
        for (int64_t k = 0; k < K2; k++) {
            set_adam(&x, ++t, PGD_LR_B, PGD_EPS_B);
            if ((st = dq_parallel_for(m, rows_per_chunk(n - c - 1), nth, adam_rows, &x)) !=
                DQ_OK)
                goto done;
            /* The last step's change waits to be merged with the next snap. */
            if (k + 1 < K2) grad_update(&x, H, c + 1, c + 1, 1.0f);
        }
    }

    if ((st = dq_parallel_for(m, rows_per_chunk(n), nth, codes_rows, &x)) != DQ_OK) goto done;
    if (L->symmetric) {
        /* Symmetric: the zero is 0 whatever Z holds; row errors read Z. */
        float *Z0 = dq_calloc((size_t)m * (size_t)G * sizeof(float));
        st = Z0 ? dq_row_errors(L, A, S, Z0, err) : DQ_ENOMEM;
        dq_free(Z0);
    } else {
        st = dq_row_errors(L, A, S, Z, err);
    }

done:
    dq_free(Wp);
    dq_free(Sp);
    dq_free(Zp);
    dq_free(V);
    dq_free(Gr);
    dq_free(D);
    dq_free(Mo);
    dq_free(Ve);
    dq_free(Hp);
    return st;
}
