/* Binary-coding (BCQ) weights in packed form, and the kernels that multiply
 * by them.
 *
 * A BCQ weight is w[r, c] = sum_i alpha[r, grp, i] * beta_i(k) + offset[r, grp]
 * with k = idx[r, c] in [0, 2^bits), grp = c / g, and beta_i(k) = +1 when bit
 * (bits - 1 - i) of k is 0, else -1.  The layout "decoupleq-bcq-lanes8-v1" is
 * specified in ONE place, the module docstring of decoupleq/bcq.py; in short:
 * a row of `in` columns is cut into steps of 8 columns (column c is lane c % 8
 * of step c / 8); a block is 8 consecutive uint32 (a lane-word per lane), and
 * holds `slots` = 32 / bits consecutive steps; step s of a block sits at bits
 * [bits * s, bits * s + bits) of its lane's word, so the bits sign planes of
 * one weight lie side by side (plane i is bit bits - 1 - i of the slot).
 * Padding slots are zero.
 *
 * Kernels compute Y = X * What^T for X batch x in (float32).  Every kernel
 * first turns (alpha, offset) of a row's group into its 2^bits levels
 * (dq_bcq_levels, in the order of the definition above), then sums
 * level(idx) * x: a level is one table lookup (AVX2: one vpermps), so the
 * cost per weight does not grow with the number of sign planes the way one
 * masked sum per plane would.
 */
#ifndef DQ_KERNELS_BCQ_H
#define DQ_KERNELS_BCQ_H

#include "dq_common.h"

#define DQ_BCQ_MAX_BITS 4

typedef struct {
    int64_t out, in;      /* logical weight shape: rows x columns */
    int bits;             /* 1 .. DQ_BCQ_MAX_BITS */
    int slots;            /* steps per lane-word: 32 / bits */
    int64_t g;            /* group size in columns (== in when per-channel) */
    int64_t G;            /* groups per row */
    int64_t steps;        /* ceil(in / 8) */
    int64_t row_words;    /* uint32 per packed row: 8 * ceil(steps / slots) */
    const uint32_t *words; /* out x row_words */
    const float *alpha;   /* out x G x bits */
    const float *offset;  /* out x G */
} dq_bcq_t;

/* ---- layout (dq_bcq_pack.c) -------------------------------------------- */
/* uint32 words per packed row, or -1 for bad bits / in. */
int64_t dq_bcq_row_words(int bits, int64_t in);
/* idx: out x in uint8, each < 2^bits (checked: DQ_EINVAL on the first bad
 * one, its flat index in *bad).  words: out x row_words, fully written. */
dq_status dq_bcq_pack(const uint8_t *idx, int64_t out, int64_t in, int bits, uint32_t *words,
                      int64_t *bad);
dq_status dq_bcq_unpack(const uint32_t *words, int64_t out, int64_t in, int bits, uint8_t *idx);
/* Fill the shape fields of W (words, alpha, offset left to the caller).
 * group_size -1 means per-channel.  DQ_EINVAL if inconsistent. */
dq_status dq_bcq_describe(dq_bcq_t *W, int64_t out, int64_t in, int bits, int64_t group_size);

/* Index of column c of one packed row. */
static inline uint32_t dq_bcq_get(const uint32_t *row, int bits, int slots, int64_t c)
{
    int64_t t = c >> 3;
    int64_t blk = t / slots;
    int s = (int)(t % slots);
    return (row[blk * 8 + (c & 7)] >> (bits * s)) & ((1u << bits) - 1u);
}

/* lv[k] = sum_i alpha_i * beta_i(k) + offset for k < 2^bits, for row r and
 * group grp: the terms are added in plane order starting from 0 (each
 * +-alpha_i exact), then the offset, two-operand float32 additions; the
 * NumPy dequantize rounds the same way, so every path gives these bits. */
static inline void dq_bcq_levels(const dq_bcq_t *W, int64_t r, int64_t grp, float *lv)
{
    const float *a = W->alpha + (r * W->G + grp) * W->bits;
    const float off = W->offset[r * W->G + grp];
    const int nb = W->bits;
    for (int k = 0; k < (1 << nb); k++) {
        float acc = 0.0f;
        for (int i = 0; i < nb; i++) acc += ((k >> (nb - 1 - i)) & 1) ? -a[i] : a[i];
        lv[k] = acc + off;
    }
}

/* ---- kernel table ------------------------------------------------------ */
/* Y[b * ldy + r] for rows r in [r0, r1) and batch rows b < batch
 * (<= DQ_SMALL_BATCH_MAX), straight from the packed words.  xs: batch x
 * stride float32, x with zeros from column `in` up to stride (stride >=
 * 8 * slots * row_words / 8, a multiple of 8). */
typedef dq_status (*dq_bcq_dot_fn)(const dq_bcq_t *W, const float *xs, int64_t stride,
                                   int64_t batch, int64_t r0, int64_t r1, float *Y, int64_t ldy);
/* out[(r - r0) * ldo + c] = the weight, rows [r0, r1), c < in (only those
 * columns are written).  ldo >= in. */
typedef void (*dq_bcq_dequant_fn)(const dq_bcq_t *W, int64_t r0, int64_t r1, float *out,
                                  int64_t ldo);

typedef struct {
    const char *name;
    /* 0 when this kernel cannot serve W (the driver then uses the reference) */
    int (*supports)(const dq_bcq_t *W);
    dq_bcq_dot_fn dot;
    dq_bcq_dequant_fn dequant;
} dq_bcq_kernel_t;

/* Plain C: the specification (dq_kernels_bcq_ref.c). */
extern const dq_bcq_kernel_t dq_bcq_kernel_ref;
/* AVX2 + FMA (dq_kernels_bcq_avx2.c); only run when dq_cpu_has_avx2(). */
extern const dq_bcq_kernel_t dq_bcq_kernel_avx2;
/* AVX-512F batch-1 dot for 1 and 2 bits, else the AVX2 kernel
 * (dq_kernels_bcq_avx512.c); only run when dq_cpu_has_avx512(). */
extern const dq_bcq_kernel_t dq_bcq_kernel_avx512;

/* ---- dispatch and driver (dq_bcq_matmul.c) ----------------------------- */
/* The default: the reference under DECOUPLEQ_KERNEL=reference or without
 * AVX2 (dq_cpu_has_avx2), AVX2 under DECOUPLEQ_KERNEL=avx2*, else AVX-512
 * when dq_cpu_has_avx512(), else AVX2. */
const dq_bcq_kernel_t *dq_bcq_kernel_default(void);
/* "reference", "avx2" or "avx512" if runnable here ("auto": the default),
 * else NULL. */
const dq_bcq_kernel_t *dq_bcq_kernel_by_name(const char *name);
/* y (batch x out) = x (batch x in) * What^T; batches above
 * DQ_SMALL_BATCH_MAX go through dequantized tiles of tile_rows rows (< 1:
 * up to 256 MiB) and sgemm.  kernel NULL: the default; nthreads < 1:
 * dq_num_threads(). */
dq_status dq_bcq_matmul(const dq_bcq_t *W, const float *x, int64_t batch, float *y, int nthreads,
                        const dq_bcq_kernel_t *kernel, int64_t tile_rows);
/* What (out x in, float32), rows in parallel. */
dq_status dq_bcq_dequantize(const dq_bcq_t *W, float *out, int nthreads,
                            const dq_bcq_kernel_t *kernel);

#endif
