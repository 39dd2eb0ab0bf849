/* Streaming Hessian accumulation (syrk) and damping; see dq_hessian.h. */
#include "dq_hessian.h"
#include "dq_blas.h"
#include "dq_solver.h"

#include <limits.h>
#include <string.h>

/* Reading float bits through these is allowed by the aliasing rules. */
typedef uint32_t __attribute__((may_alias)) u32_alias;
typedef uint64_t __attribute__((may_alias)) u64_alias;

/* float32 rows whose scaled entries reach 2^48 are summed in float64 instead:
 * squares stay below 2^96, so even 2^31 of them cannot overflow float32. */
#define WIDE_LIMIT 281474976710656.0 /* 2^48 */

/* Row classes. */
enum { ROW_NARROW = 0, ROW_WIDE = 1, ROW_NONFINITE = 2 };

/* Nonzero if some |x_j| >= 2^48 or is NaN/Inf.  Branch-free integer test
 * (adding (255 - 175 + 1) exponent units carries into the sign bit exactly
 * when the biased exponent is >= 175 = 127 + 48) so the loop vectorises: the
 * scan must stay small next to the syrk it guards. */
static int row_flag_f32(const float *x, int64_t n)
{
    const u32_alias *u = (const u32_alias *)x;
    uint32_t acc = 0;
    for (int64_t j = 0; j < n; j++) acc |= (u[j] & 0x7f800000u) + (81u << 23);
    return (acc >> 31) != 0;
}

/* Same trick with an all-ones exponent: NaN/Inf only. */
static int row_nonfinite_f32(const float *x, int64_t n)
{
    const u32_alias *u = (const u32_alias *)x;
    uint32_t acc = 0;
    for (int64_t j = 0; j < n; j++) acc |= (u[j] & 0x7f800000u) + 0x00800000u;
    return (acc >> 31) != 0;
}

static int row_nonfinite_f64(const double *x, int64_t n)
{
    const u64_alias *u = (const u64_alias *)x;
    uint64_t acc = 0;
    for (int64_t j = 0; j < n; j++)
        acc |= (u[j] & 0x7ff0000000000000ull) + 0x0010000000000000ull;
    return (acc >> 63) != 0;
}

static float row_maxabs_f32(const float *x, int64_t n)
{
    float m = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float a = fabsf(x[j]);
        m = a > m ? a : m;
    }
    return m;
}

/* Class of a float32 row that enters the sum scaled by sqrt(w), w > 0. */
static int classify_f32(const float *x, int64_t n, double w)
{
    if (row_flag_f32(x, n)) return row_nonfinite_f32(x, n) ? ROW_NONFINITE : ROW_WIDE;
    if (w != 1.0 && (double)row_maxabs_f32(x, n) * sqrt(w) >= WIDE_LIMIT) return ROW_WIDE;
    return ROW_NARROW;
}

dq_status dq_hess_init(dq_hess_t *h, int64_t n, int64_t flush_tokens, int skip_nonfinite)
{
    memset(h, 0, sizeof(*h));
    /* n x n must index with int (BLAS) and its byte size must fit size_t. */
    if (n < 1 || n > (int64_t)1 << 28 || flush_tokens < 1 || flush_tokens > INT_MAX)
        return DQ_EINVAL;
    h->n = n;
    h->flush_tokens = flush_tokens;
    int64_t rows32 = DQ_HESS_STAGE_BYTES / (n * (int64_t)sizeof(float));
    int64_t rows64 = DQ_HESS_STAGE_BYTES / (n * (int64_t)sizeof(double));
    if (rows32 < DQ_HESS_DIRECT_ROWS) rows32 = DQ_HESS_DIRECT_ROWS;
    if (rows64 < DQ_HESS_DIRECT_ROWS) rows64 = DQ_HESS_DIRECT_ROWS;
    h->stage32_cap = rows32 < flush_tokens ? rows32 : flush_tokens;
    h->stage64_cap = rows64;
    h->skip_nonfinite = skip_nonfinite ? 1 : 0;
    h->S = (double *)dq_calloc((size_t)n * (size_t)n * sizeof(double));
    return h->S ? DQ_OK : DQ_ENOMEM;
}

void dq_hess_free(dq_hess_t *h)
{
    dq_free(h->S);
    dq_free(h->P);
    dq_free(h->stage32);
    dq_free(h->stage64);
    memset(h, 0, sizeof(*h));
}

/* S += P (upper triangle) and P = 0 in the same pass.  Zeroing here, rather
 * than calling ssyrk with beta = 0 on a dirty P, keeps us independent of how a
 * given OpenBLAS treats beta == 0 on NaN garbage. */
static void flush_P(dq_hess_t *h)
{
    if (h->P_rows == 0) return;
    const int64_t n = h->n;
    for (int64_t i = 0; i < n; i++) {
        double *s = h->S + i * n;
        float *p = h->P + i * n;
        for (int64_t j = i; j < n; j++) {
            s[j] += (double)p[j];
            p[j] = 0.0f;
        }
    }
    h->P_rows = 0;
}

/* P += X^T X for rows <= flush_tokens, flushing first if P would then hold
 * more than flush_tokens rows. */
static void syrk_P(dq_hess_t *h, const float *X, int64_t rows)
{
    if (h->P_rows > 0 && h->P_rows + rows > h->flush_tokens) flush_P(h);
    /* Single-threaded: OpenBLAS's threaded syrk rounds differently with 2 or 3 threads
     * (~4% of entries of a 576-wide H moved in the last bits), and H must not depend on
     * the thread count. */
    dq_blas_serial_begin();
    dq_cblas_ssyrk(DqRowMajor, DqUpper, DqTrans, (int)h->n, (int)rows, 1.0f, X, (int)h->n, 1.0f,
                   h->P, (int)h->n);
    dq_blas_serial_end();
    h->P_rows += rows;
}

static void syrk_S(dq_hess_t *h, const double *X, int64_t rows)
{
    dq_blas_serial_begin(); /* as in syrk_P */
    dq_cblas_dsyrk(DqRowMajor, DqUpper, DqTrans, (int)h->n, (int)rows, 1.0, X, (int)h->n, 1.0,
                   h->S, (int)h->n);
    dq_blas_serial_end();
}

static void drain_stage32(dq_hess_t *h)
{
    if (h->stage32_rows == 0) return;
    syrk_P(h, h->stage32, h->stage32_rows);
    h->stage32_rows = 0;
}

static void drain_stage64(dq_hess_t *h)
{
    if (h->stage64_rows == 0) return;
    syrk_S(h, h->stage64, h->stage64_rows);
    h->stage64_rows = 0;
}

/* What a batch holds, found before anything is accumulated. */
typedef struct {
    int64_t included; /* rows with w > 0 that are finite */
    int64_t bad;      /* rows with w > 0 and a NaN/Inf (only counted in skip mode) */
    int64_t wide;     /* float32 rows to be summed in float64 (see WIDE_LIMIT) */
    double wsum;      /* sum of w over the included rows */
    int plain;        /* every row included, narrow, with weight exactly 1 */
} scan_t;

static int classify(const void *X, int is64, int64_t r, int64_t n, double w)
{
    if (is64) return row_nonfinite_f64((const double *)X + r * n, n) ? ROW_NONFINITE : ROW_NARROW;
    return classify_f32((const float *)X + r * n, n, w);
}

static dq_status scan(const dq_hess_t *h, const void *X, int is64, int64_t rows, const double *w,
                      scan_t *sc, int64_t *bad_row)
{
    memset(sc, 0, sizeof(*sc));
    sc->plain = 1;
    for (int64_t r = 0; r < rows; r++) {
        double wr = w ? w[r] : 1.0;
        if (!(wr >= 0.0) || !isfinite(wr)) {
            *bad_row = r;
            return DQ_EINVAL;
        }
        if (wr == 0.0) {
            sc->plain = 0;
            continue;
        }
        int cls = classify(X, is64, r, h->n, wr);
        if (cls == ROW_NONFINITE) {
            if (!h->skip_nonfinite) {
                *bad_row = r;
                return DQ_ENONFINITE;
            }
            sc->bad++;
            sc->plain = 0;
            continue;
        }
        if (cls == ROW_WIDE) {
            sc->wide++;
            sc->plain = 0;
        }
        if (wr != 1.0) sc->plain = 0;
        sc->included++;
        sc->wsum += wr;
    }
    return DQ_OK;
}

static void commit_counts(dq_hess_t *h, const scan_t *sc)
{
    h->n_tokens += sc->included;
    h->n_skipped += sc->bad;
    h->total_weight += sc->wsum;
}

/* Buffers a batch needs, allocated before any sum is touched so that a
 * failure leaves h unchanged. */
static dq_status ensure_buffers(dq_hess_t *h, int need32, int need64)
{
    const size_t n = (size_t)h->n;
    if (need32 && !h->P) {
        h->P = (float *)dq_calloc(n * n * sizeof(float));
        if (!h->P) return DQ_ENOMEM;
    }
    if (need32 && !h->stage32) {
        h->stage32 = (float *)dq_malloc((size_t)h->stage32_cap * n * sizeof(float));
        if (!h->stage32) return DQ_ENOMEM;
    }
    if (need64 && !h->stage64) {
        h->stage64 = (double *)dq_malloc((size_t)h->stage64_cap * n * sizeof(double));
        if (!h->stage64) return DQ_ENOMEM;
    }
    return DQ_OK;
}

static double *stage64_slot(dq_hess_t *h)
{
    if (h->stage64_rows == h->stage64_cap) drain_stage64(h);
    return h->stage64 + h->stage64_rows++ * h->n;
}

static float *stage32_slot(dq_hess_t *h)
{
    if (h->stage32_rows == h->stage32_cap) drain_stage32(h);
    return h->stage32 + h->stage32_rows++ * h->n;
}

dq_status dq_hess_add_f32(dq_hess_t *h, const float *X, int64_t rows, const double *w,
                          int64_t *bad_row)
{
    const int64_t n = h->n;
    scan_t sc;
    *bad_row = -1;
    dq_status st = scan(h, X, 0, rows, w, &sc, bad_row);
    if (st != DQ_OK) return st;
    if (sc.included > 0) {
        st = ensure_buffers(h, sc.included > sc.wide, sc.wide > 0);
        if (st != DQ_OK) return st;
    }
    if (sc.plain && rows >= DQ_HESS_DIRECT_ROWS) {
        /* The common case: syrk straight from the caller's rows, no copy. */
        for (int64_t r0 = 0; r0 < rows; r0 += h->flush_tokens) {
            int64_t k = rows - r0 < h->flush_tokens ? rows - r0 : h->flush_tokens;
            syrk_P(h, X + r0 * n, k);
        }
    } else if (sc.included > 0) {
        for (int64_t r = 0; r < rows; r++) {
            double wr = w ? w[r] : 1.0;
            if (wr == 0.0) continue;
            const float *x = X + r * n;
            int cls = classify_f32(x, n, wr);
            if (cls == ROW_NONFINITE) continue; /* skip mode: counted by scan */
            /* x_t sqrt(w_t) so that syrk sums w_t x_t x_t^T; one rounding. */
            double s = wr == 1.0 ? 1.0 : sqrt(wr);
            if (cls == ROW_WIDE) {
                double *dst = stage64_slot(h);
                for (int64_t j = 0; j < n; j++) dst[j] = (double)x[j] * s;
            } else if (wr == 1.0) {
                memcpy(stage32_slot(h), x, (size_t)n * sizeof(float));
            } else {
                float *dst = stage32_slot(h);
                for (int64_t j = 0; j < n; j++) dst[j] = (float)((double)x[j] * s);
            }
        }
    }
    commit_counts(h, &sc);
    return DQ_OK;
}

dq_status dq_hess_add_f64(dq_hess_t *h, const double *X, int64_t rows, const double *w,
                          int64_t *bad_row)
{
    const int64_t n = h->n;
    scan_t sc;
    *bad_row = -1;
    dq_status st = scan(h, X, 1, rows, w, &sc, bad_row);
    if (st != DQ_OK) return st;
    if (sc.included > 0) {
        st = ensure_buffers(h, 0, 1);
        if (st != DQ_OK) return st;
    }
    if (sc.plain && rows >= DQ_HESS_DIRECT_ROWS) {
        const int64_t chunk = (int64_t)1 << 20; /* keeps k within int */
        for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
            int64_t k = rows - r0 < chunk ? rows - r0 : chunk;
            syrk_S(h, X + r0 * n, k);
        }
    } else if (sc.included > 0) {
        for (int64_t r = 0; r < rows; r++) {
            double wr = w ? w[r] : 1.0;
            const double *x = X + r * n;
            if (wr == 0.0 || (sc.bad && row_nonfinite_f64(x, n))) continue;
            double *dst = stage64_slot(h);
            if (wr == 1.0) {
                memcpy(dst, x, (size_t)n * sizeof(double));
            } else {
                double s = sqrt(wr);
                for (int64_t j = 0; j < n; j++) dst[j] = x[j] * s;
            }
        }
    }
    commit_counts(h, &sc);
    return DQ_OK;
}

dq_status dq_hess_mean(dq_hess_t *h, double *out)
{
    const int64_t n = h->n;
    if (h->n_tokens == 0 || !(h->total_weight > 0.0)) return DQ_EINVAL;
    drain_stage32(h);
    flush_P(h);
    drain_stage64(h);
    const double tw = h->total_weight;
    /* Mirror the upper triangle tile by tile so the transposed writes stay
     * in cache. */
    const int64_t T = 64;
    for (int64_t ib = 0; ib < n; ib += T) {
        int64_t ie = ib + T < n ? ib + T : n;
        for (int64_t jb = ib; jb < n; jb += T) {
            int64_t je = jb + T < n ? jb + T : n;
            for (int64_t i = ib; i < ie; i++) {
                for (int64_t j = (jb > i ? jb : i); j < je; j++) {
                    double v = h->S[i * n + j] / tw;
                    out[i * n + j] = v;
                    out[j * n + i] = v;
                }
            }
        }
    }
    return DQ_OK;
}

void dq_hess_bare_ssyrk(const float *X, int64_t rows, int64_t n, float *C)
{
    dq_cblas_ssyrk(DqRowMajor, DqUpper, DqTrans, (int)n, (int)rows, 1.0f, X, (int)n, 1.0f, C,
                   (int)n);
}

void dq_damp(const double *H, int64_t n, double percdamp, double *out)
{
    double sum = 0.0;
    int any = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = H[i * n + i];
        sum += d;
        any |= d != 0.0;
    }
    /* All-zero diagonal: H carries no scale to be relative to (an empty or
     * all-dead layer), so damp in absolute terms. */
    double lambda = any ? percdamp * (sum / (double)n) : percdamp;
    if (out != H) memcpy(out, H, (size_t)n * (size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) out[i * n + i] += lambda;
}
