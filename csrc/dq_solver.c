/* The decoupleQ alternating loop (ALGORITHM 3.2-3.4) and the method switch.
 *
 * Rows are independent given H, so every candidate is accepted row by row,
 * only where it lowers that row's error: each row's error never rises.
 */
#include "dq_solver.h"
#include "dq_profile.h"

#include <string.h>

#define EARLY_STOP_RATE 1e-4

typedef struct {
    int64_t m, n, G;
    int8_t *A;
    float *S, *Z;
    double *err;
} candidate_t;

static void candidate_free(candidate_t *c)
{
    dq_free(c->A);
    dq_free(c->S);
    dq_free(c->Z);
    dq_free(c->err);
    memset(c, 0, sizeof(*c));
}

static dq_status candidate_alloc(candidate_t *c, const dq_layer_t *L)
{
    c->m = L->m;
    c->n = L->n;
    c->G = L->G;
    c->A = dq_malloc((size_t)(L->m * L->n));
    c->S = dq_calloc(sizeof(float) * (size_t)(L->m * L->G));
    c->Z = dq_calloc(sizeof(float) * (size_t)(L->m * L->G));
    c->err = dq_malloc(sizeof(double) * (size_t)L->m);
    if (!c->A || !c->S || !c->Z || !c->err) {
        candidate_free(c);
        return DQ_ENOMEM;
    }
    return DQ_OK;
}

/* Accept, row by row, the parts of `cand` whose error is strictly lower.
 * take_codes / take_params choose which parts move (an integer step brings
 * codes and the (S, Z) it was run with; a float step only (S, Z)).
 * Returns the fraction of rows that improved. */
static double keep_best(const dq_layer_t *L, const int8_t *cand_A, const float *cand_S,
                        const float *cand_Z, const double *cand_err, int8_t *A, float *S,
                        float *Z, double *err)
{
    int64_t improved = 0;
    for (int64_t r = 0; r < L->m; r++) {
        if (!(cand_err[r] < err[r])) continue;
        improved++;
        err[r] = cand_err[r];
        if (cand_A) memcpy(A + r * L->n, cand_A + r * L->n, (size_t)L->n);
        memcpy(S + r * L->G, cand_S + r * L->G, sizeof(float) * (size_t)L->G);
        memcpy(Z + r * L->G, cand_Z + r * L->G, sizeof(float) * (size_t)L->G);
    }
    return (double)improved / (double)(L->m > 0 ? L->m : 1);
}

static void record(double *trace, int64_t max_trace, int64_t *count, const double *err, int64_t m)
{
    if (trace && *count < max_trace) memcpy(trace + (*count) * m, err, sizeof(double) * (size_t)m);
    (*count)++;
}

/* err_ref: the current best errors; only rows below them are taken, so
 * the GPTQ step need not measure the others exactly. */
static dq_status integer_step(const dq_layer_t *L, const dq_solve_opts_t *opts,
                              const dq_gptq_factor_t *F, const float *S, const float *Z,
                              const double *err_ref, int8_t *A, double *err)
{
    if (opts->rounding == DQ_ROUNDING_PGD)
        return dq_round_pgd(L, opts->act_order ? F->perm : NULL, S, Z, &opts->pgd, A, err);
    return dq_round_gptq_vs(L, F, S, Z, opts->blocksize, err_ref, A, err);
}

/* DH NULL, or m x n: receives the min-max D Hf (see dq_row_errors_keep). */
static dq_status solve_rtn(const dq_layer_t *L, int8_t *A, float *S, float *Z, double *err,
                           float *DH)
{
    dq_minmax_params(L, NULL, S, Z);
    dq_rtn_codes(L, S, Z, A);
    return DH ? dq_row_errors_keep(L, A, S, Z, err, DH) : dq_row_errors(L, A, S, Z, err);
}

static dq_status solve_decoupleq(const dq_layer_t *L, const dq_solve_opts_t *opts, int8_t *A,
                                 float *S, float *Z, double *err, double *trace,
                                 int64_t max_trace, int64_t *n_trace)
{
    const int64_t m = L->m;
    dq_gptq_factor_t F = {0};
    candidate_t cand = {0}, shrunk = {0};
    float *p_row = NULL;
    double *err_minmax = NULL;
    float *DH = NULL;
    dq_status st;
    const int prof = dq_profile_on();
    double t0 = dq_wall_seconds();

    /* The min-max error product doubles as the shrink search's anchor
     * (saving it one GEMM), when the search will run. */
    if (opts->iterations >= 2) {
        DH = dq_malloc(sizeof(float) * (size_t)(m * L->n));
        if (!DH) return DQ_ENOMEM;
    }
    /* 3.2 step 1: min-max RTN is the first best. */
    st = solve_rtn(L, A, S, Z, err, DH);
    if (st != DQ_OK) {
        dq_free(DH);
        return st;
    }
    dq_profile_lap(prof, &t0, "minmax rtn", -1);
    record(trace, max_trace, n_trace, err, m);

    if ((st = candidate_alloc(&cand, L)) != DQ_OK) goto done;
    if ((st = candidate_alloc(&shrunk, L)) != DQ_OK) goto done;
    p_row = dq_malloc(sizeof(float) * (size_t)m);
    err_minmax = dq_malloc(sizeof(double) * (size_t)m);
    if (!p_row || !err_minmax) {
        st = DQ_ENOMEM;
        goto done;
    }
    memcpy(err_minmax, err, sizeof(double) * (size_t)m);

    /* The factor (and act-order permutation) do not depend on (S, Z):
     * computed once here and reused by every integer step. */
    if ((st = dq_gptq_factor(L, opts->act_order, 1, &F)) != DQ_OK) goto done;
    dq_profile_lap(prof, &t0, "factor", -1);

    /* 3.2 step 2: a GPTQ pass with the min-max parameters. */
    if ((st = dq_round_gptq_vs(L, &F, S, Z, opts->blocksize, err, cand.A, cand.err)) != DQ_OK)
        goto done;
    dq_profile_lap(prof, &t0, "initial gptq", -1);
    keep_best(L, cand.A, S, Z, cand.err, A, S, Z, err);
    record(trace, max_trace, n_trace, err, m);
    if (opts->iterations < 2) goto done;

    /* 3.3: per-row shrink search, then the float solve of its RTN codes gives
     * iteration 0's candidate (S', Z'); the errors of both are not used. */
    if ((st = dq_shrink_search_choose(L, err_minmax, DH, shrunk.S, shrunk.Z, p_row, NULL)) !=
        DQ_OK)
        goto done;
    dq_free(DH);
    DH = NULL;
    dq_profile_lap(prof, &t0, "shrink search", -1);
    dq_rtn_codes(L, shrunk.S, shrunk.Z, shrunk.A);
    /* Its errors are never read: none are computed. */
    if ((st = dq_float_step_update(L, shrunk.A, NULL, NULL, NULL, shrunk.S, shrunk.Z, NULL)) !=
        DQ_OK)
        goto done;
    dq_profile_lap(prof, &t0, "shrink float step", -1);

    /* 3.4: alternate integer and float steps, keeping the best per row. */
    for (int it = 0; it < opts->iterations - 1; it++) {
        const float *Sc = it == 0 ? shrunk.S : S;
        const float *Zc = it == 0 ? shrunk.Z : Z;
        /* Sc/Zc may alias S/Z, so the candidate keeps its own copy. */
        memcpy(cand.S, Sc, sizeof(float) * (size_t)(m * L->G));
        memcpy(cand.Z, Zc, sizeof(float) * (size_t)(m * L->G));
        if ((st = integer_step(L, opts, &F, cand.S, cand.Z, err, cand.A, cand.err)) != DQ_OK)
            goto done;
        dq_profile_lap(prof, &t0, "integer step", it);
        double rate = keep_best(L, cand.A, cand.S, cand.Z, cand.err, A, S, Z, err);
        record(trace, max_trace, n_trace, err, m);
        if (rate < EARLY_STOP_RATE) break;

        /* Same codes A as the current best (S, Z, err): errors by update. */
        if ((st = dq_float_step_update(L, A, S, Z, err, cand.S, cand.Z, cand.err)) != DQ_OK)
            goto done;
        dq_profile_lap(prof, &t0, "float step", it);
        rate = keep_best(L, NULL, cand.S, cand.Z, cand.err, A, S, Z, err);
        record(trace, max_trace, n_trace, err, m);
        if (rate < EARLY_STOP_RATE) break;
    }

done:
    dq_free(DH);
    dq_gptq_factor_free(&F);
    candidate_free(&cand);
    candidate_free(&shrunk);
    dq_free(p_row);
    dq_free(err_minmax);
    return st;
}

dq_status dq_solve(const dq_layer_t *L, const dq_solve_opts_t *opts, int8_t *A, float *S,
                   float *Z, double *err, double *trace, int64_t max_trace, int64_t *n_trace_out)
{
    int64_t n_trace = 0;
    dq_status st;
    if (opts->iterations < 1 || opts->blocksize < 1) return DQ_EINVAL;
    switch (opts->method) {
    case DQ_METHOD_RTN:
        st = solve_rtn(L, A, S, Z, err, NULL);
        if (st == DQ_OK) record(trace, max_trace, &n_trace, err, L->m);
        break;
    case DQ_METHOD_GPTQ: {
        dq_gptq_factor_t F = {0};
        st = dq_gptq_factor(L, opts->act_order, 0, &F);
        if (st == DQ_OK) st = dq_gptq_baseline(L, &F, opts->blocksize, A, S, Z, err);
        dq_gptq_factor_free(&F);
        if (st == DQ_OK) record(trace, max_trace, &n_trace, err, L->m);
        break;
    }
    case DQ_METHOD_DECOUPLEQ:
        st = solve_decoupleq(L, opts, A, S, Z, err, trace, max_trace, &n_trace);
        break;
    default: st = DQ_EINVAL;
    }
    if (n_trace_out) *n_trace_out = n_trace < max_trace ? n_trace : max_trace;
    return st;
}
