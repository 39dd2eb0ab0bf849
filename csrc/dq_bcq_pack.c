/* The BCQ packed layout "decoupleq-bcq-lanes8-v1" (specified in the module
 * docstring of decoupleq/bcq.py; summary in dq_kernels_bcq.h): pack, unpack
 * and the shape fields of a packed weight. */
#include "dq_kernels_bcq.h"

#include <string.h>

int64_t dq_bcq_row_words(int bits, int64_t in)
{
    /* in <= INT32_MAX (the BLAS path's int) also keeps (in + 7) from
     * overflowing int64. */
    if (bits < 1 || bits > DQ_BCQ_MAX_BITS || in < 1 || in > INT32_MAX) return -1;
    int64_t slots = 32 / bits;
    int64_t steps = (in + 7) / 8;
    return 8 * ((steps + slots - 1) / slots);
}

dq_status dq_bcq_describe(dq_bcq_t *W, int64_t out, int64_t in, int bits, int64_t group_size)
{
    memset(W, 0, sizeof *W);
    int64_t rw = dq_bcq_row_words(bits, in);
    if (rw < 0 || out < 0) return DQ_EINVAL;
    if (group_size == -1) group_size = in;
    if (group_size < 1 || in % group_size != 0) return DQ_EINVAL;
    W->out = out;
    W->in = in;
    W->bits = bits;
    W->slots = 32 / bits;
    W->g = group_size;
    W->G = in / group_size;
    W->steps = (in + 7) / 8;
    W->row_words = rw;
    return DQ_OK;
}

dq_status dq_bcq_pack(const uint8_t *idx, int64_t out, int64_t in, int bits, uint32_t *words,
                      int64_t *bad)
{
    int64_t rw = dq_bcq_row_words(bits, in);
    if (rw < 0) return DQ_EINVAL;
    const uint32_t top = 1u << bits;
    /* Check everything first: a failed call leaves `words` untouched. */
    for (int64_t i = 0; i < out * in; i++) {
        if (idx[i] >= top) {
            if (bad) *bad = i;
            return DQ_EINVAL;
        }
    }
    const int slots = 32 / bits;
    for (int64_t r = 0; r < out; r++) {
        uint32_t *row = words + r * rw;
        const uint8_t *src = idx + r * in;
        memset(row, 0, (size_t)rw * sizeof *row);
        for (int64_t c = 0; c < in; c++) {
            int64_t t = c >> 3;
            row[(t / slots) * 8 + (c & 7)] |= (uint32_t)src[c] << (bits * (int)(t % slots));
        }
    }
    return DQ_OK;
}

dq_status dq_bcq_unpack(const uint32_t *words, int64_t out, int64_t in, int bits, uint8_t *idx)
{
    int64_t rw = dq_bcq_row_words(bits, in);
    if (rw < 0) return DQ_EINVAL;
    const int slots = 32 / bits;
    for (int64_t r = 0; r < out; r++) {
        const uint32_t *row = words + r * rw;
        for (int64_t c = 0; c < in; c++) idx[r * in + c] = (uint8_t)dq_bcq_get(row, bits, slots, c);
    }
    return DQ_OK;
}
