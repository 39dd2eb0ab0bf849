/* AVX-512 BCQ dot at batch 1, for 1- and 2-bit weights; everything else
 * (other widths, batches above 1, group sizes that are not a multiple of
 * 8 * 16 / bits columns, dequantization) is handed to the AVX2 kernel.
 *
 * Why: at batch 1 the AVX2 kernel (dq_kernels_bcq_avx2.c) spends three
 * vector operations per 8 weights of a row (shift, vpermilps level lookup,
 * FMA), and on the CPUs measured the level lookup's port is the bottleneck:
 * one 256-bit permute per 8 weights caps it below the uniform W2 kernel,
 * which needs no lookup.  Here one zmm register holds the same step of TWO
 * rows (row A's 8 lane-words in the low 256 bits, row B's in the high 256),
 * and vpermilps on zmm permutes inside each 128-bit lane: with row A's 4
 * levels in both low 128-bit lanes of the table and row B's in both high
 * ones, one lookup serves 16 weights of two rows, with the packed layout
 * unchanged.  x is the same 8 floats broadcast to both halves.
 *
 * Compiled with per-function target attributes only, run only when
 * dq_cpu_has_avx512() says the CPU and the OS support AVX-512F.
 *
 * Summation order (differs from the reference, so results are compared
 * within a tolerance): per row, lane j sums level * x over its columns
 * 8t + j in NACC chains chosen by t % NACC (within a 16-bit half of a
 * lane-word, so the same for every row and thread split); the chains, then
 * the 8 lanes, are added at the end.  The levels are those of
 * dq_bcq_levels up to the sign of a zero level (+-alpha_i is made by a
 * sign flip, not a multiply by +-1), which no sum of products can see.
 */
#include "dq_kernels_bcq.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AVX512_INL __attribute__((target("avx512f,avx2,fma"), always_inline)) static inline
#define AVX512_FN __attribute__((target("avx512f,avx2,fma")))

/* Pairs of rows per pass (x is loaded once for all of them) and FMA chains
 * per pair: 8 chains in all, enough to hide the FMA latency.  Measured on
 * a Zen 5 CPU, 512 x 4096 (in L2), groups of 64 / 128: 4 x 2
 * took 0.81x / 0.77x the uniform W2 kernel's time, 2 x 4 0.90x / 0.88x,
 * 2 x 2 0.90x, 1 x 4 0.96x. */
#define PAIRS 4
#define NACC 2

static int avx512_fits(const dq_bcq_t *W, int64_t batch)
{
    if (batch != 1 || W->bits > 2) return 0;
    const int64_t half = 16 / W->bits; /* steps per 16-bit half of a lane-word */
    /* whole halves only, and groups that end at half boundaries */
    if (W->steps % half != 0) return 0;
    return W->G == 1 || (W->g % 8 == 0 && (W->g / 8) % half == 0);
}

/* The 4 levels of row r, group grp (2 bits; 1 bit: 2 levels, repeated) in
 * both 128-bit lanes of a ymm: entry e is index k = e & 3 (bits 2) or
 * e & 1 (bits 1).  Signs from the index bits as in dq_bcq_levels: plane i
 * is bit bits - 1 - i of k, set means -alpha_i; the first term is exact,
 * then each +-alpha_i and the offset are added in plane order. */
AVX512_INL __m256 levels4(const dq_bcq_t *W, int64_t r, int64_t grp, const int bits)
{
    const float *a = W->alpha + (r * W->G + grp) * bits;
    const __m256 neg0 = bits == 2 ? _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN))
                                  : _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN));
    __m256 lv = _mm256_xor_ps(_mm256_broadcast_ss(a), neg0);
    if (bits == 2) {
        const __m256 neg1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN));
        lv = _mm256_add_ps(lv, _mm256_xor_ps(_mm256_broadcast_ss(a + 1), neg1));
    }
    return _mm256_add_ps(lv, _mm256_broadcast_ss(W->offset + r * W->G + grp));
}

/* Row A's table in the low 256 bits, row B's in the high 256. */
AVX512_INL __m512 pair_tab(const dq_bcq_t *W, int64_t ra, int64_t rb, int64_t grp, const int bits)
{
    __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(levels4(W, ra, grp, bits)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(levels4(W, rb, grp, bits)), 1));
}

AVX512_INL __m512i pair_words(const uint32_t *a, const uint32_t *b)
{
    __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a));
    return _mm512_inserti64x4(lo, _mm256_loadu_si256((const __m256i *)b), 1);
}

AVX512_INL float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows rr[0 .. 2 * PAIRS) (repeats allowed) against x: res[i]. */
AVX512_INL void gemv_pairs(const dq_bcq_t *W, const float *x, const int64_t *rr, const int bits,
                           float *res)
{
    const int half = 16 / bits;
    const int64_t G = W->G, T = W->steps;
    const int64_t hsteps = G == 1 ? INT64_MAX : W->g / 8 / half; /* halves per group */
    __m512 acc[PAIRS][NACC], tab[PAIRS];
    const uint32_t *ra[PAIRS], *rb[PAIRS];
    for (int p = 0; p < PAIRS; p++) {
        for (int j = 0; j < NACC; j++) acc[p][j] = _mm512_setzero_ps();
        ra[p] = W->words + rr[2 * p] * W->row_words;
        rb[p] = W->words + rr[2 * p + 1] * W->row_words;
        tab[p] = pair_tab(W, rr[2 * p], rr[2 * p + 1], 0, bits);
    }
    int64_t left = hsteps, grp = 0;
    for (int64_t t = 0; t < T; t += half) {
        const int64_t off = 8 * (t / (2 * half));
        const int hi = (int)((t / half) & 1);
        __m512i q[PAIRS];
        for (int p = 0; p < PAIRS; p++) {
            q[p] = pair_words(ra[p] + off, rb[p] + off);
            if (hi) q[p] = _mm512_srli_epi32(q[p], 16);
        }
        const float *xt = x + 8 * t;
        _Pragma("GCC unroll 16") for (int k = 0; k < half; k++) {
            __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(xt + 8 * k))));
            for (int p = 0; p < PAIRS; p++) {
                /* slot k of the half: vpermilps reads the low bits of each lane */
                __m512i idx = k == 0 ? q[p] : _mm512_srli_epi32(q[p], bits * k);
                acc[p][k % NACC] = _mm512_fmadd_ps(_mm512_permutevar_ps(tab[p], idx), xv, acc[p][k % NACC]);
            }
        }
        if (--left == 0) {
            left = hsteps;
            if (++grp < G)
                for (int p = 0; p < PAIRS; p++) tab[p] = pair_tab(W, rr[2 * p], rr[2 * p + 1], grp, bits);
        }
    }
    for (int p = 0; p < PAIRS; p++) {
        __m512 s = acc[p][0];
        for (int j = 1; j < NACC; j++) s = _mm512_add_ps(s, acc[p][j]);
        res[2 * p] = hsum256(_mm512_castps512_ps256(s));
        res[2 * p + 1] = hsum256(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    }
}

AVX512_INL void dot_bits(const dq_bcq_t *W, const float *x, int64_t r0, int64_t r1, float *Y,
                         const int bits)
{
    enum { ROWS = 2 * PAIRS };
    float res[ROWS];
    for (int64_t r = r0; r < r1; r += ROWS) {
        int64_t rr[ROWS];
        /* a short last block repeats its last row; the copies are not stored */
        for (int i = 0; i < ROWS; i++) rr[i] = r + i < r1 ? r + i : r1 - 1;
        gemv_pairs(W, x, rr, bits, res);
        for (int i = 0; i < ROWS && r + i < r1; i++) Y[r + i] = res[i];
    }
}

AVX512_FN static dq_status avx512_dot(const dq_bcq_t *W, const float *xs, int64_t stride,
                                      int64_t batch, int64_t r0, int64_t r1, float *Y, int64_t ldy)
{
    if (!avx512_fits(W, batch)) return dq_bcq_kernel_avx2.dot(W, xs, stride, batch, r0, r1, Y, ldy);
    if (W->bits == 2)
        dot_bits(W, xs, r0, r1, Y, 2);
    else
        dot_bits(W, xs, r0, r1, Y, 1);
    return DQ_OK;
}

static int avx512_supports(const dq_bcq_t *W) { return dq_bcq_kernel_avx2.supports(W); }

static void avx512_dequant(const dq_bcq_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo)
{
    dq_bcq_kernel_avx2.dequant(W, r0, r1, out, ldo);
}

const dq_bcq_kernel_t dq_bcq_kernel_avx512 = {"avx512", avx512_supports, avx512_dot, avx512_dequant};

#else /* not x86: never listed (dq_cpu_has_avx512() is 0), kept for linking */

static int none_supports(const dq_bcq_t *W)
{
    (void)W;
    return 0;
}
const dq_bcq_kernel_t dq_bcq_kernel_avx512 = {"avx512", none_supports, NULL, NULL};

#endif
