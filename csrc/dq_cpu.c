/* CPU feature detection and the choice of kernel, made once per process.
 *
 * AVX2 kernels run only when the CPU reports AVX2, FMA and F16C AND the OS
 * has enabled saving of the YMM registers (OSXSAVE + XCR0 bits 1 and 2): a
 * CPU with AVX2 under an OS that does not save YMM state would corrupt
 * registers across context switches.  DECOUPLEQ_KERNEL=reference (or avx2,
 * avx2_subnormal, auto) overrides the choice.
 */
#include "dq_kernels.h"
#include "dq_profile.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static int detect_avx2(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned int fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (fma | osxsave | avx | f16c)) != (fma | osxsave | avx | f16c)) return 0;
    unsigned int xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    (void)xhi;
    if ((xlo & 6u) != 6u) return 0; /* XMM and YMM state saved by the OS */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) != 0; /* AVX2 */
}

static int detect_avx512(void)
{
    unsigned int a, b, c, d;
    unsigned int xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    (void)xhi;
    /* XMM, YMM, opmask, the upper halves of ZMM0-15 and ZMM16-31 */
    if ((xlo & 0xe6u) != 0xe6u) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 16)) != 0; /* AVX-512F */
}
#else
static int detect_avx2(void) { return 0; }
static int detect_avx512(void) { return 0; }
#endif

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int has_avx2;
static const dq_kernel_t *chosen;
static const dq_kernel_t *available[4];
static char reason[256];

/* Best-of-7 time of one kernel's batch-1 code dot on a small 2-bit matrix
 * that stays in cache; returns a huge time if memory runs out. */
static double time_qdot(const dq_kernel_t *k, const dq_packed_t *W, const float *x, float *y)
{
    dq_xprep_t X;
    if (dq_xprep_init(&X, W, x, 1, k->xmode) != DQ_OK) return 1e30;
    double best = 1e30;
    for (int rep = 0; rep < 7; rep++) {
        double t0 = dq_wall_seconds();
        k->qdot(W, &X, 0, W->out, y, W->out);
        double dt = dq_wall_seconds() - t0;
        if (dt < best) best = dt;
    }
    dq_xprep_free(&X);
    return best;
}

/* The subnormal variant wins only where the FPU takes subnormal operands at
 * full speed; on CPUs that trap to microcode it can be many times slower.
 * Measuring beats a vendor table. */
static void calibrate(void)
{
    const int64_t out = 32, in = 2048;
    dq_packed_t W;
    dq_packed_describe(&W, out, in, 2, -1);
    uint32_t *codes = (uint32_t *)dq_malloc((size_t)(out * W.row_words) * sizeof(uint32_t));
    float *scale = (float *)dq_malloc((size_t)out * sizeof(float));
    float *x = (float *)dq_malloc((size_t)in * sizeof(float));
    float *y = (float *)dq_malloc((size_t)out * sizeof(float));
    if (!codes || !scale || !x || !y) {
        chosen = &dq_kernel_avx2;
        snprintf(reason, sizeof reason, "AVX2+FMA+F16C with OS YMM support (not timed: no memory)");
        goto done;
    }
    uint32_t state = 12345u;
    for (int64_t i = 0; i < out * W.row_words; i++) {
        state = state * 1664525u + 1013904223u;
        codes[i] = state;
    }
    for (int64_t i = 0; i < out; i++) scale[i] = 0.01f;
    for (int64_t i = 0; i < in; i++) x[i] = (float)((i % 17) - 8) * 0.125f;
    W.codes = codes;
    W.scale = scale;
    W.zero = NULL;
    W.sz_type = DQ_SZ_F32;
    double t_cvt = time_qdot(&dq_kernel_avx2, &W, x, y);
    double t_subn = time_qdot(&dq_kernel_avx2_subn, &W, x, y);
    /* A clear margin, so noise does not flip the choice between runs. */
    chosen = t_subn < 0.9 * t_cvt ? &dq_kernel_avx2_subn : &dq_kernel_avx2;
    snprintf(reason, sizeof reason,
             "AVX2+FMA+F16C with OS YMM support; timed once: avx2_subnormal %.3g us, avx2 %.3g us",
             t_subn * 1e6, t_cvt * 1e6);
done:
    dq_free(codes);
    dq_free(scale);
    dq_free(x);
    dq_free(y);
}

static void choose(void)
{
    has_avx2 = detect_avx2();
    int n = 0;
    available[n++] = &dq_kernel_ref;
    if (has_avx2) {
        available[n++] = &dq_kernel_avx2;
        available[n++] = &dq_kernel_avx2_subn;
    }
    available[n] = NULL;

    const char *env = getenv("DECOUPLEQ_KERNEL");
    char note[96] = "";
    if (env && *env && strcmp(env, "auto") != 0) {
        for (int i = 0; available[i]; i++) {
            if (strcmp(env, available[i]->name) == 0) {
                chosen = available[i];
                snprintf(reason, sizeof reason, "forced by DECOUPLEQ_KERNEL=%s", env);
                return;
            }
        }
        snprintf(note, sizeof note, " (DECOUPLEQ_KERNEL=%.40s is not available here)", env);
    }
    if (!has_avx2) {
        chosen = &dq_kernel_ref;
        snprintf(reason, sizeof reason, "no AVX2+FMA+F16C, or the OS does not save YMM state");
    } else {
        calibrate();
    }
    if (note[0]) strncat(reason, note, sizeof reason - strlen(reason) - 1);
}

int dq_cpu_has_avx2(void)
{
    pthread_once(&once, choose);
    return has_avx2;
}

/* Only asked after dq_cpu_has_avx2() (xgetbv needs OSXSAVE, which that
 * checked). */
static pthread_once_t once512 = PTHREAD_ONCE_INIT;
static int has_avx512;
static void choose512(void) { has_avx512 = dq_cpu_has_avx2() && detect_avx512(); }

int dq_cpu_has_avx512(void)
{
    pthread_once(&once512, choose512);
    return has_avx512;
}

int dq_solver_simd(void)
{
    const char *env = getenv("DECOUPLEQ_KERNEL");
    if (env && strcmp(env, "reference") == 0) return 0;
    return dq_cpu_has_avx2();
}

const dq_kernel_t *dq_kernel_default(void)
{
    pthread_once(&once, choose);
    return chosen;
}

const dq_kernel_t *const *dq_kernel_list(void)
{
    pthread_once(&once, choose);
    return available;
}

const dq_kernel_t *dq_kernel_by_name(const char *name)
{
    const dq_kernel_t *const *list = dq_kernel_list();
    for (int i = 0; list[i]; i++)
        if (strcmp(list[i]->name, name) == 0) return list[i];
    return NULL;
}

const char *dq_kernel_reason(void)
{
    pthread_once(&once, choose);
    return reason;
}
