/* decoupleQ over BCQ levels: Hessian-aware refinement of a binary-coding
 * quantizer (issue 13 item 4; ALGORITHM 8 for the BCQ form, 3.6 and 2.2 for
 * the two decoupleQ steps it borrows). */
#ifndef DQ_BCQ_SOLVE_H
#define DQ_BCQ_SOLVE_H

#include "dq_common.h"

/* Bit widths the refinement accepts: those of the BCQ packed format. */
#define DQ_BCQ_SOLVE_MAX_BITS 4

/* Refine a BCQ weight w_hat[r, c] = sum_i alpha[r, j, i] beta_i(idx[r, c]) +
 * offset[r, j] (j = c / g, beta_i(k) = +1 where bit bits-1-i of k is 0, else
 * -1; levels rounded in float32 as decoupleq/bcq.py specifies) towards the
 * per-row objective e_r = (w_hat_r - w_r) H (w_hat_r - w_r)^T.
 *
 * Steps (decoupleq/reference/bcq_solve.py is the readable twin):
 *   - float step: with the indices fixed, the (bits + 1) G parameters of a
 *     row are the least-squares solution of B^T H B theta = B^T H w^T
 *     (B the row's n x (bits+1)G design matrix of signs and group ones);
 *     parameters the used sign patterns leave undetermined keep their
 *     current values;
 *   - assignment: a GPTQ column sweep (act_order != 0: columns by
 *     decreasing diag H, ties by index, as dq_act_order_perm; else natural
 *     order), each weight (with the error feedback of the columns before
 *     it, through the upper factor U of (H + lambda I)^-1 in sweep order,
 *     lambda the first of decoupleQ's damping ladder that factors) rounded
 *     to the nearest of its group's levels.
 * Schedule: a float step, then `iters` times (assignment, float step).
 * After every step a row whose objective is strictly below its best so far
 * takes the new state; idx, alpha and offset return the best state.
 *
 * W float32 (m, n) finite; H float64 (n, n), the damped Hessian, symmetric
 * positive definite; g divides n; bits 1..DQ_BCQ_SOLVE_MAX_BITS.
 * idx uint8 (m, n) (each < 2^bits), alpha float32 (m, G, bits), offset
 * float32 (m, G): the start in, the best state out (left partly updated on
 * an error).  err float64 (m,): e_r of the returned state.  history
 * float64 (iters + 2,) or NULL: sum_r of the best e_r at the start, after
 * the first float step and after every iteration. */
dq_status dq_bcq_solve(const float *W, const double *H, int64_t m, int64_t n, int64_t g, int bits,
                       int iters, int act_order, uint8_t *idx, float *alpha, float *offset,
                       double *err, double *history);

#endif
