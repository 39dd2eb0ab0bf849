/* AVX2 + FMA BCQ kernels, same signatures as dq_kernels_bcq_ref.c.
 *
 * Compiled with per-function target attributes only (no global -mavx2), and
 * run only when dq_cpu_has_avx2() says so.
 *
 * A step (8 columns, one per lane) of a row costs three vector operations
 * whatever the number of sign planes up to 3: the lane-words are shifted
 * right by `bits` per step, a permute looks the level up in a table held in
 * a register with the low bits of each lane as the index (bits above are
 * ignored by the instruction, so no AND is needed), and one FMA adds
 * level * x.  Up to 2 bits the in-lane vpermilps serves (each 128-bit half
 * holds the 4 levels); at 3 bits the cross-lane vpermps (8 entries); at 4
 * bits the 16 levels are two vpermps tables chosen by the slot's top bit
 * moved to the sign bit (vblendvps).  The tables are rebuilt at each group
 * start (g % 8 == 0 is required, else the reference serves) and include the
 * offset, so no per-group sums of x are needed.
 *
 * Cost against the uniform kernels (dq_kernels_avx2.c), measured on the 2-core
 * a Zen 5 CPU under load, 4096 x 4096 at batch 1: per channel at 2
 * bits this is as fast as the uniform W2 kernel; with groups of 64 or 128 it
 * takes about 1.25-1.4x its time, because the uniform kernel's subnormal
 * variant needs two operations per step (AND, FMA) and one per group, where
 * a level table costs about three per row and group.  At 4 bits the extra
 * lookup and blend make it 1.5-3x slower; batches of 8-16 are on par or
 * faster.
 *
 * Summation order (differs from the reference, so results are compared
 * within a tolerance): per row and batch row, lane j sums level * x over its
 * columns 8t + j in one FMA chain; the 8 lanes are added at the end.
 */
#include "dq_kernels_bcq.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma")))
#define AVX2_INL __attribute__((target("avx2,fma"), always_inline)) static inline

AVX2_INL float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static int avx2_supports(const dq_bcq_t *W) { return W->G == 1 || W->g % 8 == 0; }

/* The level tables of row r, group grp: lo holds levels k & 7 (repeated
 * when bits < 3), hi levels 8 + (k & 7) (bits == 4 only). */
typedef struct {
    __m256 lo, hi;
} tab_t;

/* Sign (+1 or -1) of table entry e for a plane read from bit p (< 3) of e. */
static const float SIGN_OF_BIT[3][8] = {
    {1, -1, 1, -1, 1, -1, 1, -1},
    {1, 1, -1, -1, 1, 1, -1, -1},
    {1, 1, 1, 1, -1, -1, -1, -1},
};

AVX2_INL tab_t tab_from(const float *a, const float *offp, const int bits)
{
    /* Entry e of a table is index k = e (lo) or 8 + e (hi), or e mod 2^bits
     * when bits < 3 (the same low bits), so plane i's sign is bit
     * p = bits - 1 - i of e when p < 3, and + (lo) / - (hi) when p == 3.
     * The reference adds +-alpha_i in plane order starting from 0: the
     * first term is exact (a multiply by +-1), each later one is one FMA
     * (alpha_i * +-1 + acc, rounded once, like the reference's add), then
     * the offset: the same bits as dq_bcq_levels, in three to five vector
     * operations per table. */
    __m256 lo, hi = _mm256_setzero_ps();
    if (bits == 4) {
        lo = _mm256_broadcast_ss(a);
        hi = _mm256_sub_ps(hi, lo);
    } else {
        /* +-alpha_0 + 0, not a plain product: 0 + (-0) is +0 as in the reference */
        lo = _mm256_fmadd_ps(_mm256_broadcast_ss(a), _mm256_loadu_ps(SIGN_OF_BIT[bits - 1]), hi);
    }
    for (int i = 1; i < bits; i++) {
        const int p = bits - 1 - i;
        __m256 ai = _mm256_broadcast_ss(a + i), sg = _mm256_loadu_ps(SIGN_OF_BIT[p]);
        lo = _mm256_fmadd_ps(ai, sg, lo);
        if (bits == 4) hi = _mm256_fmadd_ps(ai, sg, hi);
    }
    __m256 off = _mm256_broadcast_ss(offp);
    tab_t t = {_mm256_add_ps(lo, off), bits == 4 ? _mm256_add_ps(hi, off) : lo};
    return t;
}

/* The tables of row r, group grp. */
AVX2_INL tab_t make_tab(const dq_bcq_t *W, int64_t r, int64_t grp, const int bits)
{
    return tab_from(W->alpha + (r * W->G + grp) * bits, W->offset + r * W->G + grp, bits);
}

/* The levels of the current slot of q (its low bits) in the 8 lanes. */
AVX2_INL __m256 lookup(const tab_t *t, __m256i q, const int bits)
{
    /* Up to 4 levels: the in-lane vpermilps (index bits 1:0, each 128-bit
     * half holds the 4 levels) is cheaper than the cross-lane vpermps. */
    if (bits <= 2) return _mm256_permutevar_ps(t->lo, q);
    __m256 lo = _mm256_permutevar8x32_ps(t->lo, q);
    if (bits < 4) return lo;
    __m256 hi = _mm256_permutevar8x32_ps(t->hi, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

/* Rows rr[0..R) (repeats allowed: the caller stores only the distinct
 * ones) times batch rows [b0, b0 + B): acc[i][j] in registers.  R and B are
 * compile-time constants at every call, so the loops unroll. */
AVX2_INL void block(const dq_bcq_t *W, const float *xs, int64_t stride, int64_t b0,
                    const int64_t *rr, const int R, const int B, const int bits, float *res)
{
    __m256 acc[4][4];
    tab_t tab[4];
    __m256i q[4];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) acc[i][j] = _mm256_setzero_ps();
    const int slots = 32 / bits;
    const int64_t gsteps = W->G == 1 ? W->steps : W->g / 8;
    const uint32_t *rows[4];
    const float *ar[4], *orow[4]; /* each row's alpha and offset, advanced group by group */
    for (int i = 0; i < R; i++) {
        rows[i] = W->words + rr[i] * W->row_words;
        ar[i] = W->alpha + rr[i] * W->G * bits;
        orow[i] = W->offset + rr[i] * W->G;
    }
    /* Groups outside, then runs of steps that stay inside one group and one
     * block: the innermost loop has no test but its own bound. */
    int64_t t = 0;
    int s = 0;
    for (int64_t grp = 0; grp < W->G; grp++) {
        for (int i = 0; i < R; i++) tab[i] = tab_from(ar[i] + grp * bits, orow[i] + grp, bits);
        const int64_t gend = grp + 1 == W->G ? W->steps : t + gsteps;
        while (t < gend) {
            if (s == 0)
                for (int i = 0; i < R; i++)
                    q[i] = _mm256_loadu_si256((const __m256i *)(rows[i] + 8 * (t / slots)));
            int64_t run = gend - t < slots - s ? gend - t : slots - s;
            const float *xt = xs + b0 * stride + 8 * t;
            for (int64_t k = 0; k < run; k++, xt += 8) {
                __m256 v[4];
                for (int i = 0; i < R; i++) {
                    v[i] = lookup(&tab[i], q[i], bits);
                    q[i] = _mm256_srli_epi32(q[i], bits);
                }
                for (int j = 0; j < B; j++) {
                    __m256 xv = _mm256_loadu_ps(xt + j * stride);
                    for (int i = 0; i < R; i++) acc[i][j] = _mm256_fmadd_ps(v[i], xv, acc[i][j]);
                }
            }
            t += run;
            s = (int)((s + run) % slots);
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < B; j++) res[i * 4 + j] = hsum(acc[i][j]);
}

/* Rows in blocks of R, batch rows in chunks of B; tails repeat the last
 * row (the work is thrown away) and batch leftovers go one at a time. */
AVX2_INL void dot_bits(const dq_bcq_t *W, const float *xs, int64_t stride, int64_t batch,
                       int64_t r0, int64_t r1, float *Y, int64_t ldy, const int bits)
{
    float res[16];
    for (int64_t r = r0; r < r1; r += 4) {
        int64_t rr[4];
        for (int i = 0; i < 4; i++) rr[i] = r + i < r1 ? r + i : r1 - 1;
        int64_t b = 0;
        /* two rows x four batch rows: 8 accumulators, x loaded once per 2 rows */
        for (; b + 4 <= batch; b += 4) {
            for (int h = 0; h < 4; h += 2) {
                block(W, xs, stride, b, rr + h, 2, 4, bits, res);
                for (int i = 0; i < 2; i++)
                    if (r + h + i < r1)
                        for (int j = 0; j < 4; j++) Y[(b + j) * ldy + r + h + i] = res[i * 4 + j];
            }
        }
        for (; b < batch; b++) {
            block(W, xs, stride, b, rr, 4, 1, bits, res);
            for (int i = 0; i < 4; i++)
                if (r + i < r1) Y[b * ldy + r + i] = res[i * 4];
        }
    }
}

AVX2_FN static dq_status avx2_dot(const dq_bcq_t *W, const float *xs, int64_t stride,
                                  int64_t batch, int64_t r0, int64_t r1, float *Y, int64_t ldy)
{
    switch (W->bits) {
    case 1: dot_bits(W, xs, stride, batch, r0, r1, Y, ldy, 1); break;
    case 2: dot_bits(W, xs, stride, batch, r0, r1, Y, ldy, 2); break;
    case 3: dot_bits(W, xs, stride, batch, r0, r1, Y, ldy, 3); break;
    case 4: dot_bits(W, xs, stride, batch, r0, r1, Y, ldy, 4); break;
    default: return DQ_EINVAL;
    }
    return DQ_OK;
}

AVX2_INL void dequant_bits(const dq_bcq_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo,
                           const int bits)
{
    const int slots = 32 / bits;
    const int64_t gsteps = W->G == 1 ? INT64_MAX : W->g / 8;
    const int64_t nblk = W->row_words / 8;
    const int64_t full = W->in / 8; /* steps stored with one 8-float store */
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->words + r * W->row_words;
        float *o = out + (r - r0) * ldo;
        tab_t tab = make_tab(W, r, 0, bits);
        int64_t grp = 0, next = gsteps;
        for (int64_t blk = 0; blk < nblk; blk++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(row + 8 * blk));
            int64_t t = blk * slots;
            int64_t tend = t + slots < W->steps ? t + slots : W->steps;
            for (; t < tend; t++) {
                if (t == next) {
                    grp++;
                    tab = make_tab(W, r, grp, bits);
                    next = grp + 1 < W->G ? next + gsteps : INT64_MAX;
                }
                __m256 v = lookup(&tab, q, bits);
                q = _mm256_srli_epi32(q, bits);
                if (t < full) {
                    _mm256_storeu_ps(o + 8 * t, v);
                } else { /* the last, partial step: only columns < in */
                    float tmp[8];
                    _mm256_storeu_ps(tmp, v);
                    for (int64_t c = 8 * t; c < W->in; c++) o[c] = tmp[c - 8 * t];
                }
            }
        }
    }
}

AVX2_FN static void avx2_dequant(const dq_bcq_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo)
{
    switch (W->bits) {
    case 1: dequant_bits(W, r0, r1, out, ldo, 1); break;
    case 2: dequant_bits(W, r0, r1, out, ldo, 2); break;
    case 3: dequant_bits(W, r0, r1, out, ldo, 3); break;
    default: dequant_bits(W, r0, r1, out, ldo, 4); break;
    }
}

const dq_bcq_kernel_t dq_bcq_kernel_avx2 = {"avx2", avx2_supports, avx2_dot, avx2_dequant};

#else /* not x86: never listed (dq_cpu_has_avx2() is 0), kept for linking */

static int none_supports(const dq_bcq_t *W)
{
    (void)W;
    return 0;
}
const dq_bcq_kernel_t dq_bcq_kernel_avx2 = {"avx2", none_supports, NULL, NULL};

#endif
