/* Pack and unpack 2/3/4-bit codes: the reference codec of the packed layout.
 *
 * THE specification of the layout is the module docstring of
 * decoupleq/packing.py; this is a summary for readers of the C side.
 *   - stored value u = code - qmin, 0 .. 2^bits - 1; unused bits are 0.
 *   - column c of a row is lane j = c % 8 of step t = c / 8; a lane-word is
 *     8 little-endian uint32 (index 8 * w + j within the row), one per lane.
 *   - 2 bits: lane-word t / 16, slot i = t % 16 at bits 2i .. 2i+1.
 *   - 4 bits: lane-word t / 8, slot i = t % 8 at bits 4i .. 4i+3.
 *   - 3 bits: blocks of 32 steps in 3 lane-words (3B, 3B+1, 3B+2).  Step
 *     i < 30 of a block: word a = i / 10, k = i % 10, at bits 3k (k < 5) or
 *     16 + 3(k - 5) (k >= 5); step 30: bit p of u at bit 15 of word p;
 *     step 31: bit p of u at bit 31 of word p.  A final block of r < 32
 *     steps has ceil(r / 10) lane-words (3 if r > 30).
 *   - a row has 8 * (number of lane-words) uint32; rows follow each other.
 * Each 16-bit half of a word holds whole slots, so a kernel reads the low
 * half with one AND per slot and the high half after one 16-bit shift.
 */
#include "dq_kernels.h"

#include <stdlib.h>

static int64_t lane_words(int bits, int64_t steps)
{
    switch (bits) {
    case 2: return (steps + 15) / 16;
    case 4: return (steps + 7) / 8;
    case 3: {
        int64_t full = steps / 32, r = steps % 32;
        int64_t tail = r == 0 ? 0 : (r > 30 ? 3 : (r + 9) / 10);
        return 3 * full + tail;
    }
    default: return -1;
    }
}

int64_t dq_pack_row_words(int bits, int64_t in)
{
    /* Above this, (in + 7) and 8 * lane-words could overflow int64. */
    if (in < 1 || in > DQ_PACK_MAX_IN) return -1;
    int64_t lw = lane_words(bits, (in + 7) / 8);
    return lw < 0 ? -1 : 8 * lw;
}

/* Where bit p (0 .. bits-1) of column c lives: word index within the row
 * and bit position within that word. */
static void locate(int bits, int64_t c, int p, int64_t *word, int *bit)
{
    int64_t t = c / 8, j = c % 8;
    if (bits == 2) {
        *word = 8 * (t / 16) + j;
        *bit = (int)(2 * (t % 16)) + p;
    } else if (bits == 4) {
        *word = 8 * (t / 8) + j;
        *bit = (int)(4 * (t % 8)) + p;
    } else {
        int64_t blk = t / 32;
        int i = (int)(t % 32);
        if (i < 30) {
            int a = i / 10, k = i % 10;
            *word = 8 * (3 * blk + a) + j;
            *bit = (k < 5 ? 3 * k : 16 + 3 * (k - 5)) + p;
        } else {
            *word = 8 * (3 * blk + p) + j;
            *bit = i == 30 ? 15 : 31;
        }
    }
}

uint32_t dq_pack_get(const uint32_t *row, int bits, int64_t c)
{
    uint32_t u = 0;
    for (int p = 0; p < bits; p++) {
        int64_t w;
        int b;
        locate(bits, c, p, &w, &b);
        u |= ((row[w] >> b) & 1u) << p;
    }
    return u;
}

int dq_pack_decode_shift(int bits, int64_t t)
{
    if (bits == 2) return (int)(2 * (t % 8));
    if (bits == 4) return (int)(4 * (t % 4));
    int i = (int)(t % 32);
    return i < 30 ? 3 * ((i % 10) % 5) : 13; /* spare steps: see spare3_pair */
}

typedef struct {
    const int8_t *codes;
    uint32_t *packed;
    int64_t in, row_words;
    int bits;
} pack_ctx;

static void pack_rows(void *vctx, int64_t r0, int64_t r1)
{
    pack_ctx *ctx = (pack_ctx *)vctx;
    int qmin = dq_qmin(ctx->bits);
    for (int64_t r = r0; r < r1; r++) {
        uint32_t *row = ctx->packed + r * ctx->row_words;
        const int8_t *a = ctx->codes + r * ctx->in;
        memset(row, 0, (size_t)ctx->row_words * sizeof *row);
        for (int64_t c = 0; c < ctx->in; c++) {
            uint32_t u = (uint32_t)(a[c] - qmin);
            for (int p = 0; p < ctx->bits; p++) {
                int64_t w;
                int b;
                locate(ctx->bits, c, p, &w, &b);
                row[w] |= ((u >> p) & 1u) << b;
            }
        }
    }
}

static void unpack_rows(void *vctx, int64_t r0, int64_t r1)
{
    pack_ctx *ctx = (pack_ctx *)vctx;
    int qmin = dq_qmin(ctx->bits);
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = ctx->packed + r * ctx->row_words;
        int8_t *a = (int8_t *)ctx->codes + r * ctx->in;
        for (int64_t c = 0; c < ctx->in; c++)
            a[c] = (int8_t)((int)dq_pack_get(row, ctx->bits, c) + qmin);
    }
}

dq_status dq_pack(const int8_t *codes, int64_t out, int64_t in, int bits, uint32_t *packed,
                  int64_t *bad)
{
    int64_t rw = dq_pack_row_words(bits, in);
    if (rw < 0 || out < 0) return DQ_EINVAL;
    int qmin = dq_qmin(bits), qmax = dq_qmax(bits);
    /* Range check first, so nothing is written for a bad input. */
    for (int64_t i = 0; i < out * in; i++) {
        if (codes[i] < qmin || codes[i] > qmax) {
            if (bad) *bad = i;
            return DQ_EINVAL;
        }
    }
    pack_ctx ctx = {codes, packed, in, rw, bits};
    return dq_parallel_for(out, 64, dq_num_threads(), pack_rows, &ctx);
}

dq_status dq_unpack(const uint32_t *packed, int64_t out, int64_t in, int bits, int8_t *codes)
{
    int64_t rw = dq_pack_row_words(bits, in);
    if (rw < 0 || out < 0) return DQ_EINVAL;
    pack_ctx ctx = {codes, (uint32_t *)packed, in, rw, bits};
    return dq_parallel_for(out, 64, dq_num_threads(), unpack_rows, &ctx);
}

dq_status dq_packed_describe(dq_packed_t *W, int64_t out, int64_t in, int bits,
                             int64_t group_size)
{
    if (bits < 2 || bits > 4 || in < 1 || out < 0) return DQ_EINVAL;
    if (group_size == -1) group_size = in;
    if (group_size < 1) return DQ_EINVAL;
    if (group_size > in) group_size = in; /* one group per row either way */
    W->out = out;
    W->in = in;
    W->bits = bits;
    W->qmin = dq_qmin(bits);
    W->g = group_size;
    W->G = dq_num_groups(in, group_size); /* the last group is short if g does not divide in */
    W->steps = (in + 7) / 8;
    W->row_words = dq_pack_row_words(bits, in);
    return DQ_OK;
}

/* ---- prepared activations ---------------------------------------------- */

void dq_xprep_free(dq_xprep_t *X)
{
    dq_free(X->xs);
    dq_free(X->sx);
    dq_free(X->e);
    dq_free(X->post);
    memset(X, 0, sizeof *X);
}

dq_status dq_xprep_init(dq_xprep_t *X, const dq_packed_t *W, const float *x, int64_t batch,
                        int xmode)
{
    memset(X, 0, sizeof *X);
    X->batch = batch;
    X->stride = (W->steps * 8 + 15) / 16 * 16;
    X->xs = (float *)dq_calloc((size_t)(batch * X->stride) * sizeof(float));
    X->sx = (float *)dq_malloc((size_t)(batch * W->G) * sizeof(float));
    X->e = (int *)dq_malloc((size_t)batch * sizeof(int));
    X->post = (float *)dq_malloc((size_t)batch * sizeof(float));
    if (!X->xs || !X->sx || !X->e || !X->post) {
        dq_xprep_free(X);
        return DQ_ENOMEM;
    }
    const int64_t n = W->in;
    /* 2^(-shift) per step; the pattern repeats every 32 steps. */
    int shift[32];
    for (int t = 0; t < 32; t++) shift[t] = dq_pack_decode_shift(W->bits, t);
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * n;
        float *xs = X->xs + b * X->stride;
        float *sx = X->sx + b * W->G;
        for (int64_t grp = 0; grp < W->G; grp++) {
            float acc = 0.0f;
            const int64_t c1 = grp * W->g + dq_group_width(n, W->g, grp);
            for (int64_t c = grp * W->g; c < c1; c++) acc += xb[c];
            sx[grp] = acc;
        }
        int e = 0;
        if (xmode == DQ_XMODE_SUBNORMAL) {
            /* |x| < 2^E; then x * 2^(149 - shift - e) < 2^128 with e = 21 + E,
             * and products u * x * 2^-e stay normal for all but x smaller
             * than max|x| by 2^100. */
            float amax = 0.0f;
            for (int64_t c = 0; c < n; c++) {
                float a = fabsf(xb[c]);
                if (a > amax) amax = a;
            }
            int E = 0;
            if (isfinite(amax) && amax > 0.0f) frexpf(amax, &E);
            e = 21 + E;
        }
        X->e[b] = e;
        X->post[b] = (e >= -126 && e <= 127) ? ldexpf(1.0f, e) : 0.0f;
        if (xmode == DQ_XMODE_PLAIN) {
            memcpy(xs, xb, (size_t)n * sizeof(float));
        } else {
            /* Power-of-two factors in double: exact, and no range trouble
             * for the factor itself. */
            double f[32];
            for (int t = 0; t < 32; t++)
                f[t] = ldexp(1.0, (xmode == DQ_XMODE_SUBNORMAL ? 149 - e : 0) - shift[t]);
            for (int64_t c = 0; c < n; c++) xs[c] = (float)((double)xb[c] * f[(c / 8) % 32]);
        }
    }
    return DQ_OK;
}
