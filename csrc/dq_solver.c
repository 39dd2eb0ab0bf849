/* The decoupleQ alternating loop (ALGORITHM 3.2-3.4) and the method switch.
 *
 * Rows are independent given H, so every candidate is accepted row by row,
 * only where it lowers that row's error: each row's error never rises.
 */
#include "dq_solver.h"
#include "dq_profile.h"

#include <stdio.h>
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

/* Accept the candidate rows whose error is strictly lower.  Candidate row i
 * is layer row rows[i] (rows NULL: row i).  An integer step's candidate
 * brings codes and the (S, Z) it was run with; a float step's (cand_A NULL)
 * only (S, Z).  changed[r] is set to whether row r moved, for every row.
 * Returns the fraction of the layer's rows that improved. */
static double keep_best(const dq_layer_t *L, const int64_t *rows, int64_t k, const int8_t *cand_A,
                        const float *cand_S, const float *cand_Z, const double *cand_err,
                        int8_t *A, float *S, float *Z, double *err, uint8_t *changed)
{
    int64_t improved = 0;
    memset(changed, 0, (size_t)L->m);
    for (int64_t i = 0; i < k; i++) {
        const int64_t r = rows ? rows[i] : i;
        if (!(cand_err[i] < err[r])) continue;
        improved++;
        changed[r] = 1;
        err[r] = cand_err[i];
        if (cand_A) memcpy(A + r * L->n, cand_A + i * L->n, (size_t)L->n);
        /* The initial GPTQ pass's candidate parameters are S and Z themselves. */
        if (cand_S + i * L->G == S + r * L->G) continue;
        memcpy(S + r * L->G, cand_S + i * L->G, sizeof(float) * (size_t)L->G);
        memcpy(Z + r * L->G, cand_Z + i * L->G, sizeof(float) * (size_t)L->G);
    }
    return (double)improved / (double)(L->m > 0 ? L->m : 1);
}

/* The rows a step must revisit, as a layer of their own.
 *
 * Both steps are deterministic functions of one row's inputs: the integer
 * step of (w_r, s_r, z_r), the float step of (w_r, a_r).  A row whose inputs
 * did not change since that step last ran gets the same candidate back, and
 * keep-best (strict <) rejects it.  So after iteration 0 the integer step
 * only needs the rows the last float step moved, and the float step the rows
 * the last integer step moved: the same result for less work (on synthetic
 * W2 layers a third of the rows in iteration 1, under a tenth in 2). */
typedef struct {
    int64_t k;       /* rows in the subset */
    int64_t *rows;   /* k ascending layer rows; NULL when every row is in */
    dq_layer_t L;    /* the subset as a layer: W, V and c gathered */
    float *W, *V;    /* owned copies (k < m only) */
    double *c;
} rowset_t;

static void rowset_free(rowset_t *s)
{
    dq_free(s->rows);
    dq_free(s->W);
    dq_free(s->V);
    dq_free(s->c);
    memset(s, 0, sizeof(*s));
}

static void gather(void *dst, const void *src, const int64_t *rows, int64_t k, size_t row_bytes)
{
    for (int64_t i = 0; i < k; i++)
        memcpy((char *)dst + (size_t)i * row_bytes, (const char *)src + (size_t)rows[i] * row_bytes,
               row_bytes);
}

/* The subset of rows with mask[r] != 0 (mask NULL: every row). */
static dq_status rowset_make(const dq_layer_t *L, const uint8_t *mask, rowset_t *s)
{
    memset(s, 0, sizeof(*s));
    s->L = *L;
    int64_t k = 0;
    for (int64_t r = 0; r < L->m; r++) k += mask ? mask[r] != 0 : 1;
    s->k = k;
    if (k == L->m) return DQ_OK;
    const int64_t n = L->n;
    s->rows = dq_malloc(sizeof(int64_t) * (size_t)(k > 0 ? k : 1));
    s->W = dq_malloc(sizeof(float) * (size_t)(k > 0 ? k * n : 1));
    s->V = dq_malloc(sizeof(float) * (size_t)(k > 0 ? k * n : 1));
    s->c = dq_malloc(sizeof(double) * (size_t)(k > 0 ? k : 1));
    if (!s->rows || !s->W || !s->V || !s->c) {
        rowset_free(s);
        return DQ_ENOMEM;
    }
    for (int64_t r = 0, i = 0; r < L->m; r++)
        if (mask[r]) s->rows[i++] = r;
    gather(s->W, L->W, s->rows, k, sizeof(float) * (size_t)n);
    gather(s->V, L->V, s->rows, k, sizeof(float) * (size_t)n);
    gather(s->c, L->c, s->rows, k, sizeof(double));
    s->L.m = k;
    s->L.W = s->W;
    s->L.V = s->V;
    s->L.c = s->c;
    return DQ_OK;
}

/* Rows of src (layer-sized, row_bytes each) for the subset, into dst. */
static const void *rowset_view(const rowset_t *s, const void *src, void *dst, size_t row_bytes)
{
    if (!s->rows) return src;
    gather(dst, src, s->rows, s->k, row_bytes);
    return dst;
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
    /* cur: the current best (S, Z, err) of a subset's rows, gathered. */
    float *cur_S = NULL, *cur_Z = NULL;
    double *cur_err = NULL;
    uint8_t *changed = NULL;
    rowset_t set = {0};
    float *p_row = NULL;
    double *err_minmax = NULL;
    float *DH = NULL;
    dq_status st;
    const int prof = dq_profile_on();
    double t0 = dq_wall_seconds();

    const int shrink = opts->init == DQ_INIT_SHRINK;
    /* The min-max error product doubles as the shrink search's anchor
     * (saving it one GEMM), when the search will run. */
    if (shrink && opts->iterations >= 2) {
        DH = dq_malloc(sizeof(float) * (size_t)(m * L->n));
        if (!DH) return DQ_ENOMEM;
    }
    /* 3.2 step 1: RTN with the starting parameters is the first best
     * (min-max for the reference's start, which shrinks them later). */
    if (shrink || opts->init == DQ_INIT_MINMAX) {
        st = solve_rtn(L, A, S, Z, err, DH);
    } else {
        st = dq_start_params(L, opts->init, S, Z);
        if (st == DQ_OK) {
            dq_rtn_codes(L, S, Z, A);
            st = dq_row_errors(L, A, S, Z, err);
        }
    }
    if (st != DQ_OK) {
        dq_free(DH);
        return st;
    }
    dq_profile_lap(prof, &t0, shrink || opts->init == DQ_INIT_MINMAX ? "minmax rtn" : "init rtn", -1);
    record(trace, max_trace, n_trace, err, m);

    if ((st = candidate_alloc(&cand, L)) != DQ_OK) goto done;
    if ((st = candidate_alloc(&shrunk, L)) != DQ_OK) goto done;
    p_row = dq_malloc(sizeof(float) * (size_t)m);
    err_minmax = dq_malloc(sizeof(double) * (size_t)m);
    cur_S = dq_malloc(sizeof(float) * (size_t)(m * L->G));
    cur_Z = dq_malloc(sizeof(float) * (size_t)(m * L->G));
    cur_err = dq_malloc(sizeof(double) * (size_t)m);
    changed = dq_malloc((size_t)m);
    if (!p_row || !err_minmax || !cur_S || !cur_Z || !cur_err || !changed) {
        st = DQ_ENOMEM;
        goto done;
    }
    memcpy(err_minmax, err, sizeof(double) * (size_t)m);

    /* The factor (and act-order permutation) do not depend on (S, Z):
     * computed once here and reused by every integer step. */
    if ((st = dq_gptq_factor(L, opts->act_order, 1, &F)) != DQ_OK) goto done;
    dq_profile_lap(prof, &t0, "factor", -1);

    /* 3.2 step 2: a GPTQ pass with the starting parameters. */
    if ((st = dq_round_gptq_vs(L, &F, S, Z, opts->blocksize, err, cand.A, cand.err)) != DQ_OK)
        goto done;
    dq_profile_lap(prof, &t0, "initial gptq", -1);
    keep_best(L, NULL, m, cand.A, S, Z, cand.err, A, S, Z, err, changed);
    record(trace, max_trace, n_trace, err, m);
    if (opts->iterations < 2) goto done;
    if (dq_interrupted()) {
        st = DQ_EINTR;
        goto done;
    }

    /* Iteration 0's candidate (S', Z') is the float solve of RTN codes: with
     * the reference's start (3.3) under each row's best shrunk range, else
     * under the starting parameters themselves (still in S, Z: the GPTQ
     * pass only took codes).  The errors of both are not used. */
    if (shrink) {
        if ((st = dq_shrink_search_choose(L, err_minmax, DH, shrunk.S, shrunk.Z, p_row, NULL)) !=
            DQ_OK)
            goto done;
        dq_free(DH);
        DH = NULL;
        dq_profile_lap(prof, &t0, "shrink search", -1);
    } else {
        memcpy(shrunk.S, S, sizeof(float) * (size_t)(m * L->G));
        memcpy(shrunk.Z, Z, sizeof(float) * (size_t)(m * L->G));
    }
    dq_rtn_codes(L, shrunk.S, shrunk.Z, shrunk.A);
    /* Its errors are never read: none are computed. */
    if ((st = dq_float_step_update(L, shrunk.A, NULL, NULL, NULL, shrunk.S, shrunk.Z, NULL)) !=
        DQ_OK)
        goto done;
    dq_profile_lap(prof, &t0, "start float step", -1);

    /* 3.4: alternate integer and float steps, keeping the best per row.
     * Iteration 0 runs both steps on every row; later steps only on the rows
     * whose inputs the previous step changed (see rowset_t). */
    const size_t sz_row = sizeof(float) * (size_t)L->G;
    for (int it = 0; it < opts->iterations - 1; it++) {
        if (dq_interrupted()) {
            st = DQ_EINTR;
            goto done;
        }
        const float *Sc = it == 0 ? shrunk.S : S;
        const float *Zc = it == 0 ? shrunk.Z : Z;
        if ((st = rowset_make(L, it == 0 ? NULL : changed, &set)) != DQ_OK) goto done;
        /* Sc/Zc may alias S/Z, so the candidate keeps its own copy. */
        if (set.rows) {
            gather(cand.S, Sc, set.rows, set.k, sz_row);
            gather(cand.Z, Zc, set.rows, set.k, sz_row);
        } else {
            memcpy(cand.S, Sc, sz_row * (size_t)m);
            memcpy(cand.Z, Zc, sz_row * (size_t)m);
        }
        const double *err_ref = rowset_view(&set, err, cur_err, sizeof(double));
        if (set.k > 0 &&
            (st = integer_step(&set.L, opts, &F, cand.S, cand.Z, err_ref, cand.A, cand.err)) != DQ_OK)
            goto done;
        dq_profile_lap(prof, &t0, "integer step", it);
        if (prof)
            fprintf(stderr, "[decoupleq profile]   (%lld of %lld rows)\n", (long long)set.k,
                    (long long)m);
        double rate = keep_best(L, set.rows, set.k, cand.A, cand.S, cand.Z, cand.err, A, S, Z, err,
                                changed);
        record(trace, max_trace, n_trace, err, m);
        rowset_free(&set);
        if (rate < EARLY_STOP_RATE) break;

        /* Same codes A as the current best (S, Z, err): errors by update. */
        if ((st = rowset_make(L, it == 0 ? NULL : changed, &set)) != DQ_OK) goto done;
        const int8_t *Ac = rowset_view(&set, A, cand.A, (size_t)L->n);
        const float *S0 = rowset_view(&set, S, cur_S, sz_row);
        const float *Z0 = rowset_view(&set, Z, cur_Z, sz_row);
        const double *err0 = rowset_view(&set, err, cur_err, sizeof(double));
        if (set.k > 0 && (st = dq_float_step_update(&set.L, Ac, S0, Z0, err0, cand.S, cand.Z,
                                                    cand.err)) != DQ_OK)
            goto done;
        dq_profile_lap(prof, &t0, "float step", it);
        if (prof)
            fprintf(stderr, "[decoupleq profile]   (%lld of %lld rows)\n", (long long)set.k,
                    (long long)m);
        rate = keep_best(L, set.rows, set.k, NULL, cand.S, cand.Z, cand.err, A, S, Z, err, changed);
        record(trace, max_trace, n_trace, err, m);
        rowset_free(&set);
        if (rate < EARLY_STOP_RATE) break;
    }

done:
    rowset_free(&set);
    dq_free(cur_S);
    dq_free(cur_Z);
    dq_free(cur_err);
    dq_free(changed);
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
