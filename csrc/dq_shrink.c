/* Per-row shrink search of the min-max range (ALGORITHM 3.3, 6.5).
 *
 * Objective (the reference's, unchanged): for p_i = float32(1 - i/200),
 * i = 1..159, every group of row r gets the range p_i (lo, hi); the row's
 * RTN codes under those (s, z) give an H00 error e_r(i); the row keeps the
 * best candidate if it is strictly below its min-max error.
 *
 * The reference pays one m x n x n GEMM per candidate (160 in all).  Here:
 *
 * 1. Along the path p = 1 -> 0.205 the codes of an element only change when
 *    (w/p - z1)/s1 crosses a rounding boundary, a few times per element at
 *    2-4 bits ("flips", 0.6 n per row at W2, 3 n at W4 on synthetic layers).
 *    In units of the p = 1 grid, u_i = S1 A_i + Z1, the dequantised row is
 *    p_i u_i (exactly, up to float32 rounding of s_i, z_i), so
 *        e_r(i) = p_i^2 u_i H u_i^T - 2 p_i u_i . v + c_r      (v = w H).
 *    K = u_1 H comes from one sgemm; each flip (column c, code step dq)
 *    changes u by delta = dq s1 at c, hence u H u^T by
 *    delta (2 K[c] + delta H[c,c]) and K by delta H[c, :].  Replaying the
 *    flips in step order gives every e_r(i) for ~ (flips / n) sgemm-sized
 *    work, done by an axpy kernel over column tiles of H (a tile of K stays
 *    in registers while the row's flips stream by).
 * 2. Those estimates rank the candidates with ~1e-5 c_r of float32 noise.
 *    Every candidate within TIE_RTOL c_r of the row's best estimate (at most
 *    MAX_TIES of them) is then evaluated exactly, with the same float32 GEMM
 *    error as dq_row_errors, and the exact errors decide.  With the noise
 *    measured (< 1e-5 c_r) this reproduces the exhaustive search's choice,
 *    and the returned err is the exact error of the returned (S, Z).
 * Blocks whose rows would flip more than EXHAUSTIVE_FLIPS times per element
 * evaluate all 159 candidates exactly instead, as the reference does (none
 * up to 8 bits on synthetic layers: 6.5, 13, 26, 47 flips per element at
 * 5, 6, 7, 8 bits), and so do rows of near-underflow weights.
 *
 * Codes, scales and zeros are computed with the same float32 expressions as
 * dq_minmax_params / dq_rtn_codes (the reference's operation order), so the
 * chosen (S, Z) are bit-identical to minmax_params(W, p_row).
 */
#include "dq_solver.h"
#include "dq_blas.h"
#include "dq_kernels.h"
#include "dq_profile.h"

#include <string.h>
#ifdef DQ_SHRINK_SELFCHECK
#include <stdio.h>
#endif

#define GRID 200
#define N_STEPS 160 /* i = 0 .. 159; i = 0 is p = 1, the starting point */

/* Candidates within TIE_RTOL * c_r of the best estimate are checked exactly
 * (measured estimate noise: <= 1e-5 c_r at W2-W4); at most MAX_TIES. */
#define TIE_RTOL 3e-5
#define MAX_TIES 8

/* Rows whose largest |w| is below this (products of two weights near the
 * float32 underflow) are evaluated exhaustively. */
#define TINY_ROW 1e-15f

/* Flips per element above which the exact exhaustive evaluation is cheaper. */
#define EXHAUSTIVE_FLIPS 64

/* Column tile of the replay: TILE floats of K per row kept in registers;
 * the packed H tile (n x TILE floats) should sit in L2. */
#ifndef TILE
#define TILE 64
#endif
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 16 /* flips ahead whose H tile row is prefetched */
#endif

/* Working-memory targets: rows per block (u1 and K, float32) and flip
 * records per sub-block. */
#define BLOCK_BYTES ((int64_t)16 << 20)
#define EVENT_BYTES ((int64_t)96 << 20)
/* Rows of D per exact-evaluation GEMM. */
#define EVAL_BYTES ((int64_t)16 << 20)

static inline float shrink_p(int i) { return (float)(1.0 - (double)i / GRID); }

/* ---- the grid at one p (same expressions as dq_init.c) ----------------- */

/* Base range of every group of row r (zero range and symmetry applied). */
static void base_range(const dq_layer_t *L, int64_t r, float *lo_out, float *hi_out)
{
    const float *w = L->W + r * L->n;
    for (int64_t j = 0; j < L->G; j++) {
        const float *wg = w + j * L->g;
        const int64_t gw = dq_group_width(L->n, L->g, j); /* the last group may be short */
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
        lo_out[j] = lo;
        hi_out[j] = hi;
    }
}

/* (s, z) of every group of one row at factor p. */
static void params_at(const dq_layer_t *L, const float *lo, const float *hi, float p, float *s,
                      float *z)
{
    const float maxq = (float)((1 << L->bits) - 1), qmin = (float)L->qmin;
    for (int64_t j = 0; j < L->G; j++) {
        const float l = p * lo[j], h = p * hi[j];
        const float sj = (h - l) / maxq;
        s[j] = sj;
        z[j] = L->symmetric ? 0.0f : l - sj * qmin;
    }
}

/* RTN codes of one row under per-group (s, z). */
static void codes_at(const dq_layer_t *L, const float *w, const float *s, const float *z,
                     int8_t *q)
{
    const float qmin = (float)L->qmin, qmax = (float)L->qmax;
    for (int64_t j = 0; j < L->G; j++) {
        const float sj = s[j], zj = L->symmetric ? 0.0f : z[j];
        for (int64_t c = j * L->g; c < j * L->g + dq_group_width(L->n, L->g, j); c++) {
            const float t = L->symmetric ? w[c] / sj : (w[c] - zj) / sj;
            float v = dq_round(t, L->rule);
            if (!(v >= qmin)) v = qmin;
            if (v > qmax) v = qmax;
            q[c] = (int8_t)v;
        }
    }
}

/* ---- flips of one row ---------------------------------------------------- */

typedef struct {
    int32_t col;
    float delta; /* change of u: code step times s1 of the column's group */
} flip_t;

/* Exact RTN code of one element (the expressions of codes_at). */
static inline int code_one(float w, float s, float z, const dq_layer_t *L)
{
    const float t = L->symmetric ? w / s : (w - z) / s;
    float v = dq_round(t, L->rule);
    if (!(v >= (float)L->qmin)) v = (float)L->qmin;
    if (v > (float)L->qmax) v = (float)L->qmax;
    return (int)v;
}

/* Per-row tables: (s, z) of every group at every step. */
typedef struct {
    float *s, *z; /* N_STEPS x G */
} row_grid_t;

static void row_grid(const dq_layer_t *L, const float *lo, const float *hi, row_grid_t *T)
{
    for (int st = 0; st < N_STEPS; st++)
        params_at(L, lo, hi, shrink_p(st), T->s + st * L->G, T->z + st * L->G);
}

/* In grid units of p = 1, element x(p) = (w/p - z1)/s1 = x0 + u r, with
 * r = 1/p rising from 1 to 1/0.205, moves monotonically away from x0, so its
 * code can only change where x crosses a rounding boundary k + 1/2: at the
 * first step past the crossing.  The float32 value the reference rounds
 * differs from x(p_i) by a few ulps (s_i, z_i are roundings of p_i s1,
 * p_i z1), so steps whose x lies within TOL_REL (relative to the magnitudes
 * involved) of a boundary are evaluated exactly too, with the step after
 * each.  Codes are constant between evaluated steps.  Cost: about one exact
 * evaluation per flip instead of 159 per element. */
#define TOL_REL 1e-5

typedef struct {
    uint64_t bits[(N_STEPS + 63) / 64];
} stepset_t;

static inline void mark(stepset_t *m, int i) { m->bits[i >> 6] |= (uint64_t)1 << (i & 63); }

/* Mark the steps to evaluate for boundary b. */
static void boundary_steps(double x0, double u, double b, double tol, const double *rinv,
                           stepset_t *m)
{
    if (u == 0.0) {
        if (fabs(x0 - b) <= tol)
            for (int i = 1; i < N_STEPS; i++) mark(m, i);
        return;
    }
    const double rs = (b - x0) / u, dr = tol / fabs(u);
    /* ic: first step with r_i > rs (N_STEPS if none). */
    int ic;
    if (rs < 1.0) {
        ic = 0;
    } else if (rs >= rinv[N_STEPS - 1]) {
        ic = N_STEPS;
    } else {
        ic = (int)(GRID * (1.0 - 1.0 / rs)) + 1; /* rs >= 1: truncation is floor */
        if (ic < 0) ic = 0;
        if (ic > N_STEPS) ic = N_STEPS;
        while (ic > 0 && rinv[ic - 1] > rs) ic--;
        while (ic < N_STEPS && rinv[ic] <= rs) ic++;
    }
    if (ic >= 1 && ic < N_STEPS) mark(m, ic);
    for (int i = ic - 1; i >= 0 && rinv[i] >= rs - dr; i--) {
        if (i >= 1) mark(m, i);
        if (i + 1 < N_STEPS) mark(m, i + 1);
    }
    for (int i = ic; i < N_STEPS && rinv[i] <= rs + dr; i++) {
        if (i >= 1) mark(m, i);
        if (i + 1 < N_STEPS) mark(m, i + 1);
    }
}

/* floor for |x| < 2^30 (grid positions are bounded by the group's range;
 * the callers clamp first), without a libm call on SSE2. */
static inline int ifloor(double x)
{
    const int i = (int)x;
    return i - (x < (double)i);
}

/* Boundaries k + 1/2 (qmin <= k < qmax) inside [a, b]: k in [*k0, *k1]. */
static int boundaries_in(const dq_layer_t *L, double a, double b, int *k0, int *k1)
{
    const double lim = 1 << 20;
    if (a < -lim) a = -lim;
    if (b > lim) b = lim;
    if (!(a <= b)) return 0;
    int klo = -ifloor(0.5 - a), khi = ifloor(b - 0.5);
    if (klo < L->qmin) klo = L->qmin;
    if (khi > L->qmax - 1) khi = L->qmax - 1;
    if (klo > khi) return 0;
    *k0 = klo;
    *k1 = khi;
    return 1;
}

/* Group geometry in grid units of p = 1: x0 = -z1/s1 and 1/s1. */
static inline void group_geometry(const dq_layer_t *L, float s1, float z1, double *x0,
                                  double *inv_s1)
{
    *x0 = L->symmetric ? 0.0 : -(double)z1 / (double)s1;
    *inv_s1 = 1.0 / (double)s1;
}

/* Bound on |computed (w - z_i)/s_i - x(p_i)| with a wide margin: a few
 * float32 ulps of w/s_i (|u| r <= 5 |u|), of z_i/s_i (|x0|) and of the
 * range ends p lo, p hi (up to 2^b - 1 grid steps). */
static inline double element_tol(const dq_layer_t *L, double x0, double u)
{
    return TOL_REL * (4.0 + fabs(x0) + 5.0 * fabs(u) + (double)(L->qmax - L->qmin));
}

/* Upper estimate of a row's flips: boundaries its trajectories pass. */
static int64_t estimate_flips(const dq_layer_t *L, const float *w, const row_grid_t *T,
                              const double *rinv)
{
    int64_t cnt = 0;
    const double rmax = rinv[N_STEPS - 1];
    for (int64_t j = 0; j < L->G; j++) {
        double x0, inv_s1;
        group_geometry(L, T->s[j], T->z[j], &x0, &inv_s1);
        if (!(inv_s1 < 1e30)) {
            cnt += dq_group_width(L->n, L->g, j) * (L->qmax - L->qmin);
            continue;
        }
        for (int64_t c = j * L->g; c < j * L->g + dq_group_width(L->n, L->g, j); c++) {
            const double u = (double)w[c] * inv_s1, tol = element_tol(L, x0, u);
            const double xa = x0 + u, xb = x0 + u * rmax;
            int k0, k1;
            if (boundaries_in(L, (xa < xb ? xa : xb) - tol, (xa < xb ? xb : xa) + tol, &k0, &k1))
                cnt += k1 - k0 + 1;
        }
    }
    return cnt;
}

static int push_flip(flip_t **buf, int16_t **bstep, int64_t *cap, int64_t k, int32_t c,
                     float delta, int st)
{
    if (k == *cap) {
        const int64_t nc = *cap ? 2 * *cap : 1024;
        flip_t *nb = realloc(*buf, sizeof(flip_t) * (size_t)nc);
        if (!nb) return -1;
        *buf = nb;
        int16_t *ns = realloc(*bstep, sizeof(int16_t) * (size_t)nc);
        if (!ns) return -1;
        *bstep = ns;
        *cap = nc;
    }
    (*buf)[k].col = c;
    (*buf)[k].delta = delta;
    (*bstep)[k] = (int16_t)st;
    return 0;
}

/* All flips of one row, unsorted (column-major); returns the count or -1 if
 * out of memory.  *buf grows as needed. */
static int64_t row_flips(const dq_layer_t *L, const float *w, const int8_t *q0,
                         const row_grid_t *T, const double *rinv, flip_t **buf, int16_t **bstep,
                         int64_t *cap)
{
    const int64_t G = L->G, g = L->g;
    const double rmax = rinv[N_STEPS - 1];
    int64_t k = 0;
    for (int64_t j = 0; j < G; j++) {
        const float s1 = T->s[j];
        double x0, inv_s1;
        group_geometry(L, s1, T->z[j], &x0, &inv_s1);
        /* A scale that underflowed (a subnormal range): no geometry to
         * trust, so every step is evaluated. */
        const int degenerate = !(inv_s1 < 1e30);
        for (int64_t c = j * g; c < j * g + dq_group_width(L->n, g, j); c++) {
            stepset_t m = {{0}};
            if (degenerate) {
                for (int i = 1; i < N_STEPS; i++) mark(&m, i);
            } else {
                const double u = (double)w[c] * inv_s1, tol = element_tol(L, x0, u);
                const double xa = x0 + u, xb = x0 + u * rmax;
                int k0, k1;
                if (!boundaries_in(L, (xa < xb ? xa : xb) - tol, (xa < xb ? xb : xa) + tol, &k0,
                                   &k1))
                    continue;
                for (int kb = k0; kb <= k1; kb++) boundary_steps(x0, u, kb + 0.5, tol, rinv, &m);
            }
            int q_prev = q0[c];
            for (int word = 0; word < (int)(sizeof(m.bits) / sizeof(m.bits[0])); word++) {
                uint64_t bits = m.bits[word];
                while (bits) {
                    const int st = word * 64 + __builtin_ctzll(bits);
                    bits &= bits - 1;
                    const int q = code_one(w[c], T->s[st * G + j], T->z[st * G + j], L);
                    if (q == q_prev) continue;
                    if (push_flip(buf, bstep, cap, k, (int32_t)c, (float)(q - q_prev) * s1, st))
                        return -1;
                    k++;
                    q_prev = q;
                }
            }
        }
    }
    return k;
}

#ifdef DQ_SHRINK_SELFCHECK
/* Debug build only (CFLAGS=-DDQ_SHRINK_SELFCHECK): replays the flips of a
 * row against brute-force codes at every step and reports mismatches. */
static void selfcheck_row(const dq_layer_t *L, const float *w, const row_grid_t *T,
                          const flip_t *buf, const int16_t *bstep, int64_t k, int64_t r)
{
    const int64_t n = L->n, g = L->g, G = L->G;
    int *cur = malloc(sizeof(int) * (size_t)n);
    if (!cur) return;
    for (int64_t c = 0; c < n; c++) cur[c] = code_one(w[c], T->s[c / g], T->z[c / g], L);
    int64_t bad = 0;
    for (int st = 1; st < N_STEPS; st++) {
        for (int64_t e = 0; e < k; e++)
            if (bstep[e] == st) cur[buf[e].col] += (int)lrintf(buf[e].delta / T->s[buf[e].col / g]);
        for (int64_t c = 0; c < n; c++)
            bad += code_one(w[c], T->s[st * G + c / g], T->z[st * G + c / g], L) != cur[c];
    }
    if (bad) fprintf(stderr, "shrink selfcheck: row %lld has %lld code mismatches\n", (long long)r,
                     (long long)bad);
    free(cur);
}
#endif

/* ---- a block of rows ---------------------------------------------------- */

typedef struct {
    const dq_layer_t *L;
    int64_t r0;            /* first row of the block */
    int64_t ntiles, npad;  /* column tiles of the replay; n rounded up to TILE */
    const double *rinv;    /* N_STEPS: 1 / p_i */
    float *lo, *hi;        /* rows x G base ranges */
    int64_t est_stride;    /* rows sampled for the flip estimate */
    int64_t *est_flips;    /* estimates of the sampled rows */
    flip_t **ev;           /* rows: each row's flips in step order (owned) */
    int32_t *step_end;     /* rows x N_STEPS: end of each step's flips in ev[i] */
    double *gamma_step;    /* rows x N_STEPS: change of u . v at each step */
    double *alpha_step;    /* rows x N_STEPS: change of u H u^T at each step */
    float *U1;             /* rows x npad: u at p = 1 */
    float *K;              /* rows x npad: u_1 Hf */
    double *alpha1, *gamma1;
    int nomem;
} block_t;

/* Flip estimates of a sample of the block's rows (every est_stride-th):
 * enough to choose between replay and exhaustive evaluation and to size
 * the sub-blocks. */
static void estimate_rows(void *vctx, int64_t begin, int64_t end)
{
    block_t *B = (block_t *)vctx;
    const dq_layer_t *L = B->L;
    float *tab = dq_malloc(sizeof(float) * 2 * (size_t)L->G);
    if (!tab) {
        __atomic_store_n(&B->nomem, 1, __ATOMIC_RELAXED);
        return;
    }
    row_grid_t T = {tab, tab + L->G};
    for (int64_t k = begin; k < end; k++) {
        const int64_t i = k * B->est_stride;
        /* Only step 0 of the grid is needed here. */
        params_at(L, B->lo + i * L->G, B->hi + i * L->G, shrink_p(0), T.s, T.z);
        B->est_flips[k] = estimate_flips(L, L->W + (B->r0 + i) * L->n, &T, B->rinv);
    }
    dq_free(tab);
}

/* The flips of rows [begin, end), sorted by step (stable: columns ascend
 * within a step), u_1 and the per-step changes of u . v. */
static void fill_rows(void *vctx, int64_t begin, int64_t end)
{
    block_t *B = (block_t *)vctx;
    const dq_layer_t *L = B->L;
    const int64_t n = L->n, G = L->G, g = L->g, npad = B->npad;
    float *tab = dq_malloc(sizeof(float) * 2 * N_STEPS * (size_t)G);
    int8_t *q0 = dq_malloc((size_t)n);
    flip_t *buf = NULL;
    int16_t *bstep = NULL;
    int64_t cap = 0;
    if (!tab || !q0) goto oom;
    row_grid_t T = {tab, tab + N_STEPS * G};
    for (int64_t i = begin; i < end; i++) {
        const int64_t r = B->r0 + i;
        const float *w = L->W + r * n;
        const float *v = L->V + r * n;
        row_grid(L, B->lo + i * G, B->hi + i * G, &T);
        float *u1 = B->U1 + i * npad;
        for (int64_t j = 0; j < G; j++)
            for (int64_t c = j * g; c < j * g + dq_group_width(L->n, g, j); c++) {
                const int qi = code_one(w[c], T.s[j], T.z[j], L);
                const float q = (float)qi;
                q0[c] = (int8_t)qi;
                u1[c] = L->symmetric ? q * T.s[j] : q * T.s[j] + T.z[j];
            }
        for (int64_t c = n; c < npad; c++) u1[c] = 0.0f;
        const int64_t k = row_flips(L, w, q0, &T, B->rinv, &buf, &bstep, &cap);
        if (k < 0) goto oom;
#ifdef DQ_SHRINK_SELFCHECK
        selfcheck_row(L, w, &T, buf, bstep, k, r);
#endif
        flip_t *ev = malloc(sizeof(flip_t) * (size_t)(k + 1));
        if (!ev) goto oom;
        B->ev[i] = ev;
        int32_t *send = B->step_end + i * N_STEPS;
        double *gstep = B->gamma_step + i * N_STEPS;
        /* Counting sort by step. */
        for (int st = 0; st < N_STEPS; st++) send[st] = 0;
        for (int64_t e = 0; e < k; e++) send[bstep[e]]++;
        int32_t acc = 0;
        for (int st = 0; st < N_STEPS; st++) {
            const int32_t cnt = send[st];
            send[st] = acc; /* start, for now */
            acc += cnt;
        }
        for (int64_t e = 0; e < k; e++) ev[send[bstep[e]]++] = buf[e];
        /* send[st] is now the end of step st; per-step u . v changes. */
        int32_t e0 = 0;
        for (int st = 0; st < N_STEPS; st++) {
            double gs = 0.0;
            for (int32_t e = e0; e < send[st]; e++) gs += (double)ev[e].delta * v[ev[e].col];
            gstep[st] = gs;
            e0 = send[st];
        }
    }
    dq_free(tab);
    dq_free(q0);
    free(buf);
    free(bstep);
    return;
oom:
    __atomic_store_n(&B->nomem, 1, __ATOMIC_RELAXED);
    dq_free(tab);
    dq_free(q0);
    free(buf);
    free(bstep);
}

/* Replay kernel: K tile (TILE floats) += delta * H tile row, in step order;
 * a flip inside the tile first adds delta (2 K[c] + delta H[c,c]) to its
 * step's u H u^T change.  mul then add (no FMA) so the scalar and AVX2
 * versions round identically. */
typedef void (*replay_fn)(const flip_t *ev, const int32_t *step_end, const float *Ht,
                          const float *hdiag, int64_t t0, float *Kt, double *alpha_step);

static void replay_scalar(const flip_t *ev, const int32_t *step_end, const float *Ht,
                          const float *hdiag, int64_t t0, float *Kt, double *alpha_step)
{
    int32_t e = 0;
    for (int st = 1; st < N_STEPS; st++) {
        if (e == step_end[st]) continue;
        double acc = 0.0;
        for (; e < step_end[st]; e++) {
            const int64_t c = ev[e].col;
            const float d = ev[e].delta;
            if ((uint64_t)(c - t0) < TILE) {
                const float kc = Kt[c - t0];
                acc += (double)d * (2.0 * (double)kc + (double)d * (double)hdiag[c]);
            }
            const float *h = Ht + c * TILE;
            for (int j = 0; j < TILE; j++) Kt[j] = Kt[j] + d * h[j];
        }
        alpha_step[st] += acc;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TV (TILE / 8) /* YMM registers of a K tile */
__attribute__((target("avx2"))) static void replay_avx2(const flip_t *ev, const int32_t *step_end,
                                                        const float *Ht, const float *hdiag,
                                                        int64_t t0, float *Kt,
                                                        double *alpha_step)
{
    __m256 k[TV];
    for (int v = 0; v < TV; v++) k[v] = _mm256_loadu_ps(Kt + 8 * v);
    float spill[TILE] __attribute__((aligned(32)));
    const int32_t nev = step_end[N_STEPS - 1];
    int32_t e = 0;
    for (int st = 1; st < N_STEPS; st++) {
        const int32_t e1 = step_end[st];
        if (e == e1) continue;
        double acc = 0.0;
        for (; e < e1; e++) {
            const int64_t c = ev[e].col;
            const float d = ev[e].delta;
            if ((uint64_t)(c - t0) < TILE) {
                for (int v = 0; v < TV; v++) _mm256_store_ps(spill + 8 * v, k[v]);
                const float kc = spill[c - t0];
                acc += (double)d * (2.0 * (double)kc + (double)d * (double)hdiag[c]);
            }
            if (e + PREFETCH_AHEAD < nev) {
                const char *nx = (const char *)(Ht + (int64_t)ev[e + PREFETCH_AHEAD].col * TILE);
                for (int v = 0; v < TILE * 4; v += 64) _mm_prefetch(nx + v, _MM_HINT_T0);
            }
            const float *h = Ht + c * TILE;
            const __m256 dv = _mm256_set1_ps(d);
            for (int v = 0; v < TV; v++)
                k[v] = _mm256_add_ps(k[v], _mm256_mul_ps(dv, _mm256_load_ps(h + 8 * v)));
        }
        alpha_step[st] += acc;
    }
    for (int v = 0; v < TV; v++) _mm256_storeu_ps(Kt + 8 * v, k[v]);
}
#endif

static replay_fn pick_replay(void)
{
#if defined(__x86_64__) || defined(__i386__)
    /* DECOUPLEQ_KERNEL=reference forces the plain C replay (as for the
     * kernels); both versions give the same bits. */
    if (dq_solver_simd()) return replay_avx2;
#endif
    return replay_scalar;
}

typedef struct {
    block_t *B;
    int64_t s0;  /* first row (block-relative) of the sub-block */
    replay_fn fn;
} replay_ctx_t;

/* Replay the flips of rows [begin, end) of the sub-block, tile by tile; each
 * worker packs its own copy of the current H tile (TILE columns, n rows). */
static void replay_rows(void *vctx, int64_t begin, int64_t end)
{
    replay_ctx_t *R = (replay_ctx_t *)vctx;
    block_t *B = R->B;
    const dq_layer_t *L = B->L;
    const int64_t n = L->n, npad = B->npad;
    float *Ht = dq_malloc(sizeof(float) * (size_t)(n * TILE));
    float *hdiag = dq_malloc(sizeof(float) * (size_t)n);
    float *Kt = dq_malloc(sizeof(float) * TILE);
    if (!Ht || !hdiag || !Kt) {
        __atomic_store_n(&B->nomem, 1, __ATOMIC_RELAXED);
        dq_free(Ht);
        dq_free(hdiag);
        dq_free(Kt);
        return;
    }
    for (int64_t c = 0; c < n; c++) hdiag[c] = L->Hf[c * n + c];
    for (int64_t t = 0; t < B->ntiles; t++) {
        const int64_t t0 = t * TILE, w = n - t0 < TILE ? n - t0 : TILE;
        for (int64_t c = 0; c < n; c++) {
            float *dst = Ht + c * TILE;
            memcpy(dst, L->Hf + c * n + t0, sizeof(float) * (size_t)w);
            for (int64_t j = w; j < TILE; j++) dst[j] = 0.0f;
        }
        for (int64_t i = R->s0 + begin; i < R->s0 + end; i++) {
            memcpy(Kt, B->K + i * npad + t0, sizeof(float) * TILE);
            R->fn(B->ev[i], B->step_end + i * N_STEPS, Ht, hdiag, t0, Kt,
                  B->alpha_step + i * N_STEPS);
        }
    }
    dq_free(Ht);
    dq_free(hdiag);
    dq_free(Kt);
}

/* u_1 . K and u_1 . v per row (float64). */
static void anchor_dots(void *vctx, int64_t begin, int64_t end)
{
    replay_ctx_t *R = (replay_ctx_t *)vctx;
    block_t *B = R->B;
    const dq_layer_t *L = B->L;
    for (int64_t i = R->s0 + begin; i < R->s0 + end; i++) {
        const float *u = B->U1 + i * B->npad, *k = B->K + i * B->npad;
        const float *v = L->V + (B->r0 + i) * L->n;
        double a = 0.0, gm = 0.0;
        for (int64_t c = 0; c < L->n; c++) {
            a += (double)u[c] * k[c];
            gm += (double)u[c] * v[c];
        }
        B->alpha1[i] = a;
        B->gamma1[i] = gm;
    }
}

/* ---- exact evaluation of chosen (row, step) pairs ---------------------- */

typedef struct {
    const dq_layer_t *L;
    const float *lo, *hi;   /* of the block, rows x G */
    int64_t r0;
    const int32_t *pr;      /* pair -> block-relative row */
    const int16_t *ps;      /* pair -> step */
    int64_t p0;             /* first pair of the chunk */
    float *D, *P;           /* chunk x n */
    double *perr;           /* pair errors */
    int nomem;
} eval_t;

static void eval_diff(void *vctx, int64_t begin, int64_t end)
{
    eval_t *E = (eval_t *)vctx;
    const dq_layer_t *L = E->L;
    const int64_t n = L->n, G = L->G, g = L->g;
    float *s = dq_malloc(sizeof(float) * 2 * G);
    int8_t *q = dq_malloc((size_t)n);
    if (!s || !q) {
        __atomic_store_n(&E->nomem, 1, __ATOMIC_RELAXED);
        dq_free(s);
        dq_free(q);
        return;
    }
    float *z = s + G;
    for (int64_t k = begin; k < end; k++) {
        const int64_t i = E->pr[E->p0 + k], r = E->r0 + i;
        const float *w = L->W + r * n;
        params_at(L, E->lo + i * G, E->hi + i * G, shrink_p(E->ps[E->p0 + k]), s, z);
        codes_at(L, w, s, z, q);
        float *d = E->D + k * n;
        /* dq_row_errors' expressions: what = a s + z; d = what - w. */
        for (int64_t c = 0; c < n; c++) {
            const float what = (float)q[c] * s[c / g] + z[c / g];
            d[c] = what - w[c];
        }
    }
    dq_free(s);
    dq_free(q);
}

static void eval_dot(void *vctx, int64_t begin, int64_t end)
{
    eval_t *E = (eval_t *)vctx;
    const int64_t n = E->L->n;
    for (int64_t k = begin; k < end; k++) {
        const float *d = E->D + k * n, *p = E->P + k * n;
        double acc = 0.0;
        for (int64_t c = 0; c < n; c++) acc += (double)d[c] * (double)p[c];
        E->perr[E->p0 + k] = acc;
    }
}

static dq_status eval_pairs(const dq_layer_t *L, const float *lo, const float *hi, int64_t r0,
                            const int32_t *pr, const int16_t *ps, int64_t npairs, double *perr)
{
    const int64_t n = L->n;
    int64_t chunk = EVAL_BYTES / (n * 4);
    if (chunk < 16) chunk = 16;
    if (chunk > npairs) chunk = npairs;
    if (chunk < 1) return DQ_OK;
    eval_t E = {.L = L, .lo = lo, .hi = hi, .r0 = r0, .pr = pr, .ps = ps, .perr = perr, .nomem = 0};
    E.D = dq_malloc(sizeof(float) * (size_t)(chunk * n));
    E.P = dq_malloc(sizeof(float) * (size_t)(chunk * n));
    dq_status st = DQ_OK;
    if (!E.D || !E.P) {
        st = DQ_ENOMEM;
        goto done;
    }
    const int nth = dq_num_threads();
    for (int64_t p0 = 0; p0 < npairs; p0 += chunk) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto done;
        }
        const int64_t cnt = npairs - p0 < chunk ? npairs - p0 : chunk;
        E.p0 = p0;
        st = dq_parallel_for(cnt, 4, nth, eval_diff, &E);
        if (st == DQ_OK && E.nomem) st = DQ_ENOMEM;
        if (st != DQ_OK) goto done;
        dq_sgemm_rows(cnt, n, n, 1.0f, E.D, n, L->Hf, n, 0.0f, E.P, n);
        st = dq_parallel_for(cnt, 4, nth, eval_dot, &E);
        if (st != DQ_OK) goto done;
    }
done:
    dq_free(E.D);
    dq_free(E.P);
    return st;
}

/* ---- candidate choice --------------------------------------------------- */

/* Estimated errors of steps 1..N_STEPS-1 of block row i. */
static void estimates(const block_t *B, int64_t i, double *est)
{
    const double c = B->L->c[B->r0 + i];
    double alpha = B->alpha1[i], gamma = B->gamma1[i];
    for (int st = 1; st < N_STEPS; st++) {
        alpha += B->alpha_step[i * N_STEPS + st];
        gamma += B->gamma_step[i * N_STEPS + st];
        const double p = (double)shrink_p(st);
        est[st] = p * p * alpha - 2.0 * p * gamma + c;
    }
}

/* Steps worth an exact check for one row: within TIE_RTOL c_r of the best
 * estimate and not clearly worse than the starting error; the lowest
 * MAX_TIES of them, in increasing step order.  Returns how many. */
static int pick_ties(const double *est, double c, double err0, int16_t *out)
{
    double best = est[1];
    for (int st = 2; st < N_STEPS; st++)
        if (est[st] < best) best = est[st];
    const double margin = TIE_RTOL * fabs(c);
    if (best > err0 + margin) return 0;
    double lim = best + margin;
    int k = 0;
    for (int st = 1; st < N_STEPS; st++)
        if (est[st] <= lim) k++;
    while (k > MAX_TIES) {
        /* Tighten to the MAX_TIES lowest: drop the largest estimate. */
        double worst = -INFINITY;
        for (int st = 1; st < N_STEPS; st++)
            if (est[st] <= lim && est[st] > worst) worst = est[st];
        lim = nextafter(worst, -INFINITY);
        k = 0;
        for (int st = 1; st < N_STEPS; st++)
            if (est[st] <= lim) k++;
    }
    int j = 0;
    for (int st = 1; st < N_STEPS && j < k; st++)
        if (est[st] <= lim) out[j++] = (int16_t)st;
    return j;
}

/* ---- driver -------------------------------------------------------------- */

static dq_status search_block(const dq_layer_t *L, const double *err_start, const double *rinv,
                              int64_t r0, int64_t rows, replay_fn fn, const float *DH, float *S,
                              float *Z, float *p_row, double *err)
{
    const int64_t n = L->n, G = L->G;
    const int nth = dq_num_threads();
    block_t B;
    memset(&B, 0, sizeof(B));
    B.L = L;
    B.r0 = r0;
    B.rinv = rinv;
    B.ntiles = (n + TILE - 1) / TILE;
    B.npad = B.ntiles * TILE;
    dq_status st = DQ_OK;
    int32_t *pr = NULL;
    int16_t *ps = NULL;
    double *perr = NULL, *est = NULL;
    int16_t *chosen = NULL;
    B.lo = dq_malloc(sizeof(float) * (size_t)(rows * G));
    B.hi = dq_malloc(sizeof(float) * (size_t)(rows * G));
    B.est_flips = dq_malloc(sizeof(int64_t) * (size_t)rows);
    B.ev = dq_calloc(sizeof(flip_t *) * (size_t)rows);
    B.step_end = dq_malloc(sizeof(int32_t) * (size_t)(rows * N_STEPS));
    B.gamma_step = dq_malloc(sizeof(double) * (size_t)(rows * N_STEPS));
    B.alpha_step = dq_calloc(sizeof(double) * (size_t)(rows * N_STEPS));
    B.U1 = dq_malloc(sizeof(float) * (size_t)(rows * B.npad));
    B.K = dq_malloc(sizeof(float) * (size_t)(rows * B.npad));
    B.alpha1 = dq_malloc(sizeof(double) * (size_t)rows);
    B.gamma1 = dq_malloc(sizeof(double) * (size_t)rows);
    pr = dq_malloc(sizeof(int32_t) * (size_t)(rows * (N_STEPS - 1)));
    ps = dq_malloc(sizeof(int16_t) * (size_t)(rows * (N_STEPS - 1)));
    perr = dq_malloc(sizeof(double) * (size_t)(rows * (N_STEPS - 1)));
    est = dq_malloc(sizeof(double) * N_STEPS);
    /* Rows whose choice was made without an exact check (err NULL only). */
    chosen = dq_calloc(sizeof(int16_t) * (size_t)rows);
    if (!chosen || !B.lo || !B.hi || !B.est_flips || !B.ev || !B.step_end || !B.gamma_step ||
        !B.alpha_step || !B.U1 || !B.K || !B.alpha1 || !B.gamma1 || !pr || !ps || !perr || !est) {
        st = DQ_ENOMEM;
        goto done;
    }
    const int prof = dq_profile_on();
    double t0 = dq_wall_seconds();
    for (int64_t i = 0; i < rows; i++) base_range(L, r0 + i, B.lo + i * G, B.hi + i * G);

    B.est_stride = rows > 64 ? rows / 64 : 1;
    const int64_t nsample = (rows + B.est_stride - 1) / B.est_stride;
    st = dq_parallel_for(nsample, 4, nth, estimate_rows, &B);
    if (st == DQ_OK && B.nomem) st = DQ_ENOMEM;
    if (st != DQ_OK) goto done;
    int64_t sampled = 0;
    for (int64_t k = 0; k < nsample; k++) sampled += B.est_flips[k];
    const double per_row = (double)sampled / (double)nsample;

    int64_t npairs = 0, nflips = 0;
    if (per_row > (double)EXHAUSTIVE_FLIPS * (double)n) {
        for (int64_t i = 0; i < rows; i++)
            for (int s = 1; s < N_STEPS; s++) {
                pr[npairs] = (int32_t)i;
                ps[npairs] = (int16_t)s;
                npairs++;
            }
    } else {
        /* Sub-blocks whose (estimated) flip records fit EVENT_BYTES. */
        int64_t sub = (int64_t)((double)(EVENT_BYTES / (int64_t)sizeof(flip_t)) / (per_row + 1.0));
        if (sub < 1) sub = 1;
        for (int64_t s0 = 0; s0 < rows;) {
            if (dq_interrupted()) {
                st = DQ_EINTR;
                goto done;
            }
            const int64_t s1 = rows - s0 < sub ? rows : s0 + sub;
            block_t Bs = B;
            Bs.r0 = r0 + s0;
            Bs.lo = B.lo + s0 * G;
            Bs.hi = B.hi + s0 * G;
            Bs.ev = B.ev + s0;
            Bs.step_end = B.step_end + s0 * N_STEPS;
            Bs.gamma_step = B.gamma_step + s0 * N_STEPS;
            Bs.U1 = B.U1 + s0 * B.npad;
            Bs.nomem = 0;
            st = dq_parallel_for(s1 - s0, 4, nth, fill_rows, &Bs);
            if (st == DQ_OK && Bs.nomem) st = DQ_ENOMEM;
            if (st != DQ_OK) goto done;
            dq_profile_lap(prof, &t0, "  (shrink flips)", -1);
            /* Anchor: K = u_1 Hf (u_1's pad columns are zero, K's are set
             * to zero so the last tile replays cleanly). */
            if (B.npad != n)
                memset(B.K + s0 * B.npad, 0, sizeof(float) * (size_t)((s1 - s0) * B.npad));
            if (DH) {
                /* u_1 Hf = (u_1 - w) Hf + w Hf: the caller's min-max product
                 * plus V (equal up to float32 rounding, which the exact
                 * checks absorb like the estimates' other noise). */
                for (int64_t i = s0; i < s1; i++) {
                    const float *dh = DH + (r0 + i) * n, *v = L->V + (r0 + i) * n;
                    float *k = B.K + i * B.npad;
                    for (int64_t c = 0; c < n; c++) k[c] = dh[c] + v[c];
                }
            } else {
                dq_sgemm_rows(s1 - s0, n, n, 1.0f, B.U1 + s0 * B.npad, B.npad, L->Hf, n, 0.0f,
                              B.K + s0 * B.npad, B.npad);
            }
            dq_profile_lap(prof, &t0, "  (shrink anchor)", -1);
            replay_ctx_t R = {.B = &B, .s0 = s0, .fn = fn};
            st = dq_parallel_for(s1 - s0, 4, nth, anchor_dots, &R);
            if (st != DQ_OK) goto done;
            st = dq_parallel_for(s1 - s0, 1, nth, replay_rows, &R);
            if (st == DQ_OK && B.nomem) st = DQ_ENOMEM;
            if (st != DQ_OK) goto done;
            dq_profile_lap(prof, &t0, "  (shrink replay)", -1);
            for (int64_t i = s0; i < s1; i++) {
                nflips += B.step_end[i * N_STEPS + N_STEPS - 1];
                free(B.ev[i]);
                B.ev[i] = NULL;
            }
            s0 = s1;
        }
        for (int64_t i = 0; i < rows; i++) {
            /* A row of tiny weights (float32 products near underflow) has
             * no usable estimates: all its candidates are checked. */
            float amax = 0.0f;
            for (int64_t j = 0; j < G; j++) {
                const float a = fabsf(B.lo[i * G + j]) > B.hi[i * G + j] ? fabsf(B.lo[i * G + j])
                                                                         : B.hi[i * G + j];
                if (a > amax) amax = a;
            }
            if (amax < TINY_ROW) {
                for (int st = 1; st < N_STEPS; st++) {
                    pr[npairs] = (int32_t)i;
                    ps[npairs] = (int16_t)st;
                    npairs++;
                }
                continue;
            }
            estimates(&B, i, est);
            int16_t tie[MAX_TIES];
            const int k = pick_ties(est, L->c[r0 + i], err_start[r0 + i], tie);
            if (!err && k == 1 && est[tie[0]] < err_start[r0 + i] - TIE_RTOL * fabs(L->c[r0 + i])) {
                chosen[i] = tie[0];
                continue;
            }
            for (int j = 0; j < k; j++) {
                pr[npairs] = (int32_t)i;
                ps[npairs] = tie[j];
                npairs++;
            }
        }
    }

    dq_profile_lap(prof, &t0, "  (shrink ties)", -1);
    st = eval_pairs(L, B.lo, B.hi, r0, pr, ps, npairs, perr);
    if (st != DQ_OK) goto done;
    if (prof) {
        /* The replay's work: one multiply-add per flip and padded column. */
        fprintf(stderr,
                "[decoupleq profile]   shrink replay: %lld flips (%.2f per element), "
                "%.3g multiply-adds\n",
                (long long)nflips, (double)nflips / ((double)rows * (double)n),
                (double)nflips * (double)B.npad);
        fprintf(stderr, "[decoupleq profile]   shrink exact checks: %lld for %lld rows\n",
                (long long)npairs, (long long)rows);
    }
    dq_profile_lap(prof, &t0, "  (shrink exact)", -1);

    /* Per row: the lowest exact error, earliest step on ties (the
     * reference's strict < scan), kept only if strictly below the start. */
    {
        float *s = dq_malloc(sizeof(float) * 2 * G);
        if (!s) {
            st = DQ_ENOMEM;
            goto done;
        }
        float *z = s + G;
        int64_t k = 0;
        for (int64_t i = 0; i < rows; i++) {
            const int64_t r = r0 + i;
            int best = 0;
            double be = err_start[r];
            for (; k < npairs && pr[k] == i; k++)
                if (perr[k] < be) {
                    be = perr[k];
                    best = ps[k];
                }
            if (chosen[i]) best = chosen[i];
            params_at(L, B.lo + i * G, B.hi + i * G, shrink_p(best), s, z);
            memcpy(S + r * G, s, sizeof(float) * (size_t)G);
            memcpy(Z + r * G, z, sizeof(float) * (size_t)G);
            p_row[r] = shrink_p(best);
            if (err) err[r] = be;
        }
        dq_free(s);
    }
done:
    if (B.ev)
        for (int64_t i = 0; i < rows; i++) free(B.ev[i]);
    dq_free(B.ev);
    dq_free(B.lo);
    dq_free(B.hi);
    dq_free(B.est_flips);
    dq_free(B.step_end);
    dq_free(B.gamma_step);
    dq_free(B.alpha_step);
    dq_free(B.U1);
    dq_free(B.K);
    dq_free(B.alpha1);
    dq_free(B.gamma1);
    dq_free(pr);
    dq_free(ps);
    dq_free(perr);
    dq_free(est);
    dq_free(chosen);
    return st;
}

dq_status dq_shrink_search(const dq_layer_t *L, const double *err_start, float *S, float *Z,
                           float *p_row, double *err)
{
    if (!err) return DQ_EINVAL;
    return dq_shrink_search_choose(L, err_start, NULL, S, Z, p_row, err);
}

dq_status dq_shrink_search_choose(const dq_layer_t *L, const double *err_start, const float *DH,
                                  float *S, float *Z, float *p_row, double *err)
{
    const int64_t m = L->m, n = L->n;
    if (m == 0) return DQ_OK;
    if (!L->Hf || !L->V || !L->c || n < 1 || L->g < 1 || L->G != dq_num_groups(n, L->g))
        return DQ_EINVAL;
    int64_t mb = BLOCK_BYTES / (8 * n);
    if (mb < 64) mb = 64;
    if (mb > m) mb = m;
    const replay_fn fn = pick_replay();
    double rinv[N_STEPS];
    for (int i = 0; i < N_STEPS; i++) rinv[i] = 1.0 / (double)shrink_p(i);
    for (int64_t r0 = 0; r0 < m; r0 += mb) {
        const int64_t rows = m - r0 < mb ? m - r0 : mb;
        dq_status st = search_block(L, err_start, rinv, r0, rows, fn, DH, S, Z, p_row, err);
        if (st != DQ_OK) return st;
    }
    return DQ_OK;
}
