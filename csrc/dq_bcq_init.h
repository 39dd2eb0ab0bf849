/* UniQuanF's unified initialisation (ALGORITHM 8): min-max uniform scale and
 * zero, an optional clipping-ratio search, and a binary-coding (BCQ) fit of
 * the weights in the uniform quantizer's transformed domain. */
#ifndef DQ_BCQ_INIT_H
#define DQ_BCQ_INIT_H

#include "dq_common.h"

/* Largest bit width of the BCQ fit: 2^8 levels searched exhaustively. */
#define DQ_BCQ_MAX_BITS 8

/* Per row r and group j of W (float32 (m, n), row-major, finite; g divides n,
 * G = n / g):
 *   - candidates k = 1..K (K = clip_steps, or one candidate when clip_steps
 *     is 0): s = max((hi - lo) / (2^b - 1), 1e-8) * k / K, z = -lo / s;
 *   - u = w / s + z - c, c = (2^b - 1) / 2; greedy BCQ start, then `iters`
 *     refinements (alpha by the b x b normal equations, |alpha| sorted
 *     descending, beta by exhaustive nearest level; the shift delta =
 *     mean(u - B alpha) is fitted only when clip_steps == 0);
 *   - the candidate with the lowest mean |w - w_hat|^2.4 is kept, where
 *     w_hat = s (level + delta + c - z).
 * Outputs (all C-contiguous): S, Z, delta float32 (m, G); alpha float32
 * (m, G, bits); idx uint8 (m, n), the level index of each weight (bit i of
 * the index, most significant first, is 1 where beta_i = -1).
 * hdiag: NULL, or float32 (n,) finite non-negative column weights d_j: the
 * greedy means, the normal equations, the shift and the selection error are
 * then weighted by d (a group whose weights sum to 0 is fitted unweighted).
 * Every routine in here runs in float64 inside; the arithmetic order matches
 * decoupleq/reference/bcq.py, so indices are identical to it. */
dq_status dq_bcq_init(const float *W, const float *hdiag, int64_t m, int64_t n, int64_t g, int bits,
                      int clip_steps, int iters, float *S, float *Z, float *alpha, float *delta,
                      uint8_t *idx);

#endif
