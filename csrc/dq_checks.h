/* Checks of a layer's inputs that need more than a glance: symmetry and
 * positive semi-definiteness of H00, and float32 range of W and W H00. */
#ifndef DQ_CHECKS_H
#define DQ_CHECKS_H

#include "dq_common.h"

/* Relative tolerances of the checks (the NumPy twin in
 * decoupleq/reference/_checks.py uses the same values). */
#define DQ_SYM_RTOL 1e-5 /* |H_ij - H_ji| <= rtol * sqrt(H_ii H_jj) */
#define DQ_PSD_RTOL 1e-5 /* H + rtol * max(diag H) * I must factor */

/* 1 and the first (row-major) pair i < j with |H_ij - H_ji| above the
 * tolerance in *bi, *bj; 0 when H (n x n, finite, diag >= 0) is symmetric. */
int dq_find_asymmetry(const double *H, int64_t n, int64_t *bi, int64_t *bj);

/* DQ_OK when H + DQ_PSD_RTOL * max(diag H) * I has a Cholesky factor (H is
 * positive semi-definite up to that tolerance); DQ_ENOTPD otherwise, with
 * the column where the factorisation broke down in *col.  O(n^3 / 3) flops,
 * an n x n float64 work copy.  Polls for interrupts (DQ_EINTR). */
dq_status dq_check_psd(const double *H, int64_t n, int64_t *col);

/* max |x_i| over n floats (NaN-free input). */
float dq_absmax_f32(const float *x, int64_t n);

/* An upper bound of max |(W H)_ij| over rows of W (m x n) and H (n x n):
 * max_r max_j |W_rj| * max_i sum_j |H_ij|. */
double dq_wh_bound(const float *W, int64_t m, int64_t n, const double *H);

#endif
