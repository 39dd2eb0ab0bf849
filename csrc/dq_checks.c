/* Input checks of the layer solver (see dq_checks.h). */
#include "dq_checks.h"
#include "dq_blas.h"

#include <string.h>

int dq_find_asymmetry(const double *H, int64_t n, int64_t *bi, int64_t *bj)
{
    for (int64_t i = 0; i < n; i++) {
        const double hii = fabs(H[i * n + i]);
        for (int64_t j = i + 1; j < n; j++) {
            const double a = H[i * n + j], b = H[j * n + i];
            /* sqrt(H_ii H_jj) bounds |H_ij| for a PSD matrix, and the
             * rounding noise of any sum that built it. */
            const double tol = DQ_SYM_RTOL * sqrt(hii * fabs(H[j * n + j]));
            if (!(fabs(a - b) <= tol)) {
                *bi = i;
                *bj = j;
                return 1;
            }
        }
    }
    return 0;
}

/* Column-blocked Cholesky (LAPACK's dpotrf on blocks of columns) so the
 * check can poll for interrupts between blocks: the lower triangle of the
 * row-major copy is LAPACK's column-major upper triangle, factored in
 * place panel by panel with dpotrf on the diagonal block, dtrsm below it and
 * dsyrk on the trailing matrix, all column-major "U" on the transposed view. */
#define PSD_BLOCK 256

dq_status dq_check_psd(const double *H, int64_t n, int64_t *col)
{
    if (n < 1 || n > INT32_MAX) return DQ_EINVAL;
    int64_t nn;
    if (dq_mul_overflow(n, n, &nn) || nn > (int64_t)(SIZE_MAX / sizeof(double))) return DQ_ERANGE;
    double dmax = 0.0;
    for (int64_t i = 0; i < n; i++)
        if (H[i * n + i] > dmax) dmax = H[i * n + i];
    double *M = dq_malloc(sizeof(double) * (size_t)nn);
    if (!M) return DQ_ENOMEM;
    memcpy(M, H, sizeof(double) * (size_t)nn);
    /* A zero matrix is PSD; the shift keeps its factor defined. */
    const double shift = dmax > 0.0 ? DQ_PSD_RTOL * dmax : 1.0;
    for (int64_t i = 0; i < n; i++) M[i * n + i] += shift;
    dq_status st = DQ_OK;
    const int ni = (int)n;
    /* Row-major M read column-major is M^T = M (symmetric up to the
     * tolerance; only the "U" triangle, i.e. row-major lower, is read). */
    /* Single-threaded BLAS: the verdict on a borderline H must not depend on the thread count. */
    dq_blas_serial_begin();
    for (int64_t k = 0; k < n; k += PSD_BLOCK) {
        const int kb = (int)(n - k < PSD_BLOCK ? n - k : PSD_BLOCK);
        double *Dkk = M + k * n + k;
        int info = 0;
        dq_dpotrf_("U", &kb, Dkk, &ni, &info, 1);
        if (info != 0) {
            *col = k + info - 1;
            st = DQ_ENOTPD;
            break;
        }
        const int rest = (int)(n - k - kb);
        if (rest > 0) {
            /* Column-major: A12 (kb x rest) at Dkk + kb*ldA; U11^T X = A12. */
            double *A12 = M + (k + kb) * n + k;
            double *A22 = M + (k + kb) * n + (k + kb);
            dq_cblas_dtrsm(DqColMajor, DqLeft, DqUpper, DqTrans, DqNonUnit, kb, rest, 1.0, Dkk,
                           ni, A12, ni);
            dq_cblas_dsyrk(DqColMajor, DqUpper, DqTrans, rest, kb, -1.0, A12, ni, 1.0, A22, ni);
        }
        if (dq_interrupted()) {
            st = DQ_EINTR;
            break;
        }
    }
    dq_blas_serial_end();
    dq_free(M);
    return st;
}

float dq_absmax_f32(const float *x, int64_t n)
{
    float a = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float v = fabsf(x[i]);
        if (v > a) a = v;
    }
    return a;
}

double dq_wh_bound(const float *W, int64_t m, int64_t n, const double *H)
{
    double hrow = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double s = 0.0;
        for (int64_t j = 0; j < n; j++) s += fabs(H[i * n + j]);
        if (s > hrow) hrow = s;
    }
    int64_t mn = m * n; /* the caller's array exists: no overflow */
    return (double)dq_absmax_f32(W, mn) * hrow;
}
