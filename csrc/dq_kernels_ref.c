/* Plain-C kernels: the specification the SIMD kernels are held to.
 *
 * For row r and batch row b:
 *     dot_g = sum_{c in g} u_c * x_c          (column order, float32)
 *     y     = (sum_g s_g * dot_g) * 2^e + sum_g (z_g + s_g * qmin) * sx_g
 * with e = 0 here (x is taken as is).  Dequantization is code * s + z with
 * code = u + qmin, rounded after the product and after the sum (no FMA).
 */
#include "dq_kernels.h"

static int ref_supports(const dq_packed_t *W)
{
    (void)W;
    return 1;
}

dq_status dq_qdot_ref(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0, int64_t r1,
                      float *Y, int64_t ldy)
{
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->codes + r * W->row_words;
        for (int64_t b = 0; b < X->batch; b++) {
            const float *x = X->xs + b * X->stride;
            float acc = 0.0f;
            for (int64_t grp = 0; grp < W->G; grp++) {
                float dot = 0.0f;
                for (int64_t c = grp * W->g; c < grp * W->g + dq_group_width(W->in, W->g, grp); c++)
                    dot += (float)dq_pack_get(row, W->bits, c) * x[c];
                acc += dq_packed_scale(W, r, grp) * dot;
            }
            float zt = dq_zero_term(W, r, X->sx + b * W->G);
            Y[b * ldy + r] = dq_finish(acc, X->e[b], X->post[b], zt);
        }
    }
    return DQ_OK;
}

void dq_dequant_ref(const dq_packed_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo)
{
    for (int64_t r = r0; r < r1; r++) {
        const uint32_t *row = W->codes + r * W->row_words;
        float *o = out + (r - r0) * ldo;
        for (int64_t c = 0; c < W->in; c++) {
            int64_t grp = c / W->g;
            float code = (float)((int)dq_pack_get(row, W->bits, c) + W->qmin);
            float prod = code * dq_packed_scale(W, r, grp);
            o[c] = prod + dq_packed_zero(W, r, grp);
        }
    }
}

const dq_kernel_t dq_kernel_ref = {
    "reference", DQ_XMODE_PLAIN, ref_supports, dq_qdot_ref, dq_dequant_ref,
};
