/* The few BLAS / LAPACK routines the core uses, behind one prefix switch.
 *
 * The scipy-openblas32 build exports every symbol with a "scipy_" prefix;
 * a system OpenBLAS (DECOUPLEQ_BLAS=system) exports plain names.  Prototypes
 * are declared here rather than taken from cblas.h so the same source builds
 * against either without header differences.  Integers are 32-bit (LP64).
 */
#ifndef DQ_BLAS_H
#define DQ_BLAS_H

#include <stddef.h>

#if defined(DQ_BLAS_PREFIX_SCIPY)
#define DQ_BLAS_SYM(name) scipy_##name
#else
#define DQ_BLAS_SYM(name) name
#endif

enum { DqRowMajor = 101, DqColMajor = 102 };
enum { DqNoTrans = 111, DqTrans = 112 };
enum { DqUpper = 121, DqLower = 122 };
enum { DqLeft = 141, DqRight = 142 };
enum { DqNonUnit = 131, DqUnit = 132 };

#define dq_cblas_sgemm DQ_BLAS_SYM(cblas_sgemm)
#define dq_cblas_dgemm DQ_BLAS_SYM(cblas_dgemm)
#define dq_cblas_ssyrk DQ_BLAS_SYM(cblas_ssyrk)
#define dq_cblas_dsyrk DQ_BLAS_SYM(cblas_dsyrk)
#define dq_cblas_sgemv DQ_BLAS_SYM(cblas_sgemv)
#define dq_cblas_strsm DQ_BLAS_SYM(cblas_strsm)
#define dq_cblas_dtrsm DQ_BLAS_SYM(cblas_dtrsm)
#define dq_openblas_get_num_threads DQ_BLAS_SYM(openblas_get_num_threads)
#define dq_openblas_set_num_threads DQ_BLAS_SYM(openblas_set_num_threads)
#define dq_openblas_get_config DQ_BLAS_SYM(openblas_get_config)
#define dq_openblas_get_corename DQ_BLAS_SYM(openblas_get_corename)
#define dq_dpotrf_ DQ_BLAS_SYM(dpotrf_)
#define dq_dpotri_ DQ_BLAS_SYM(dpotri_)
#define dq_dtrtri_ DQ_BLAS_SYM(dtrtri_)

void dq_cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                    int lda, const float *b, int ldb, float beta, float *c, int ldc);
void dq_cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a,
                    int lda, const double *b, int ldb, double beta, double *c, int ldc);
void dq_cblas_ssyrk(int order, int uplo, int trans, int n, int k, float alpha, const float *a,
                    int lda, float beta, float *c, int ldc);
void dq_cblas_dsyrk(int order, int uplo, int trans, int n, int k, double alpha, const double *a,
                    int lda, double beta, double *c, int ldc);
void dq_cblas_sgemv(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                    const float *x, int incx, float beta, float *y, int incy);
void dq_cblas_strsm(int order, int side, int uplo, int transa, int diag, int m, int n, float alpha,
                    const float *a, int lda, float *b, int ldb);
void dq_cblas_dtrsm(int order, int side, int uplo, int transa, int diag, int m, int n, double alpha,
                    const double *a, int lda, double *b, int ldb);
int dq_openblas_get_num_threads(void);
void dq_openblas_set_num_threads(int n);
char *dq_openblas_get_config(void);
char *dq_openblas_get_corename(void);

/* LAPACK, Fortran calling convention (column-major; a row-major symmetric
 * matrix is the same matrix, with "U" and "L" swapped). The trailing size_t
 * is the hidden length of the character argument. */
void dq_dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t);
void dq_dpotri_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t);
void dq_dtrtri_(const char *uplo, const char *diag, const int *n, double *a, const int *lda,
                int *info, size_t, size_t);

#endif
