/* AVX2 + FMA + F16C kernels, same signatures as dq_kernels_ref.c.
 *
 * Compiled with per-function target attributes only (no global -mavx2), and
 * run only when dq_cpu_has_avx2() says so.
 *
 * The code dot reads each slot with ONE vector AND: the result holds
 * u * 2^shift in every lane, because every 16-bit half of a packed word holds
 * whole slots (the high half is moved down once per word).  What happens
 * next is the only difference between the two variants:
 *   - "avx2": vcvtdq2ps turns u * 2^shift into a float, x was pre-scaled by
 *     2^-shift (exact), one FMA per 8 weights;
 *   - "avx2_subnormal": the AND result is used as a float bit pattern as is:
 *     u * 2^shift * 2^-149, a subnormal; x was pre-scaled by 2^(149-shift-e)
 *     and the dot is scaled back by 2^e at the end.  No conversion at all,
 *     which measured 1.4x to 1.7x faster on AMD Zen 1, whose FPU takes
 *     subnormal operands at full speed; CPUs that trap to microcode on them
 *     would be far slower, so dq_cpu.c times both once and keeps the faster.
 * Both variants round exactly alike: power-of-two scalings are exact, and
 * the FMA rounds u * x + acc once either way.
 *
 * Summation order (differs from the reference, so results are compared
 * within a tolerance): per row and batch row, lane j sums u * x over its
 * columns (8t + j) of a group in one chain; at the group's end the 8 lane
 * sums are scaled by s_g and added to 8 lane totals; the lanes are added at
 * the end, then the zero term.
 */
#include "dq_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INL __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

/* ---- small helpers ------------------------------------------------------ */

AVX2_INL __m256 as_float(__m256i v, const int subn)
{
    return subn ? _mm256_castsi256_ps(v) : _mm256_cvtepi32_ps(v);
}

AVX2_INL __m256i mask_and(__m256i q, uint32_t mask)
{
    return _mm256_and_si256(q, _mm256_set1_epi32((int)mask));
}

AVX2_INL __m256i load8(const uint32_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

AVX2_INL __m256i srl(__m256i v, int count)
{
    return _mm256_srl_epi32(v, _mm_cvtsi32_si128(count));
}

AVX2_INL float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_INL float sz_at(const void *p, int sz_type, int64_t i)
{
    if (sz_type == DQ_SZ_F16) return _cvtsh_ss(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* The 3-bit spare steps 30 and 31 of a block whose three lane-words start
 * at p, both at once: bit p of u sits at bit 15 (step 30) or 31 (step 31) of
 * word p, so moving word p down by 2 - p lines the three bits up at 13..15
 * (step 30) and 29..31 (step 31).  Step 30 is then (t & 7 << 13) and step 31
 * (t >> 16 & 7 << 13): shift 13 for both. */
AVX2_INL __m256i spare3_pair(const uint32_t *p)
{
    __m256i b0 = _mm256_and_si256(_mm256_srli_epi32(load8(p), 2), _mm256_set1_epi32(0x20002000));
    __m256i b1 = _mm256_and_si256(_mm256_srli_epi32(load8(p + 8), 1), _mm256_set1_epi32(0x40004000));
    __m256i b2 = _mm256_and_si256(load8(p + 16), _mm256_set1_epi32((int)0x80008000u));
    return _mm256_or_si256(_mm256_or_si256(b0, b1), b2);
}

AVX2_INL __m256i spare3_30(__m256i t) { return mask_and(t, 7u << 13); }
AVX2_INL __m256i spare3_31(__m256i t) { return mask_and(_mm256_srli_epi32(t, 16), 7u << 13); }

/* Masked slot of step t of a row, for any step (tails): u * 2^shift(t). */
AVX2_INL __m256i step_raw(const uint32_t *row, const int bits, int64_t t)
{
    if (bits == 2) {
        int i = (int)(t % 16);
        __m256i q = load8(row + 8 * (t / 16));
        if (i >= 8) q = _mm256_srli_epi32(q, 16);
        return mask_and(q, 3u << (2 * (i % 8)));
    }
    if (bits == 4) {
        int i = (int)(t % 8);
        __m256i q = load8(row + 8 * (t / 8));
        if (i >= 4) q = _mm256_srli_epi32(q, 16);
        return mask_and(q, 15u << (4 * (i % 4)));
    }
    int64_t blk = t / 32;
    int i = (int)(t % 32);
    const uint32_t *p = row + 24 * blk;
    if (i == 30) return spare3_30(spare3_pair(p));
    if (i == 31) return spare3_31(spare3_pair(p));
    int a = i / 10, k = i % 10;
    __m256i q = load8(p + 8 * a);
    if (k >= 5) q = _mm256_srli_epi32(q, 16);
    return mask_and(q, 7u << (3 * (k % 5)));
}

/* Zero term of row r for one batch row, 8 groups at a time. */
AVX2_INL float zero_term_avx2(const dq_packed_t *W, int64_t r, const float *sx)
{
    const int64_t G = W->G;
    int64_t grp = 0;
    __m256 acc = _mm256_setzero_ps();
    const __m256 qmin = _mm256_set1_ps((float)W->qmin);
    if (W->sz_type == DQ_SZ_F16) {
        const uint16_t *S = (const uint16_t *)W->scale + r * G;
        const uint16_t *Z = W->zero ? (const uint16_t *)W->zero + r * G : NULL;
        for (; grp + 8 <= G; grp += 8) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(S + grp)));
            __m256 z = Z ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(Z + grp)))
                         : _mm256_setzero_ps();
            __m256 c = _mm256_add_ps(z, _mm256_mul_ps(s, qmin));
            acc = _mm256_fmadd_ps(c, _mm256_loadu_ps(sx + grp), acc);
        }
    } else {
        const float *S = (const float *)W->scale + r * G;
        const float *Z = W->zero ? (const float *)W->zero + r * G : NULL;
        for (; grp + 8 <= G; grp += 8) {
            __m256 s = _mm256_loadu_ps(S + grp);
            __m256 z = Z ? _mm256_loadu_ps(Z + grp) : _mm256_setzero_ps();
            __m256 c = _mm256_add_ps(z, _mm256_mul_ps(s, qmin));
            acc = _mm256_fmadd_ps(c, _mm256_loadu_ps(sx + grp), acc);
        }
    }
    float tail = 0.0f;
    for (; grp < G; grp++) {
        float s = sz_at(W->scale, W->sz_type, r * G + grp);
        float z = W->zero ? sz_at(W->zero, W->sz_type, r * G + grp) : 0.0f;
        tail += (z + s * (float)W->qmin) * sx[grp];
    }
    return hsum(acc) + tail;
}

static int avx2_supports(const dq_packed_t *W) { return W->G == 1 || W->g % 8 == 0; }

/* ---- batch 1: R rows at a time ------------------------------------------ */

/* Rows per block: R independent FMA chains, enough to cover the FMA latency
 * (one chain per row: a group's partial sums need no extra adds). */
#ifndef GEMV_ROWS
#define GEMV_ROWS 4
#endif
#define R GEMV_ROWS

typedef struct {
    __m256 a[R], tot[R];
} accr_t;

/* One step for the R rows: q[i] is row i's current half-word. */
AVX2_INL void stepr(accr_t *A, const __m256i *q, uint32_t mask, const float *x, const int subn)
{
    __m256 xv = _mm256_loadu_ps(x);
    for (int i = 0; i < R; i++)
        A->a[i] = _mm256_fmadd_ps(as_float(mask_and(q[i], mask), subn), xv, A->a[i]);
}

/* Same with already masked slots v[i] (spare and tail steps). */
AVX2_INL void stepr_raw(accr_t *A, const __m256i *v, const float *x, const int subn)
{
    __m256 xv = _mm256_loadu_ps(x);
    for (int i = 0; i < R; i++) A->a[i] = _mm256_fmadd_ps(as_float(v[i], subn), xv, A->a[i]);
}

/* End of group grp: s holds the block's scales as float32, row i at s + i*G. */
AVX2_INL void flushr(accr_t *A, const float *s, int64_t G, int64_t grp)
{
    for (int i = 0; i < R; i++) {
        A->tot[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i * G + grp), A->a[i], A->tot[i]);
        A->a[i] = _mm256_setzero_ps();
    }
}

/* Scales of rows [r, r + nrows) as float32: the rows themselves when they
 * are float32, else converted into buf (nrows * G floats). */
AVX2_INL const float *scales_f32(const dq_packed_t *W, int64_t r, int nrows, float *buf)
{
    if (W->sz_type == DQ_SZ_F32) return (const float *)W->scale + r * W->G;
    const uint16_t *h = (const uint16_t *)W->scale + r * W->G;
    int64_t n = nrows * W->G, i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) buf[i] = _cvtsh_ss(h[i]);
    return buf;
}

/* Steps [t, t + NSLOTS) of one half-word: slot i of the half at bits i*BITS.
 * CHECK: look for the end of a group after every step (else groups end only
 * at half-word boundaries). */
#define HALFR(NSLOTS, BITS, MASK, CHECK)                                           \
    do {                                                                           \
        _Pragma("GCC unroll 8") for (int i_ = 0; i_ < (NSLOTS); i_++) {            \
            stepr(&A, q, (uint32_t)(MASK) << ((BITS) * i_), xs + 8 * t, subn);     \
            t++;                                                                   \
            if ((CHECK) && --left == 0) {                                          \
                flushr(&A, sr, G, grp++);                                          \
                left = gsteps;                                                     \
            }                                                                      \
        }                                                                          \
        if (!(CHECK) && (left -= (NSLOTS)) == 0) {                                 \
            flushr(&A, sr, G, grp++);                                              \
            left = gsteps;                                                         \
        }                                                                          \
    } while (0)

AVX2_INL void load_r(__m256i *q, const uint32_t *p, int64_t rw, int64_t o)
{
    for (int i = 0; i < R; i++) q[i] = load8(p + i * rw + o);
}

AVX2_INL void high_r(__m256i *q)
{
    for (int i = 0; i < R; i++) q[i] = _mm256_srli_epi32(q[i], 16);
}

/* Whole lane-words of a 2- or 4-bit row. */
#define WORDSR(CHECK)                                                              \
    for (int64_t w = 0; w < T / per_word; w++) {                                   \
        load_r(q, p, rw, 8 * w);                                                   \
        HALFR(half, bits, mask, CHECK);                                            \
        high_r(q);                                                                 \
        HALFR(half, bits, mask, CHECK);                                            \
    }

AVX2_INL void gemvr(const dq_packed_t *W, const dq_xprep_t *X, int64_t r, float *Y,
                    float *sbuf, const int bits, const int subn)
{
    const int64_t G = W->G, rw = W->row_words, T = W->steps;
    const float *sr = scales_f32(W, r, R, sbuf);
    const uint32_t *p = W->codes + r * rw;
    const float *xs = X->xs;
    /* Per-channel: one group as long as the row (a multiple of any half).
     * A short last group ends at the row's end (flushed after the loops). */
    const int64_t gsteps = G == 1 ? 8 * T : W->g / 8;
    int64_t left = gsteps, grp = 0, t = 0;
    accr_t A;
    __m256i q[R];
    for (int i = 0; i < R; i++) A.a[i] = A.tot[i] = _mm256_setzero_ps();

    if (bits == 2 || bits == 4) {
        const int per_word = bits == 2 ? 16 : 8, half = per_word / 2;
        const uint32_t mask = bits == 2 ? 3u : 15u;
        /* Groups of whole half-words (2 bits: g % 64, 4 bits: g % 32) need
         * no test after every step. */
        if (gsteps % half == 0) {
            WORDSR(0)
        } else {
            WORDSR(1)
        }
    } else {
        for (int64_t blk = 0; blk < T / 32; blk++) {
            for (int a = 0; a < 3; a++) {
                load_r(q, p, rw, 24 * blk + 8 * a);
                HALFR(5, 3, 7u, 1);
                high_r(q);
                HALFR(5, 3, 7u, 1);
            }
            for (int i = 0; i < R; i++) q[i] = spare3_pair(p + i * rw + 24 * blk);
            for (int j = 0; j < 2; j++) {
                __m256i v[R];
                for (int i = 0; i < R; i++) v[i] = j ? spare3_31(q[i]) : spare3_30(q[i]);
                stepr_raw(&A, v, xs + 8 * t, subn);
                t++;
                if (--left == 0) {
                    flushr(&A, sr, G, grp++);
                    left = gsteps;
                }
            }
        }
    }
    /* Steps after the last full word or block. */
    for (; t < T; t++) {
        __m256i v[R];
        for (int i = 0; i < R; i++) v[i] = step_raw(p + i * rw, bits, t);
        stepr_raw(&A, v, xs + 8 * t, subn);
        if (--left == 0) {
            flushr(&A, sr, G, grp++);
            left = gsteps;
        }
    }
    /* The last group ends at the row's end without a flush when it is
     * shorter than gsteps (a short last group, or the one group of a
     * per-channel row). */
    if (grp < G) flushr(&A, sr, G, grp);
    for (int i = 0; i < R; i++) {
        float zt = zero_term_avx2(W, r + i, X->sx);
        Y[r + i] = dq_finish(hsum(A.tot[i]), X->e[0], X->post[0], zt);
    }
}

/* ---- one row against up to four batch rows ------------------------------ */

typedef struct {
    __m256 a[4], tot[4];
} accb_t;

AVX2_INL void stepb(accb_t *A, __m256i v, const int nb, const float *x, int64_t stride,
                    const int subn)
{
    __m256 w = as_float(v, subn);
    for (int b = 0; b < nb; b++)
        A->a[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * stride), A->a[b]);
}

AVX2_INL void flushb(accb_t *A, float s, const int nb)
{
    __m256 sv = _mm256_set1_ps(s);
    for (int b = 0; b < nb; b++) {
        A->tot[b] = _mm256_fmadd_ps(sv, A->a[b], A->tot[b]);
        A->a[b] = _mm256_setzero_ps();
    }
}

#define HALFB(NSLOTS, BITS, MASK)                                                          \
    do {                                                                                   \
        _Pragma("GCC unroll 8") for (int i_ = 0; i_ < (NSLOTS); i_++) {                    \
            stepb(&A, mask_and(q, (uint32_t)(MASK) << ((BITS) * i_)), nb, xs + 8 * t,      \
                  stride, subn);                                                           \
            t++;                                                                           \
            if (--left == 0) {                                                             \
                flushb(&A, s1[grp++], nb);                                                 \
                left = gsteps;                                                             \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* Row r against batch rows b0 .. b0 + nb - 1. */
AVX2_INL void rowb(const dq_packed_t *W, const dq_xprep_t *X, int64_t r, int64_t b0, float *Y,
                   int64_t ldy, const float *s1, const int bits, const int nb, const int subn)
{
    const uint32_t *p = W->codes + r * W->row_words;
    const int64_t T = W->steps, stride = X->stride;
    const float *xs = X->xs + b0 * stride;
    const int64_t gsteps = W->G == 1 ? INT64_MAX : W->g / 8;
    int64_t left = gsteps, grp = 0, t = 0;
    accb_t A;
    for (int b = 0; b < 4; b++) A.a[b] = A.tot[b] = _mm256_setzero_ps();

    if (bits == 2 || bits == 4) {
        const int per_word = bits == 2 ? 16 : 8, half = per_word / 2;
        const uint32_t mask = bits == 2 ? 3u : 15u;
        for (int64_t w = 0; w < T / per_word; w++) {
            __m256i q = load8(p + 8 * w);
            HALFB(half, bits, mask);
            q = _mm256_srli_epi32(q, 16);
            HALFB(half, bits, mask);
        }
    } else {
        for (int64_t blk = 0; blk < T / 32; blk++) {
            for (int a = 0; a < 3; a++) {
                __m256i q = load8(p + 24 * blk + 8 * a);
                HALFB(5, 3, 7u);
                q = _mm256_srli_epi32(q, 16);
                HALFB(5, 3, 7u);
            }
            __m256i sp = spare3_pair(p + 24 * blk);
            for (int j = 0; j < 2; j++) {
                stepb(&A, j ? spare3_31(sp) : spare3_30(sp), nb, xs + 8 * t, stride, subn);
                t++;
                if (--left == 0) {
                    flushb(&A, s1[grp++], nb);
                    left = gsteps;
                }
            }
        }
    }
    for (; t < T; t++) {
        stepb(&A, step_raw(p, bits, t), nb, xs + 8 * t, stride, subn);
        if (--left == 0) {
            flushb(&A, s1[grp++], nb);
            left = gsteps;
        }
    }
    if (grp < W->G) flushb(&A, s1[grp], nb); /* a short last group, or per-channel */
    for (int b = 0; b < nb; b++) {
        float zt = zero_term_avx2(W, r, X->sx + (b0 + b) * W->G);
        Y[(b0 + b) * ldy + r] = dq_finish(hsum(A.tot[b]), X->e[b0 + b], X->post[b0 + b], zt);
    }
}

/* ---- entry points ---------------------------------------------------------- */

AVX2_INL dq_status qdot_bits(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0, int64_t r1,
                        float *Y, int64_t ldy, const int bits, const int subn)
{
    /* Room for R rows of scales converted from float16. */
    float *sbuf = (float *)dq_malloc((size_t)(R * W->G) * sizeof(float));
    if (!sbuf) return DQ_ENOMEM;
    int64_t r = r0;
    if (X->batch == 1)
        for (; r + R <= r1; r += R) gemvr(W, X, r, Y, sbuf, bits, subn);
    for (; r < r1; r++) {
        const float *s1 = scales_f32(W, r, 1, sbuf);
        int64_t b = 0;
        for (; b + 4 <= X->batch; b += 4) rowb(W, X, r, b, Y, ldy, s1, bits, 4, subn);
        switch (X->batch - b) {
        case 3: rowb(W, X, r, b, Y, ldy, s1, bits, 3, subn); break;
        case 2: rowb(W, X, r, b, Y, ldy, s1, bits, 2, subn); break;
        case 1: rowb(W, X, r, b, Y, ldy, s1, bits, 1, subn); break;
        default: break;
        }
    }
    dq_free(sbuf);
    return DQ_OK;
}

/* Subnormal operands must not be flushed: clear DAZ and FTZ for the call
 * (MXCSR is per thread; restored on the way out). */
AVX2_INL dq_status qdot_any(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0, int64_t r1,
                            float *Y, int64_t ldy, const int subn)
{
    unsigned int csr = _mm_getcsr();
    if (subn) _mm_setcsr(csr & ~(0x0040u | 0x8000u));
    dq_status st = DQ_EINVAL;
    switch (W->bits) {
    case 2: st = qdot_bits(W, X, r0, r1, Y, ldy, 2, subn); break;
    case 3: st = qdot_bits(W, X, r0, r1, Y, ldy, 3, subn); break;
    case 4: st = qdot_bits(W, X, r0, r1, Y, ldy, 4, subn); break;
    default: break;
    }
    if (subn) _mm_setcsr(csr);
    return st;
}

static AVX2_FN dq_status qdot_cvt(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0,
                                  int64_t r1, float *Y, int64_t ldy)
{
    return qdot_any(W, X, r0, r1, Y, ldy, 0);
}

static AVX2_FN dq_status qdot_subn(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0,
                                   int64_t r1, float *Y, int64_t ldy)
{
    return qdot_any(W, X, r0, r1, Y, ldy, 1);
}

/* u of step t of a row (any step), as int32 lanes. */
AVX2_INL __m256i step_u(const uint32_t *row, const int bits, int64_t t)
{
    if (bits == 3 && t % 32 >= 30) return srl(step_raw(row, 3, t), 13);
    int sh, per_word = bits == 2 ? 16 : (bits == 4 ? 8 : 10);
    const uint32_t *w;
    if (bits == 3) {
        int i = (int)(t % 32), k = i % 10;
        w = row + 24 * (t / 32) + 8 * (i / 10);
        sh = k < 5 ? 3 * k : 16 + 3 * (k - 5);
    } else {
        w = row + 8 * (t / per_word);
        sh = bits * (int)(t % per_word);
    }
    return mask_and(srl(load8(w), sh), (1u << bits) - 1u);
}

/* code * s + z per 8 columns: product and sum rounded separately, exactly
 * like the reference (no FMA), so the tiles are bit-identical. */
AVX2_INL void dequant_bits(const dq_packed_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo,
                           const int bits)
{
    const __m256i qmin = _mm256_set1_epi32(W->qmin);
    const int64_t G = W->G, gsteps = G == 1 ? W->steps : W->g / 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->codes + r * W->row_words;
        float *o = out + (r - r0) * ldo;
        int64_t t = 0;
        for (int64_t grp = 0; grp < G; grp++) {
            __m256 s = _mm256_set1_ps(sz_at(W->scale, W->sz_type, r * G + grp));
            __m256 z = W->zero ? _mm256_set1_ps(sz_at(W->zero, W->sz_type, r * G + grp))
                               : _mm256_setzero_ps();
            int64_t tend = grp == G - 1 ? W->steps : t + gsteps;
            for (; t < tend; t++) {
                __m256 code = _mm256_cvtepi32_ps(_mm256_add_epi32(step_u(row, bits, t), qmin));
                __m256 v = _mm256_add_ps(_mm256_mul_ps(code, s), z);
                if (8 * t + 8 <= ldo) {
                    _mm256_storeu_ps(o + 8 * t, v);
                } else {
                    float tmp[8];
                    _mm256_storeu_ps(tmp, v);
                    memcpy(o + 8 * t, tmp, (size_t)(ldo - 8 * t) * sizeof(float));
                }
            }
        }
    }
}

static AVX2_FN void dequant_avx2(const dq_packed_t *W, int64_t r0, int64_t r1, float *out,
                                 int64_t ldo)
{
    switch (W->bits) {
    case 2: dequant_bits(W, r0, r1, out, ldo, 2); break;
    case 3: dequant_bits(W, r0, r1, out, ldo, 3); break;
    case 4: dequant_bits(W, r0, r1, out, ldo, 4); break;
    default: break;
    }
}

const dq_kernel_t dq_kernel_avx2 = {
    "avx2", DQ_XMODE_SHIFT, avx2_supports, qdot_cvt, dequant_avx2,
};
const dq_kernel_t dq_kernel_avx2_subn = {
    "avx2_subnormal", DQ_XMODE_SUBNORMAL, avx2_supports, qdot_subn, dequant_avx2,
};

#else /* not x86: the tables exist so the dispatcher links; never selected */

static int never(const dq_packed_t *W)
{
    (void)W;
    return 0;
}
const dq_kernel_t dq_kernel_avx2 = {"avx2", DQ_XMODE_SHIFT, never, dq_qdot_ref, dq_dequant_ref};
const dq_kernel_t dq_kernel_avx2_subn = {"avx2_subnormal", DQ_XMODE_SUBNORMAL, never, dq_qdot_ref,
                                         dq_dequant_ref};
#endif
