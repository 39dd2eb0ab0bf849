/* Packed 2/3/4-bit weights and the kernels that multiply by them.
 *
 * The packed layout is specified in ONE place: the module docstring of
 * decoupleq/packing.py (dq_pack.c carries a short summary and the codec).
 * Terms used here: a row of `in` columns is cut into steps of 8 columns
 * (column c is lane c % 8 of step c / 8); a lane-word is 8 consecutive uint32,
 * one per lane; slots of a lane-word hold one step each.
 *
 * Kernels compute Y = X * What^T for X of shape batch x in (float32) with
 * What = code * s + z per group, through the identity (per row r, group g)
 *     sum_c What[r,c] x[c] = s_g * sum_c u_c x[c] + (z_g + s_g * qmin) * sum_c x[c]
 * where u = code - qmin is the stored unsigned value.  The code dot is done
 * straight from the packed words; the sums of x per group are computed once
 * per call.
 */
#ifndef DQ_KERNELS_H
#define DQ_KERNELS_H

#include "dq_common.h"

#include <string.h>

/* dtype of scales and zeros */
enum { DQ_SZ_F32 = 0, DQ_SZ_F16 = 1 };

/* Largest batch served by the direct (GEMV-like) kernels; larger batches
 * dequantize tiles and call sgemm. */
#define DQ_SMALL_BATCH_MAX 16

typedef struct {
    int64_t out, in;       /* logical weight shape: rows x columns */
    int bits;              /* 2, 3 or 4 */
    int qmin;              /* -2^(bits-1) */
    int64_t g;             /* group size in columns (== in when per-channel) */
    int64_t G;             /* groups per row: ceil(in / g), the last one shorter
                            * when g does not divide in */
    int64_t steps;         /* ceil(in / 8) */
    int64_t row_words;     /* uint32 per packed row, a multiple of 8 */
    const uint32_t *codes; /* out x row_words */
    const void *scale;     /* out x G, float32 or IEEE binary16 bits */
    const void *zero;      /* like scale, or NULL when symmetric (z = 0) */
    int sz_type;           /* DQ_SZ_F32 or DQ_SZ_F16 */
} dq_packed_t;

/* ---- layout (dq_pack.c) ------------------------------------------------ */
/* Largest in_features (and out_features, batch) of the packed format: the
 * GEMM path hands them to BLAS as int. */
#define DQ_PACK_MAX_IN INT32_MAX
/* uint32 words per packed row for `in` columns, or -1 for bad bits / in. */
int64_t dq_pack_row_words(int bits, int64_t in);
/* Stored value u (0 .. 2^bits - 1) of column c of one packed row. */
uint32_t dq_pack_get(const uint32_t *row, int bits, int64_t c);
/* Bit offset of the slot of step t inside its (half-)word as the fast
 * kernels see it: they read u * 2^shift, so x is pre-scaled by 2^-shift. */
int dq_pack_decode_shift(int bits, int64_t t);
/* codes: out x in int8 in [qmin, qmax] (checked: DQ_EINVAL on the first bad
 * one, its flat index in *bad).  packed: out x row_words, fully written. */
dq_status dq_pack(const int8_t *codes, int64_t out, int64_t in, int bits, uint32_t *packed,
                  int64_t *bad);
dq_status dq_unpack(const uint32_t *packed, int64_t out, int64_t in, int bits, int8_t *codes);
/* Fill the shape fields of W (codes, scale, zero, sz_type left to the
 * caller).  group_size -1 means per-channel.  DQ_EINVAL if inconsistent. */
dq_status dq_packed_describe(dq_packed_t *W, int64_t out, int64_t in, int bits,
                             int64_t group_size);

/* IEEE binary16 -> binary32, exact for every input (NaN payloads kept). */
static inline float dq_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        /* subnormal half: normalise into a binary32 */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float dq_packed_scale(const dq_packed_t *W, int64_t r, int64_t grp)
{
    int64_t i = r * W->G + grp;
    return W->sz_type == DQ_SZ_F16 ? dq_half_to_float(((const uint16_t *)W->scale)[i])
                                   : ((const float *)W->scale)[i];
}

static inline float dq_packed_zero(const dq_packed_t *W, int64_t r, int64_t grp)
{
    if (!W->zero) return 0.0f;
    int64_t i = r * W->G + grp;
    return W->sz_type == DQ_SZ_F16 ? dq_half_to_float(((const uint16_t *)W->zero)[i])
                                   : ((const float *)W->zero)[i];
}

/* ---- prepared activations --------------------------------------------- */
/* How a kernel wants x: as is, scaled by 2^-shift(t) per step (its codes are
 * converted to float), or scaled by 2^(149 - shift(t) - e_b) (its codes are
 * read as subnormal floats, u * 2^shift * 2^-149, with no conversion). */
enum { DQ_XMODE_PLAIN = 0, DQ_XMODE_SHIFT = 1, DQ_XMODE_SUBNORMAL = 2 };

typedef struct {
    int64_t batch;
    int64_t stride; /* floats between rows of xs: steps * 8 rounded up to 16 */
    float *xs;      /* batch x stride, scaled x, zero in the padding columns */
    float *sx;      /* batch x G: sum of x over each group (plain x) */
    int *e;         /* batch: exponent to apply to the code dot (0 unless SUBNORMAL) */
    float *post;    /* batch: 2^e as a float, or 0 when out of the normal range */
} dq_xprep_t;

/* Build X for W from x (batch x in).  Frees with dq_xprep_free. */
dq_status dq_xprep_init(dq_xprep_t *X, const dq_packed_t *W, const float *x, int64_t batch,
                        int xmode);
void dq_xprep_free(dq_xprep_t *X);

/* y = dot * 2^e + zero_term, the last step every kernel shares; post is
 * 2^e when that is a normal float (exact scaling), else 0 (use ldexpf). */
static inline float dq_finish(float dot, int e, float post, float zero_term)
{
    if (e != 0) dot = post != 0.0f ? dot * post : ldexpf(dot, e);
    return dot + zero_term;
}

/* Sum over groups of (z_g + s_g * qmin) * sx_g, in group order. */
static inline float dq_zero_term(const dq_packed_t *W, int64_t r, const float *sx)
{
    float acc = 0.0f;
    for (int64_t grp = 0; grp < W->G; grp++) {
        float s = dq_packed_scale(W, r, grp);
        float c = dq_packed_zero(W, r, grp) + s * (float)W->qmin;
        acc += c * sx[grp];
    }
    return acc;
}

/* ---- kernel table ------------------------------------------------------ */
/* Y[b * ldy + r] for rows r in [r0, r1) and every batch row b of X
 * (X->batch <= DQ_SMALL_BATCH_MAX), straight from the packed codes. */
typedef dq_status (*dq_qdot_fn)(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0,
                                int64_t r1, float *Y, int64_t ldy);
/* out[(r - r0) * ldo + c] = code * s + z for rows [r0, r1), c < in; columns
 * in .. ldo-1 may be written with padding values.  ldo >= in. */
typedef void (*dq_dequant_fn)(const dq_packed_t *W, int64_t r0, int64_t r1, float *out,
                              int64_t ldo);

typedef struct {
    const char *name;
    int xmode;
    /* 0 when this kernel cannot serve W (the driver then uses the reference) */
    int (*supports)(const dq_packed_t *W);
    dq_qdot_fn qdot;
    dq_dequant_fn dequant;
} dq_kernel_t;

/* Plain C: the specification (dq_kernels_ref.c). */
extern const dq_kernel_t dq_kernel_ref;
dq_status dq_qdot_ref(const dq_packed_t *W, const dq_xprep_t *X, int64_t r0, int64_t r1,
                      float *Y, int64_t ldy);
void dq_dequant_ref(const dq_packed_t *W, int64_t r0, int64_t r1, float *out, int64_t ldo);

/* AVX2 + FMA + F16C (dq_kernels_avx2.c); only run when dq_cpu_has_avx2(). */
extern const dq_kernel_t dq_kernel_avx2;      /* codes converted with vcvtdq2ps */
extern const dq_kernel_t dq_kernel_avx2_subn; /* codes read as subnormal floats */

/* ---- dispatch (dq_cpu.c) ------------------------------------------------ */
/* 1 when the CPU has AVX2, FMA and F16C and the OS saves YMM state. */
int dq_cpu_has_avx2(void);
/* 1 when dq_cpu_has_avx2() and the CPU has AVX-512F and the OS saves the
 * opmask and ZMM state. */
int dq_cpu_has_avx512(void);
/* 1 when the solver's row loops should take their AVX2 builds: the CPU has
 * them (dq_cpu_has_avx2) and DECOUPLEQ_KERNEL=reference does not ask for the
 * portable builds.  Both builds round every operation the same. */
int dq_solver_simd(void);
/* The kernel used by default: DECOUPLEQ_KERNEL if set (reference, avx2,
 * avx2_subnormal, auto), else the fastest AVX2 variant measured once, else
 * the reference.  Chosen once per process. */
const dq_kernel_t *dq_kernel_default(void);
/* A kernel by name if compiled and runnable here, else NULL. */
const dq_kernel_t *dq_kernel_by_name(const char *name);
/* NULL-terminated list of the kernels runnable here, reference first. */
const dq_kernel_t *const *dq_kernel_list(void);
/* Why the default was chosen (for backend_info). */
const char *dq_kernel_reason(void);

/* ---- driver (dq_matmul.c) ----------------------------------------------- */
/* y (batch x out) = x (batch x in) * What^T.  kernel NULL: the default.
 * nthreads < 1: dq_num_threads().  Batches above DQ_SMALL_BATCH_MAX go
 * through dequantized tiles of tile_rows rows (< 1: up to 256 MiB) and sgemm
 * (BLAS threads, never inside ours). */
dq_status dq_packed_matmul(const dq_packed_t *W, const float *x, int64_t batch, float *y,
                           int nthreads, const dq_kernel_t *kernel, int64_t tile_rows);
/* What (out x in, float32) with the kernel's dequantizer, rows in parallel. */
dq_status dq_packed_dequantize(const dq_packed_t *W, float *out, int nthreads,
                               const dq_kernel_t *kernel);

/* ---- read bandwidth (dq_bandwidth.c) ------------------------------------ */
/* Best-of-`repeats` streaming read of a `bytes` buffer split over nthreads
 * threads, in GB/s (1e9 bytes per second). */
dq_status dq_read_bandwidth(size_t bytes, int nthreads, int repeats, double *gbps);
/* fp32 multiply-adds per second (in G) that nthreads threads issue at once
 * from registers: the compute ceiling of a kernel doing one per weight. */
dq_status dq_fma_throughput(int nthreads, int repeats, double *gmacs);

#endif
