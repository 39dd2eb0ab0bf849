/* NeUQI: near-optimal initial scale and zero of every group (ALGORITHM 7).
 *
 * Per group, with x = w / s and n = 2^b levels, the quantizer is
 *     w^ = s * (clamp(round(x - z), 0, n - 1) + z),   z a real number,
 * and the objective is L(s, z) = sum_c h_c (w_c - w^_c)^2, h the damped
 * Hessian diagonal normalised to sum 1 over the group (all equal without a
 * Hessian).  For a fixed s the best z is found in two sweeps over sorted
 * breakpoints (phase 1: a convex piecewise-quadratic bound; phase 2: the
 * exact objective on [z1 - 1, z1 + 1]), and s by a coarse-to-fine grid
 * around the min-max scale s0.  The result is written in this library's
 * signed convention: S = s and Z = s * (z - qmin), so that a code q in
 * [qmin, qmax] dequantises to S q + Z.
 *
 * Variants:
 *  - integer zero (NeUQI_int): z in {-(n-1), ..., 0}, all enumerated, on a
 *    finer scale grid of 2048 steps;
 *  - symmetric: Z stays 0, i.e. z is fixed at qmin and only s is searched.
 *
 * Sorting a group once (w ascending) makes both sweeps cheap per scale
 * (phase 1 O(log^2 g), phase 2 linear plus a bucket sort of its
 * breakpoints): x keeps its order for every s > 0, and sums over any run of
 * elements come from prefix sums of h, h w and h w^2.  Coarse scales whose
 * clamping error alone exceeds the best so far are skipped without
 * changing the result.  Everything is float64.  Rows poll for interrupts
 * (DQ_EINTR).
 *
 * Speed without changing a bit: phase 2's per-element pass has an AVX2
 * build (run-time choice, DECOUPLEQ_KERNEL=reference for the portable one;
 * the same operations, each rounded once, and the sums stay scalar in
 * element order), and the binary searches use conditional moves.
 */
#include "dq_kernels.h"
#include "dq_solver.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define COARSE_STEPS 64  /* s0 * k / 64, k = 1..64 */
#define FINE_STEPS 16    /* s_best + j * s0 / 2048, |j| = 1..16 */
#define FINE_DENOM 2048
#define INT_STEPS 2048   /* NeUQI_int: s0 * k / 2048 */

typedef struct {
    double w, h;
} elem_t;

struct group_ws;
/* Phase 2's pass over its middle elements (middle_pass_scalar). */
typedef void (*middle_fn)(struct group_ws *ws, int64_t cb, int64_t k, double inv, double zl,
                          int nl, int64_t nb);

/* One group's sorted elements and prefix sums, and the scratch of phase 2. */
typedef struct group_ws {
    int64_t g;
    elem_t *e;       /* g, ascending w */
    double *w, *h;   /* the same, as two arrays (phase 2's vector loads) */
    double *P0, *P1, *P2; /* g + 1: prefix sums of h, h w, h w^2 */
    middle_fn middle; /* the scalar or the AVX2 build (the same bits) */
    /* Phase 2's scratch, one entry per middle element, in element order and
     * (prefix s) sorted by frac(u): */
    double *key, *skey;     /* frac(u) */
    double *drop0, *sdrop0; /* weight of its drop at d = frac(u) (0: none) */
    double *drop1, *sdrop1; /* the same at d = 1 + frac(u) */
    double *hy, *hyy;       /* h y and h y y, y = x - its level at d = 0 */
    int32_t *bucket;        /* its bucket, floor(frac(u) * nb) */
    int32_t *count;         /* nb = 2 g: the buckets' counts, then their starts */
} group_ws_t;

static int cmp_elem(const void *a, const void *b)
{
    const double x = ((const elem_t *)a)->w, y = ((const elem_t *)b)->w;
    return (x > y) - (x < y);
}

static void ws_free(group_ws_t *ws)
{
    dq_free(ws->e);
    dq_free(ws->P0);
    dq_free(ws->P1);
    dq_free(ws->P2);
    dq_free(ws->w);
    dq_free(ws->h);
    dq_free(ws->key);
    dq_free(ws->skey);
    dq_free(ws->drop0);
    dq_free(ws->sdrop0);
    dq_free(ws->drop1);
    dq_free(ws->sdrop1);
    dq_free(ws->hy);
    dq_free(ws->hyy);
    dq_free(ws->bucket);
    dq_free(ws->count);
    memset(ws, 0, sizeof(*ws));
}

static int ws_alloc(group_ws_t *ws, int64_t g)
{
    memset(ws, 0, sizeof(*ws));
    ws->g = g;
    ws->e = dq_malloc(sizeof(elem_t) * (size_t)g);
    ws->P0 = dq_malloc(sizeof(double) * (size_t)(g + 1));
    ws->P1 = dq_malloc(sizeof(double) * (size_t)(g + 1));
    ws->P2 = dq_malloc(sizeof(double) * (size_t)(g + 1));
    double **arrays[] = {&ws->w,     &ws->h,      &ws->key, &ws->skey, &ws->drop0,
                         &ws->sdrop0, &ws->drop1, &ws->sdrop1, &ws->hy, &ws->hyy};
    int missing = 0;
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) {
        *arrays[i] = dq_malloc(sizeof(double) * (size_t)g);
        missing |= *arrays[i] == NULL;
    }
    ws->bucket = dq_malloc(sizeof(int32_t) * (size_t)g);
    ws->count = dq_malloc(sizeof(int32_t) * (size_t)(2 * g));
    if (missing || !ws->e || !ws->P0 || !ws->P1 || !ws->P2 || !ws->bucket || !ws->count) {
        ws_free(ws);
        return -1;
    }
    return 0;
}

/* Load one group: w (len floats, len <= the allocated g; the last group of
 * a row is shorter when the group size does not divide n) and its weights hd
 * (len doubles, or NULL for equal weights), sorted by w, h normalised to sum
 * 1.  The group's length is ws->g from here on. */
static void ws_load(group_ws_t *ws, const float *w, const double *hd, int64_t len)
{
    const int64_t g = ws->g = len;
    double hsum = 0.0;
    for (int64_t c = 0; c < g; c++) {
        const double h = hd ? hd[c] : 1.0;
        ws->e[c].w = (double)w[c];
        ws->e[c].h = h > 0.0 ? h : 0.0;
        hsum += ws->e[c].h;
    }
    /* A group whose weights are all zero (dead inputs, no damping) counts
     * every element equally rather than not at all. */
    for (int64_t c = 0; c < g; c++) ws->e[c].h = hsum > 0.0 ? ws->e[c].h / hsum : 1.0 / (double)g;
    qsort(ws->e, (size_t)g, sizeof(elem_t), cmp_elem);
    ws->P0[0] = ws->P1[0] = ws->P2[0] = 0.0;
    for (int64_t c = 0; c < g; c++) {
        const double h = ws->e[c].h, v = ws->e[c].w;
        ws->P0[c + 1] = ws->P0[c] + h;
        ws->P1[c + 1] = ws->P1[c] + h * v;
        ws->P2[c + 1] = ws->P2[c] + h * v * v;
        ws->w[c] = v;
        ws->h[c] = h;
    }
}

/* The exact objective sum h (x - z - k)^2, k = clamp(floor(x - z + 1/2), 0, nl - 1),
 * in units of x (multiply by s^2 for units of w). */
static double exact_objective(const group_ws_t *ws, double inv, double z, int nl)
{
    double acc = 0.0;
    for (int64_t c = 0; c < ws->g; c++) {
        const double x = ws->e[c].w * inv;
        double k = floor(x - z + 0.5);
        if (k < 0.0) k = 0.0;
        if (k > nl - 1) k = nl - 1;
        const double r = x - z - k;
        acc += ws->e[c].h * r * r;
    }
    return acc;
}

/* floor() for |v| < 2^62 without a libm call (x86-64's baseline has no
 * SSE4.1 round instruction). */
static inline double fast_floor(double v)
{
    const double t = (double)(int64_t)v;
    return t > v ? t - 1.0 : t;
}

/* Phase 1: the minimiser of the convex bound where an element clamped at
 * the top costs (x - (nl-1) - z)^2, one clamped at the bottom (x - z)^2 and
 * one in range 1/4.  Element c is clamped at the top for
 * z < A_c = x_c - nl + 1/2 and at the bottom for z > B_c = x_c + 1/2; with x
 * ascending, after the first i breakpoints of the merged order the top set
 * is a suffix [p, g) and the bottom set a prefix [0, q), p + q = i.  On
 * interval i the bound is a0 z^2 - 2 a1 z + a2; its stationary point
 * z* = a1 / a0 lies at or before the interval's right end from the
 * minimum's interval on, and after it before (convexity), so the minimum's
 * interval is found by binary search over i, each probe locating its
 * merge position (p, q) by a binary search of its own: O(log^2 g). */
typedef struct {
    const group_ws_t *ws;
    double inv, c1;
    double off; /* 1/2 for phase 1; 0 for clamp_lower_bound's function */
} bound_t;

static inline double A_at(const bound_t *b, int64_t c)
{
    return c < b->ws->g ? b->ws->e[c].w * b->inv - b->c1 - b->off : INFINITY;
}

static inline double B_at(const bound_t *b, int64_t c)
{
    return c < b->ws->g ? b->ws->e[c].w * b->inv + b->off : INFINITY;
}

/* The split p + q = i of the first i merged breakpoints (A first on ties,
 * as a left-to-right merge takes them): the largest p with
 * A[p-1] <= B[i-p]. */
static int64_t merge_split(const bound_t *b, int64_t i)
{
    const int64_t g = b->ws->g;
    int64_t lo = i > g ? i - g : 0, hi = i < g ? i : g;
    /* The same steps with conditional moves for the if/else (the
     * comparison is a coin flip for the branch predictor): A_at(p - 1) never
     * reads past the group (p <= g) and B_at's infinity past it is the
     * flag j >= g, the load clamped to stay inside. */
    const elem_t *e = b->ws->e;
    while (lo < hi) {
        const int64_t p = (lo + hi + 1) / 2, j = i - p, jc = j < g ? j : g - 1;
        const double A = e[p - 1].w * b->inv - b->c1 - b->off, B = e[jc].w * b->inv + b->off;
        const int le = (j >= g) | (A <= B);
        lo = le ? p : lo;
        hi = le ? hi : p - 1;
    }
    return lo;
}

/* On interval i (state p, q): 1 and *z the minimiser if the bound's
 * minimum is at or before the interval's right end, else 0.  *flat: 1 when
 * nothing is clamped on this interval (the function is constant there);
 * *p_out: p. */
static int bound_probe(const bound_t *b, int64_t i, double *z, int *flat, int64_t *p_out)
{
    const group_ws_t *ws = b->ws;
    const int64_t g = ws->g;
    const int64_t p = merge_split(b, i), q = i - p;
    *p_out = p;
    const double an = A_at(b, p), bn = B_at(b, q);
    const double r = an <= bn ? an : bn;
    const double ap = p > 0 ? A_at(b, p - 1) : -INFINITY, bp = q > 0 ? B_at(b, q - 1) : -INFINITY;
    const double l = i == 0 ? -INFINITY : (ap >= bp ? ap : bp);
    const double Htop = ws->P0[g] - ws->P0[p], Hbot = ws->P0[q];
    const double a0 = Htop + Hbot;
    *flat = !(a0 > 1e-12);
    /* sum h = 1: a weight below 1e-12 of it is rounding noise. */
    if (a0 > 1e-12) {
        const double a1 = b->inv * (ws->P1[g] - ws->P1[p]) - b->c1 * Htop + b->inv * ws->P1[q];
        const double zs = a1 / a0;
        if (zs > r) return 0;
        *z = zs < l ? l : zs;
        return 1;
    }
    /* Every element in range (or weightless): the bound is flat here, so
     * this interval is the minimum; phase 2 looks at the exact objective
     * around its middle. */
    if (isinf(l)) *z = r - 0.5;
    else if (isinf(r)) *z = l + 0.5;
    else *z = 0.5 * (l + r);
    return 1;
}

/* The minimiser of bound b (see bound_probe); *flat as there, and the
 * minimum's interval: top set [*p, g), bottom set [0, *q). */
static double bound_argmin(const bound_t *b, int *flat, int64_t *p, int64_t *q)
{
    int64_t lo = 0, hi = 2 * b->ws->g; /* the last interval always holds it */
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        double z;
        const int at_or_before = bound_probe(b, mid, &z, flat, p);
        hi = at_or_before ? mid : hi;
        lo = at_or_before ? lo : mid + 1;
    }
    double z = 0.0;
    bound_probe(b, lo, &z, flat, p);
    *q = lo - *p;
    return z;
}

static double phase1_zbar(const group_ws_t *ws, double inv, int nl)
{
    const bound_t b = {ws, inv, (double)(nl - 1), 0.5};
    int flat;
    int64_t p, q;
    return bound_argmin(&b, &flat, &p, &q);
}

/* A lower bound on the exact objective's minimum over every z, in units of
 * x, for pruning scales (search_group): an element's error is at least its
 * squared distance from [z, z + nl - 1], the range the grid covers, which
 * is the error it has when clamped and 0 in range.  That function is
 * convex, of phase 1's form with the breakpoints at x - (nl - 1) and x and
 * nothing in the middle, so bound_argmin finds its minimiser and the
 * clamped sets there, whose sums come from the prefix sums.  The minimiser
 * is exact up to rounding and the function has zero slope there, and the
 * prefix sums cancel to within a few ulps of sum h x^2, so the value is
 * within the margin search_group allows of the true minimum.  Where nothing
 * is clamped on the minimum's interval the bound is 0 (nothing is
 * pruned). */
static double clamp_lower_bound(const group_ws_t *ws, double inv, int nl)
{
    const double c1 = (double)(nl - 1);
    const bound_t b = {ws, inv, c1, 0.0};
    int flat;
    int64_t p, q;
    const double z = bound_argmin(&b, &flat, &p, &q);
    if (flat) return 0.0;
    /* sum over a set of h (x - t)^2 = X2 - 2 t X + t^2 H: the bottom set
     * [0, q) with t = z, the top set [p, g) with t = z + nl - 1. */
    const int64_t g = ws->g;
    const double *P0 = ws->P0, *P1 = ws->P1, *P2 = ws->P2;
    const double Hb = P0[q], Xb = inv * P1[q], X2b = inv * inv * P2[q];
    const double Ht = P0[g] - P0[p], Xt = inv * (P1[g] - P1[p]), X2t = inv * inv * (P2[g] - P2[p]);
    const double tt = z + c1;
    const double v = (X2b - 2.0 * z * Xb + z * z * Hb) + (X2t - 2.0 * tt * Xt + tt * tt * Ht);
    return v > 0.0 ? v : 0.0;
}

/* Phase 2's pass over its k middle elements cb..cb+k-1 (u in [1, nl + 1),
 * so floor(u) is in [1, nl]): for each, with u = x - zl + 1/2 and
 * lev = min(floor(u), nl - 1), y = x - lev,
 *     key = frac(u), bucket = min(floor(key nb), nb - 1),
 *     drop0 = h if floor(u) <= nl - 1 else 0, drop1 = h if floor(u) >= 2 else 0,
 *     hy = h y, hyy = (h y) y.
 * Every value is one rounding of the same operations in both builds, so
 * they give the same bits; the sums over them are left to the caller, in
 * element order. */
static void middle_range(group_ws_t *ws, int64_t cb, int64_t i0, int64_t i1, double inv,
                         double zl, int nl, int64_t nb)
{
    const double c1 = (double)(nl - 1), bscale = (double)nb;
    const double *W = ws->w + cb, *Hh = ws->h + cb;
    for (int64_t i = i0; i < i1; i++) {
        const double x = W[i] * inv, h = Hh[i];
        const double u = x - zl + 0.5;
        const double fl = fast_floor(u);
        const double lev = fl < c1 ? fl : c1;
        const double y = x - lev;
        const double hy = h * y;
        ws->hy[i] = hy;
        ws->hyy[i] = hy * y;
        const double key = u - fl;
        ws->key[i] = key;
        ws->drop0[i] = fl <= c1 ? h : 0.0;
        ws->drop1[i] = fl >= 2.0 ? h : 0.0;
        int32_t b = (int32_t)(key * bscale);
        ws->bucket[i] = b < nb ? b : (int32_t)nb - 1; /* a key that rounds up to nb */
    }
}

static void middle_pass_scalar(group_ws_t *ws, int64_t cb, int64_t k, double inv, double zl,
                               int nl, int64_t nb)
{
    middle_range(ws, cb, 0, k, inv, zl, nl, nb);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* middle_pass_scalar, four elements at a time: floor by roundpd (u >= 1
 * here, where it equals fast_floor), min/compare masks for the selects,
 * cvttpd for the bucket; no FMA. */
__attribute__((target("avx2"))) static void middle_pass_avx2(group_ws_t *ws, int64_t cb,
                                                             int64_t k, double inv, double zl,
                                                             int nl, int64_t nb)
{
    const double *W = ws->w + cb, *Hh = ws->h + cb;
    const __m256d vinv = _mm256_set1_pd(inv), vzl = _mm256_set1_pd(zl),
                  half = _mm256_set1_pd(0.5), c1 = _mm256_set1_pd((double)(nl - 1)),
                  two = _mm256_set1_pd(2.0), bscale = _mm256_set1_pd((double)nb);
    const __m128i blast = _mm_set1_epi32((int32_t)nb - 1);
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) {
        const __m256d x = _mm256_mul_pd(_mm256_loadu_pd(W + i), vinv);
        const __m256d h = _mm256_loadu_pd(Hh + i);
        const __m256d u = _mm256_add_pd(_mm256_sub_pd(x, vzl), half);
        const __m256d fl = _mm256_floor_pd(u);
        const __m256d lev = _mm256_min_pd(fl, c1);
        const __m256d y = _mm256_sub_pd(x, lev);
        const __m256d hy = _mm256_mul_pd(h, y);
        _mm256_storeu_pd(ws->hy + i, hy);
        _mm256_storeu_pd(ws->hyy + i, _mm256_mul_pd(hy, y));
        const __m256d key = _mm256_sub_pd(u, fl);
        _mm256_storeu_pd(ws->key + i, key);
        _mm256_storeu_pd(ws->drop0 + i, _mm256_and_pd(_mm256_cmp_pd(fl, c1, _CMP_LE_OQ), h));
        _mm256_storeu_pd(ws->drop1 + i, _mm256_and_pd(_mm256_cmp_pd(fl, two, _CMP_GE_OQ), h));
        const __m128i b = _mm_min_epi32(_mm256_cvttpd_epi32(_mm256_mul_pd(key, bscale)), blast);
        _mm_storeu_si128((__m128i *)(ws->bucket + i), b);
    }
    /* The rest runs as plain SSE code: clear the upper halves first (GCC
     * leaves them dirty on this tail call, and SSE code after that runs at
     * a fraction of its speed). */
    _mm256_zeroupper();
    middle_range(ws, cb, i, k, inv, zl, nl, nb); /* the last k % 4 */
}
#endif

static middle_fn pick_middle(void)
{
#if defined(__x86_64__) || defined(__i386__)
    /* DECOUPLEQ_KERNEL=reference forces the plain C pass (as for the
     * kernels); both give the same bits. */
    if (dq_solver_simd()) return middle_pass_avx2;
#endif
    return middle_pass_scalar;
}

/* Stable sort of the k middle elements by key (in [0, 1)) into skey,
 * sdrop0, sdrop1: a counting sort on the nb equal buckets of bucket[],
 * then an insertion sort for the few pairs that share a bucket.  Both
 * steps are stable, so the result is the one stable order by key: ties
 * keep the element order.  With about two buckets per key the
 * data-dependent branches of a comparison sort (which mispredict on random
 * keys) are mostly gone. */
static void sort_keys(group_ws_t *ws, int64_t k, int64_t nb)
{
    int32_t *count = ws->count;
    const int32_t *bucket = ws->bucket;
    memset(count, 0, sizeof(int32_t) * (size_t)nb);
    for (int64_t i = 0; i < k; i++) count[bucket[i]]++;
    /* Counts to starts, the running total in a register (a loop through
     * memory would wait on each store). */
    int32_t start = 0;
    for (int64_t b = 0; b < nb; b++) {
        const int32_t c = count[b];
        count[b] = start;
        start += c;
    }
    double *skey = ws->skey, *s0 = ws->sdrop0, *s1 = ws->sdrop1;
    for (int64_t i = 0; i < k; i++) {
        const int32_t at = count[bucket[i]]++;
        skey[at] = ws->key[i];
        s0[at] = ws->drop0[i];
        s1[at] = ws->drop1[i];
    }
    for (int64_t i = 1; i < k; i++) {
        if (!(skey[i - 1] > skey[i])) continue;
        const double tk = skey[i], t0 = s0[i], t1 = s1[i];
        int64_t j = i;
        do {
            skey[j] = skey[j - 1];
            s0[j] = s0[j - 1];
            s1[j] = s1[j - 1];
            j--;
        } while (j > 0 && skey[j - 1] > tk);
        skey[j] = tk;
        s0[j] = t0;
        s1[j] = t1;
    }
}

/* The first c in [lo, hi) with e[c].w * inv - zl + 1/2 >= t (hi if none;
 * ascending in c), by a binary search whose if/else are conditional
 * moves. */
static int64_t first_u_at_least(const group_ws_t *ws, double inv, double zl, double t, int64_t lo,
                                int64_t hi)
{
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        const int ge = ws->e[mid].w * inv - zl + 0.5 >= t;
        hi = ge ? mid : hi;
        lo = ge ? lo : mid + 1;
    }
    return lo;
}

/* Phase 2: the exact minimum over z in [zl, zl + 2].  Between breakpoints
 * every element keeps its level k, so with y = x - k the objective is
 * H z^2 - 2 a1 z + a2 (a1 = sum h y, a2 = sum h y^2).  As z rises past a
 * breakpoint an element drops a level: y rises by 1, a1 by h and a2 by
 * 2 h z_break.
 *
 * With u = x - zl + 1/2 (ascending) and d = z - zl, an element's level is
 * clamp(floor(u - d), 0, nl - 1).  Elements with floor(u) <= 0 stay at
 * level 0 and those with floor(u) >= nl + 1 at nl - 1 for every d in
 * [0, 2]: their sums come from the prefix sums.  The others drop a level at
 * d = frac(u) (when 1 <= floor(u) <= nl - 1) and at d = 1 + frac(u) (when
 * 2 <= floor(u) <= nl), so both unit halves of the window see their
 * breakpoints in the order of frac(u) (a stable sort: ties keep the
 * element order).  Returns the
 * objective (units of x) and writes the minimiser to *zbest. */
static double phase2_exact(group_ws_t *ws, double inv, int nl, double zl, double *zbest)
{
    const int64_t g = ws->g;
    const double c1 = (double)(nl - 1);
    /* cb: first element with u >= 1; ct: first with u >= nl + 1. */
    const int64_t cb = first_u_at_least(ws, inv, zl, 1.0, 0, g);
    const int64_t ct = first_u_at_least(ws, inv, zl, (double)nl + 1.0, cb, g);
    const double *P0 = ws->P0, *P1 = ws->P1, *P2 = ws->P2;
    const double Ht = P0[g] - P0[ct], Xt = inv * (P1[g] - P1[ct]),
                 X2t = inv * inv * (P2[g] - P2[ct]);
    double H = P0[g];
    double a1 = inv * P1[cb] + (Xt - c1 * Ht);
    double a2 = inv * inv * P2[cb] + (X2t - 2.0 * c1 * Xt + c1 * c1 * Ht);
    /* The middle elements: their sort keys, drops and terms, then their
     * sums in element order. */
    const int64_t k = ct - cb, nb = 2 * k > 0 ? 2 * k : 1;
    ws->middle(ws, cb, k, inv, zl, nl, nb);
    for (int64_t i = 0; i < k; i++) {
        a1 += ws->hy[i];
        a2 += ws->hyy[i];
    }
    sort_keys(ws, k, nb);
    const double *skey = ws->skey;
    /* The objective is a parabola of leading coefficient H on every
     * interval and has a concave kink at every breakpoint, so its minimum is
     * a window end or a stationary point a1 / H inside its own interval:
     * only those are evaluated. */
    double best = H * zl * zl - 2.0 * a1 * zl + a2, zb_best = zl, cur = zl;
    for (int half = 0; half < 2; half++) {
        const double base = zl + (double)half;
        const double *drop = half == 0 ? ws->sdrop0 : ws->sdrop1;
        /* An element that does not drop in this half (dh = 0) leaves a1, a2
         * and the interval's left end as they are; it only splits an
         * interval, and the split halves' checks together accept exactly
         * the stationary points the whole interval's check does.  Visiting
         * it costs less than the mispredicted branch that would skip it. */
        for (int64_t i = 0; i < k; i++) {
            const double dh = drop[i];
            const double next = base + skey[i];
            if (a1 >= cur * H && a1 <= next * H) {
                const double zs = a1 / H;
                const double v = H * zs * zs - 2.0 * a1 * zs + a2;
                if (v < best) best = v, zb_best = zs;
            }
            a1 += dh;
            a2 += 2.0 * dh * next;
            cur = dh != 0.0 ? next : cur;
        }
    }
    {
        const double next = zl + 2.0;
        double zs = a1 / H;
        if (zs < cur) zs = cur;
        if (zs > next) zs = next;
        const double v = H * zs * zs - 2.0 * a1 * zs + a2;
        if (v < best) best = v, zb_best = zs;
    }
    *zbest = zb_best;
    return best < 0.0 ? 0.0 : best;
}

/* Best z for scale s (continuous zero): phase 1 then phase 2.  Returns the
 * objective in units of w. */
static double best_zero(group_ws_t *ws, double s, int nl, double *z)
{
    const double inv = 1.0 / s;
    const double zbar = phase1_zbar(ws, inv, nl);
    const double obj = phase2_exact(ws, inv, nl, zbar - 1.0, z);
    return obj * s * s;
}

/* Best integer z in {-(nl-1), ..., 0} for scale s, by enumeration.  With
 * z integer, k = clamp(round(x) - z): an element is in range for
 * z <= round(x) <= z + nl - 1 and then costs (x - round(x))^2, whatever z.
 * round(x) is ascending with x, so the bottom-clamped set (round(x) < z)
 * is a prefix and the top-clamped set (round(x) > z + nl - 1) a suffix,
 * their costs from the prefix sums.  R: scratch of g + 1 doubles. */
static double best_integer_zero(group_ws_t *ws, double s, int nl, double *R, double *z)
{
    const int64_t g = ws->g;
    const double inv = 1.0 / s, c1 = (double)(nl - 1);
    R[0] = 0.0;
    for (int64_t c = 0; c < g; c++) {
        const double x = ws->e[c].w * inv;
        const double r = x - floor(x + 0.5);
        R[c + 1] = R[c] + ws->e[c].h * r * r;
    }
    const double *P0 = ws->P0, *P1 = ws->P1, *P2 = ws->P2;
    double best = INFINITY, zb = 0.0;
    int64_t q = 0, p = 0; /* bottom [0, q), top [p, g) */
    for (int zi = -(nl - 1); zi <= 0; zi++) {
        const double zz = (double)zi;
        while (q < g && floor(ws->e[q].w * inv + 0.5) < zz) q++;
        if (p < q) p = q;
        while (p < g && floor(ws->e[p].w * inv + 0.5) <= zz + c1) p++;
        /* sum over a run of h (x - t)^2 = X2 - 2 t X + t^2 H */
        const double Hb = P0[q], Xb = inv * P1[q], X2b = inv * inv * P2[q];
        const double Ht = P0[g] - P0[p], Xt = inv * (P1[g] - P1[p]),
                     X2t = inv * inv * (P2[g] - P2[p]);
        const double tt = zz + c1;
        double v = (X2b - 2.0 * zz * Xb + zz * zz * Hb) + (R[p] - R[q]) +
                   (X2t - 2.0 * tt * Xt + tt * tt * Ht);
        if (v < 0.0) v = 0.0;
        if (v < best) {
            best = v;
            zb = zz;
        }
    }
    *z = zb;
    return best * s * s;
}

typedef struct {
    const dq_layer_t *L;
    const double *hdiag;
    int integer_zero;
    float *S, *Z;
    double *obj;
    middle_fn middle; /* phase 2's pass, chosen once per call */
    int failed;      /* set (no lock: any thread writes 1) when scratch ran out */
    int interrupted; /* likewise, when an interrupt was seen between rows */
} neuqi_ctx_t;

/* The min-max range of ALGORITHM 1.2 (lo, hi), as dq_minmax_params. */
static void minmax_range(const float *w, int64_t g, int symmetric, double *lo_out, double *hi_out)
{
    float lo = 0.0f, hi = 0.0f;
    for (int64_t c = 0; c < g; c++) {
        if (w[c] < lo) lo = w[c];
        if (w[c] > hi) hi = w[c];
    }
    if (lo == 0.0f && hi == 0.0f) {
        lo = -1.0f;
        hi = 1.0f;
    }
    if (symmetric) {
        if (-lo > hi) hi = -lo;
        if (lo < 0.0f) lo = -hi;
    }
    *lo_out = lo;
    *hi_out = hi;
}

/* The scale search of one group: returns the objective, writes (s, z). */
static double search_group(group_ws_t *ws, double *R, double s0, double lo, int nl, int qmin,
                           int symmetric, int integer_zero, double *s_out, double *z_out)
{
    double best = INFINITY, sb = s0, zb = 0.0, z;
    if (symmetric) {
        /* z is fixed at qmin: w^ = s * q, q in [qmin, qmax]. */
        for (int k = 1; k <= COARSE_STEPS; k++) {
            const double s = s0 * k / COARSE_STEPS;
            const double v = exact_objective(ws, 1.0 / s, (double)qmin, nl) * s * s;
            if (v < best) best = v, sb = s;
        }
        const double sc = sb;
        for (int j = -FINE_STEPS; j <= FINE_STEPS; j++) {
            const double s = sc + j * s0 / FINE_DENOM;
            if (j == 0 || !(s > 0.0)) continue;
            const double v = exact_objective(ws, 1.0 / s, (double)qmin, nl) * s * s;
            if (v < best) best = v, sb = s;
        }
        *s_out = sb;
        *z_out = (double)qmin;
        return best;
    }
    if (integer_zero) {
        for (int k = 1; k <= INT_STEPS; k++) {
            const double s = s0 * k / INT_STEPS;
            const double v = best_integer_zero(ws, s, nl, R, &z);
            if (v < best) best = v, sb = s, zb = z;
        }
        *s_out = sb;
        *z_out = zb;
        return best;
    }
    /* The coarse grid, largest scale first.  The winner is the lowest
     * objective, ties to the smallest k, exactly as in increasing order (so
     * the order changes nothing), but with the near-best scales seen first,
     * most small scales are pruned: their clamped elements alone cost more
     * than the best so far (clamp_lower_bound).  A scale is pruned only
     * when its bound exceeds the best by more than the rounding of either
     * (margin, a bound on both in units of x^2), so it could not have won
     * or tied. */
    double wmax = 0.0;
    for (int64_t c = 0; c < ws->g; c++) {
        const double a = fabs(ws->e[c].w);
        if (a > wmax) wmax = a;
    }
    /* The bound costs about a quarter of an evaluation and prunes nothing
     * while it is far below the best (above the best scale it is near 0):
     * after a bound below best / 32 the next 3 scales skip it, after one
     * below best / 4 the next one does.  Whether a bound is computed never
     * changes the result, only what is evaluated: it grows by well under
     * 8x (resp. 4x) over that many steps wherever it is within 32x of the
     * best, so a skipped bound would rarely have pruned. */
    int skip = 0;
    for (int k = COARSE_STEPS; k >= 1; k--) {
        const double s = s0 * k / COARSE_STEPS;
        if (best < INFINITY && skip > 0) {
            skip--;
        } else if (best < INFINITY) {
            const double inv = 1.0 / s, span = wmax * inv + nl + 2.0;
            const double lb = clamp_lower_bound(ws, inv, nl) * (1.0 - 1e-10) - 1e-10 * span * span;
            if (lb * s * s > best) continue;
            skip = lb * s * s < best / 32.0 ? 3 : lb * s * s < best / 4.0 ? 1 : 0;
        }
        const double v = best_zero(ws, s, nl, &z);
        if (v <= best) best = v, sb = s, zb = z;
    }
    const double sc = sb;
    for (int j = -FINE_STEPS; j <= FINE_STEPS; j++) {
        const double s = sc + j * s0 / FINE_DENOM;
        if (j == 0 || !(s > 0.0)) continue;
        const double v = best_zero(ws, s, nl, &z);
        if (v < best) best = v, sb = s, zb = z;
    }
    /* Min-max itself (z = lo / s0) is a candidate too, so NeUQI is never
     * worse than the start it replaces. */
    const double zmm = lo / s0;
    const double vmm = exact_objective(ws, 1.0 / s0, zmm, nl) * s0 * s0;
    if (vmm < best) best = vmm, sb = s0, zb = zmm;
    *s_out = sb;
    *z_out = zb;
    return best;
}

static void neuqi_range(void *vctx, int64_t begin, int64_t end)
{
    neuqi_ctx_t *x = (neuqi_ctx_t *)vctx;
    const dq_layer_t *L = x->L;
    const int64_t g = L->g, G = L->G;
    const int nl = 1 << L->bits, qmin = L->qmin;
    group_ws_t ws;
    double *R = dq_malloc(sizeof(double) * (size_t)(g + 1));
    if (!R || ws_alloc(&ws, g) < 0) {
        dq_free(R);
        x->failed = 1;
        return;
    }
    ws.middle = x->middle;
    for (int64_t r = begin; r < end; r++) {
        if (dq_interrupted()) {
            x->interrupted = 1;
            break;
        }
        for (int64_t j = 0; j < G; j++) {
            const float *w = L->W + r * L->n + j * g;
            const int64_t gw = dq_group_width(L->n, g, j);
            double lo, hi;
            minmax_range(w, gw, L->symmetric, &lo, &hi);
            const double s0 = (hi - lo) / (double)(nl - 1);
            ws_load(&ws, w, x->hdiag ? x->hdiag + j * g : NULL, gw);
            double s, z;
            const double v = search_group(&ws, R, s0, lo, nl, qmin, L->symmetric, x->integer_zero,
                                          &s, &z);
            x->S[r * G + j] = (float)s;
            x->Z[r * G + j] = L->symmetric ? 0.0f : (float)(s * (z - (double)qmin));
            if (x->obj) x->obj[r * G + j] = v;
        }
    }
    ws_free(&ws);
    dq_free(R);
}

dq_status dq_neuqi_params(const dq_layer_t *L, const double *hdiag, int integer_zero, float *S,
                          float *Z, double *obj)
{
    neuqi_ctx_t ctx = {L, hdiag, integer_zero, S, Z, obj, pick_middle(), 0, 0};
    /* A row's groups cost O(96 n) sweeps: a few rows per chunk suffice. */
    dq_parallel_for(L->m, 4, dq_num_threads(), neuqi_range, &ctx);
    if (ctx.failed) return DQ_ENOMEM;
    return ctx.interrupted ? DQ_EINTR : DQ_OK;
}

dq_status dq_neuqi_params_damped(const dq_layer_t *L, int integer_zero, float *S, float *Z,
                                 double *obj)
{
    if (!L->H) return dq_neuqi_params(L, NULL, integer_zero, S, Z, obj);
    double *hd = dq_malloc(sizeof(double) * (size_t)L->n);
    if (!hd) return DQ_ENOMEM;
    for (int64_t c = 0; c < L->n; c++) hd[c] = L->H[c * L->n + c];
    dq_status st = dq_neuqi_params(L, hd, integer_zero, S, Z, obj);
    dq_free(hd);
    return st;
}
