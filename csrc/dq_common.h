/* Shared definitions of the decoupleq C core.
 *
 * The core never touches Python objects: every routine returns a dq_status and
 * the py_*.c boundary files turn that into a Python exception once the GIL is
 * held again.  Matrices are row-major and C-contiguous unless stated.
 */
#ifndef DQ_COMMON_H
#define DQ_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef enum {
    DQ_OK = 0,
    DQ_ENOMEM = 1,      /* an allocation failed */
    DQ_EINVAL = 2,      /* an argument is out of its domain (checked again in C) */
    DQ_ENOTPD = 3,      /* a matrix that must be positive definite is not, even after damping */
    DQ_ENONFINITE = 4,  /* NaN or Inf met where it cannot be handled */
    DQ_EINTR = 5,       /* stopped early: an interrupt (Ctrl-C) was reported */
    DQ_ERANGE = 6,      /* a size or count does not fit the arithmetic that needs it */
} dq_status;

/* Checked size arithmetic: 0 and the exact result in *out, or 1 when it
 * overflows (or an operand is negative: sizes never are). */
static inline int dq_mul_overflow(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return 1;
    return __builtin_mul_overflow(a, b, out);
}

static inline int dq_add_overflow(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return 1;
    return __builtin_add_overflow(a, b, out);
}

/* Interrupts.  The core never sees Python: the boundary installs a hook that
 * reports whether an interrupt (Ctrl-C) arrived, and long loops call
 * dq_interrupted() between chunks.  It calls the hook at most every
 * DQ_POLL_MS milliseconds (a clock read otherwise) and, once the hook
 * reports an interrupt, keeps returning 1 until dq_interrupt_clear(): the
 * loop then frees what it holds and returns DQ_EINTR, leaving its outputs to
 * a boundary that throws them away. */
#define DQ_POLL_MS 50
typedef int (*dq_interrupt_hook_t)(void);
void dq_set_interrupt_hook(dq_interrupt_hook_t hook);
int dq_interrupted(void);
/* 1 if an interrupt was reported since the last call, and clears it. */
int dq_interrupt_take(void);

/* Rounding rules for x -> integer.  HALF_UP is decoupleQ's floor(x + 1/2)
 * (ties toward +inf); HALF_EVEN is IEEE nearest-even (reference GPTQ). */
enum { DQ_ROUND_HALF_UP = 0, DQ_ROUND_HALF_EVEN = 1 };

/* Exact for every finite float: x - floor(x) is computed without rounding
 * error, so ties are detected exactly (floor(x + 0.5f) is not exact). */
static inline float dq_round(float x, int rule)
{
    if (rule == DQ_ROUND_HALF_EVEN) return rintf(x);
    float f = floorf(x);
    return (x - f >= 0.5f) ? f + 1.0f : f;
}

static inline double dq_round_d(double x, int rule)
{
    if (rule == DQ_ROUND_HALF_EVEN) return rint(x);
    double f = floor(x);
    return (x - f >= 0.5) ? f + 1.0 : f;
}

/* NaN goes to lo, so a clamped value always converts to an integer type
 * without undefined behaviour. */
static inline float dq_clampf(float x, float lo, float hi)
{
    return x > hi ? hi : (x >= lo ? x : lo);
}

/* Safe division of ALGORITHM 1.4: y's magnitude is floored at 1e-15 and
 * sign(0) counts as +1. */
static inline double dq_safe_div(double x, double y)
{
    double ay = fabs(y) > 1e-15 ? fabs(y) : 1e-15;
    return x / (y < 0 ? -ay : ay);
}

/* Integer grid of a signed b-bit code: qmin = -2^(b-1), qmax = 2^(b-1) - 1. */
static inline int dq_qmin(int bits) { return -(1 << (bits - 1)); }
static inline int dq_qmax(int bits) { return (1 << (bits - 1)) - 1; }

/* Groups of g columns over n columns: ceil(n / g).  The last group is
 * shorter when g does not divide n (n - (G - 1) g columns); every group
 * starts at a multiple of g, so column c is in group c / g. */
static inline int64_t dq_num_groups(int64_t n, int64_t g) { return (n + g - 1) / g; }
/* Columns of group j (g, or fewer for the last). */
static inline int64_t dq_group_width(int64_t n, int64_t g, int64_t j)
{
    const int64_t left = n - j * g;
    return left < g ? left : g;
}

/* Aligned allocation for SIMD-friendly buffers; free with dq_free. */
void *dq_malloc(size_t bytes);
void *dq_calloc(size_t bytes);
void dq_free(void *p);

/* Thread count used by the core's own parallel loops (not BLAS):
 * DECOUPLEQ_NUM_THREADS if set, else the BLAS thread count. */
int dq_num_threads(void);

/* Run fn(ctx, begin, end) over [0, n) split into contiguous chunks, one per
 * thread (at most nthreads, at least min_chunk items each).  The split depends
 * only on n, nthreads and min_chunk, so results are deterministic.  Never call
 * BLAS inside fn (BLAS has its own thread pool), except through
 * dq_sgemm_rows, which makes BLAS single-threaded while it does. */
typedef void (*dq_range_fn)(void *ctx, int64_t begin, int64_t end);
dq_status dq_parallel_for(int64_t n, int64_t min_chunk, int nthreads, dq_range_fn fn, void *ctx);

/* Solver GEMMs independent of every thread count (dq_gemm.c).
 * dq_sgemm_rows: C = alpha A B + beta C, row-major, no transposes; A (m, k)
 * with row stride lda, B (k, n) with ldb, C (m, n) with ldc, float32.  C is
 * computed in fixed blocks of DQ_GEMM_CHUNK_ROWS rows, each by one
 * single-threaded sgemm, the blocks spread over dq_parallel_for: the same
 * bits for any BLAS or core thread count.  Sizes must fit in int. */
#define DQ_GEMM_CHUNK_ROWS 32
void dq_sgemm_rows(int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
/* OpenBLAS at one thread between begin and end (nested and concurrent
 * callers counted); dq_blas_threads / dq_blas_set_threads read and set the
 * thread count the user asked for, which a section keeps aside. */
void dq_blas_serial_begin(void);
void dq_blas_serial_end(void);
int dq_blas_threads(void);
void dq_blas_set_threads(int n);

#endif
