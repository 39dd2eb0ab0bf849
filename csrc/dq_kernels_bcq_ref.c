/* Plain-C BCQ kernels: the specification the SIMD kernels are held to.
 *
 * For row r and batch row b:
 *     y = sum_c lv[grp(c)][idx_c] * x_c      (one float32 sum, column order)
 * with the levels lv of dq_bcq_levels (offset included).  Dequantization
 * writes the levels themselves, so it is bit-exact with the NumPy twin.
 */
#include "dq_kernels_bcq.h"

static int ref_supports(const dq_bcq_t *W)
{
    (void)W;
    return 1;
}

static dq_status ref_dot(const dq_bcq_t *W, const float *xs, int64_t stride, int64_t batch,
                         int64_t r0, int64_t r1, float *Y, int64_t ldy)
{
    float lv[1 << DQ_BCQ_MAX_BITS];
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->words + r * W->row_words;
        for (int64_t b = 0; b < batch; b++) {
            const float *x = xs + b * stride;
            float acc = 0.0f;
            for (int64_t grp = 0; grp < W->G; grp++) {
                dq_bcq_levels(W, r, grp, lv);
                for (int64_t c = grp * W->g; c < (grp + 1) * W->g; c++)
                    acc += lv[dq_bcq_get(row, W->bits, W->slots, c)] * x[c];
            }
            Y[b * ldy + r] = acc;
        }
    }
    return DQ_OK;
}

static void ref_dequant(const dq_bcq_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo)
{
    float lv[1 << DQ_BCQ_MAX_BITS];
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->words + r * W->row_words;
        float *o = out + (r - r0) * ldo;
        for (int64_t grp = 0; grp < W->G; grp++) {
            dq_bcq_levels(W, r, grp, lv);
            for (int64_t c = grp * W->g; c < (grp + 1) * W->g; c++)
                o[c] = lv[dq_bcq_get(row, W->bits, W->slots, c)];
        }
    }
}

const dq_bcq_kernel_t dq_bcq_kernel_ref = {"reference", ref_supports, ref_dot, ref_dequant};
