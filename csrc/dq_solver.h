/* Internal API of the layer solver: the contract between the solver's C files.
 *
 * Notation follows ALGORITHM.md: W is m x n (rows = output channels), H00 is
 * the damped n x n Hessian, g the group size (g == n for per-channel),
 * G = ceil(n/g): the last group has n - (G-1) g columns when g does not divide n.
 * Codes A are signed int8 in [qmin, qmax]; scales S and zeros Z are m x G
 * float32; the dequantised weight is A*S + Z (symmetric: A*S, Z stays 0).
 * Row errors are e_r = (w^_r - w_r) H00 (w^_r - w_r)^T, in float64.
 */
#ifndef DQ_SOLVER_H
#define DQ_SOLVER_H

#include "dq_common.h"

/* ---- one layer's problem, with the per-layer precomputations ---------- */
typedef struct {
    int64_t m, n, g, G;
    int bits, qmin, qmax;
    int symmetric;       /* 1: Z == 0 and the scale alone is solved for */
    int rule;            /* DQ_ROUND_HALF_UP or DQ_ROUND_HALF_EVEN */
    const float *W;      /* m x n, borrowed */
    const double *H;     /* n x n damped H00, float64, borrowed, symmetric */
    float *Hf;           /* n x n float32 copy of H, owned */
    float *V;            /* m x n, W H (float32 GEMM), owned */
    double *c;           /* m, w_r H w_r^T, owned */
} dq_layer_t;

/* Validate sizes (g >= 1, clipped to n; 2 <= bits <= 8), and compute Hf, V and c. */
dq_status dq_layer_init(dq_layer_t *L, const float *W, const double *H, int64_t m, int64_t n,
                        int64_t group_size, int bits, int symmetric, int rule);
/* The same validation and Hf (NULL when H is NULL) without the O(m n^2)
 * products: V and c stay NULL.  For callers that never read them (RTN,
 * row errors, the GPTQ step and baseline). */
dq_status dq_layer_init_basic(dq_layer_t *L, const float *W, const double *H, int64_t m,
                              int64_t n, int64_t group_size, int bits, int symmetric, int rule);
/* Safe on a zeroed or failed layer, and twice. */
void dq_layer_free(dq_layer_t *L);

/* H00 = H + percdamp * mean(diag H) * I, written to out (may alias H).
 * If diag H is all zero the damping term is percdamp (H was empty). */
void dq_damp(const double *H, int64_t n, double percdamp, double *out);

/* ---- initialisation (dq_init.c) -------------------------------------- */
/* Min-max parameters of ALGORITHM 1.2 with the range shrunk by p_row[r] per
 * row (p_row NULL means 1 for every row). */
void dq_minmax_params(const dq_layer_t *L, const float *p_row, float *S, float *Z);
/* Round to the grid: A = clamp(R((W - Z)/S)) (symmetric: R(W/S)). */
void dq_rtn_codes(const dq_layer_t *L, const float *S, const float *Z, int8_t *A);
/* e_r for a given (A, S, Z); one m x n x n GEMM on D = A*S + Z - W. */
dq_status dq_row_errors(const dq_layer_t *L, const int8_t *A, const float *S, const float *Z,
                        double *err);
/* The same for the k rows listed in `rows` (NULL: rows 0..k-1); err is
 * indexed by row number.  Z NULL counts as zero (symmetric). */
dq_status dq_row_errors_rows(const dq_layer_t *L, const int64_t *rows, int64_t k, const int8_t *A,
                             const float *S, const float *Z, double *err);
/* dq_row_errors that also returns its product DH = D Hf (m x n float32,
 * D = A*S + Z - W), for a caller that reuses it (the shrink search's anchor
 * is DH + V). */
dq_status dq_row_errors_keep(const dq_layer_t *L, const int8_t *A, const float *S, const float *Z,
                             double *err, float *DH);
/* Per-row shrink search of ALGORITHM 3.3 (the same objective: the row's H00
 * error of the RTN codes under range p*(lo, hi), p on the 0.005 grid from
 * 1.0 down to 0.205); writes the best (S, Z), its p per row, and its error.
 * err_start holds the min-max errors (a candidate must be strictly better);
 * err is the exact (float32 GEMM) error of the returned (S, Z). */
dq_status dq_shrink_search(const dq_layer_t *L, const double *err_start, float *S, float *Z,
                           float *p_row, double *err);
/* The same choice of p per row for the solver, cheaper:
 * - DH (may be NULL): the min-max D Hf from dq_row_errors_keep (err_start
 *   must be its errors); the search's anchor u_1 Hf is then DH + V, not a
 *   GEMM;
 * - err NULL: no errors are returned, so a row whose estimates single out
 *   one candidate (no other within the tie tolerance, and below err_start by
 *   more than it) takes it without the exact check, which could not change
 *   the choice. */
dq_status dq_shrink_search_choose(const dq_layer_t *L, const double *err_start, const float *DH,
                                  float *S, float *Z, float *p_row, double *err);

/* ---- NeUQI initialisation (dq_neuqi.c) ------------------------------ */
/* NeUQI's (S, Z) of every row and group (ALGORITHM 7), in this library's
 * convention (a code q dequantises to S q + Z).  hdiag: n per-column weights
 * (the damped Hessian diagonal), or NULL for equal weights; each group's
 * weights are normalised to sum 1.  integer_zero: NeUQI_int (integer z,
 * 2048 scale steps).  Symmetric layers keep Z = 0 and search s only.
 * obj (m x G, may be NULL): each group's objective sum h (w - w^)^2 at the
 * chosen float64 (s, z).  Deterministic, threads over rows. */
dq_status dq_neuqi_params(const dq_layer_t *L, const double *hdiag, int integer_zero, float *S,
                          float *Z, double *obj);
/* The same with hdiag = diag(L->H) (NULL H: equal weights). */
dq_status dq_neuqi_params_damped(const dq_layer_t *L, int integer_zero, float *S, float *Z,
                                 double *obj);

/* ---- the starting parameters (dq_start.c) --------------------------- */
enum { DQ_INIT_MINMAX = 0, DQ_INIT_SHRINK = 1, DQ_INIT_NEUQI = 2, DQ_INIT_NEUQI_INT = 3 };
/* (S, Z) by initialisation: min-max (ALGORITHM 1.2), min-max with each
 * row's shrink search (3.3; needs the full layer: H, V and c), NeUQI or
 * NeUQI_int (7; weights diag H, or equal weights when L->H is NULL). */
dq_status dq_start_params(const dq_layer_t *L, int init, float *S, float *Z);

/* ---- float step (dq_float_step.c) ------------------------------------ */
/* Closed-form least squares for (S, Z) given A, per row; writes S, Z and the
 * new row errors (dq_row_errors of the float32 result).  A parameter that a
 * row's codes leave undetermined (a group of all-equal codes) is fixed at 0;
 * see dq_float_step.c for the relative pivot guard. */
dq_status dq_float_step(const dq_layer_t *L, const int8_t *A, float *S, float *Z, double *err);
/* The same step for a solver that already holds the errors err0 of the same
 * codes A under the current (S0, Z0): the new errors are
 * err0 + d^T (P d + 2 (P theta0 - y)), d = theta - theta0 (float64 from the
 * assembled system, no GEMM; accurate to ~1e-7 of |d| |P theta|, where the
 * bare identity c_r - theta^T y loses ~1e-6 of c_r).  S0 NULL: errors by
 * dq_row_errors as dq_float_step; err NULL: no errors at all.  S, Z must not
 * alias S0, Z0. */
dq_status dq_float_step_update(const dq_layer_t *L, const int8_t *A, const float *S0,
                               const float *Z0, const double *err0, float *S, float *Z,
                               double *err);

/* ---- integer step "gptq" (dq_round_gptq.c) --------------------------- */
typedef struct {
    int64_t n;
    int64_t *perm;        /* n, column order (act-order or identity), owned */
    /* H_round = H00[perm][:,perm] + lambda_extra * I = R R^T with R upper
     * (R = U^-1 for GPTQ's U, H_round^-1 = U^T U); stored as: */
    float *N;             /* n x n, R with each column divided by its diagonal, owned */
    float *rdiag;         /* n, diag R, owned */
    float *U;             /* n x n, U = R^-1; only for the baseline without act-order and with
                             groups (its group parameters need GPTQ's own partial updates),
                             else NULL */
    double lambda_extra;
    int act_order;        /* perm is act-order (the baseline then uses static groups) */
} dq_gptq_factor_t;

/* Factor once per layer: perm = act-order (stable argsort of diag H00,
 * descending; ties by index) or identity, and the factor R of H_round =
 * H00[perm][:,perm] + t*mean(diag H00)*I (float64 Cholesky of the reversed
 * matrix, stored float32), t the first rung of the damping ladder that
 * factors with no pivot at rounding-noise level: decoupleq_damping = 1 gives
 * decoupleQ's t in {0.01, 0.1, 1, 10, 100}, 0 the GPTQ baseline's
 * {0, 0.01, 0.1, 1, 10, 100} (and, as reference GPTQ, a zero diagonal entry
 * counts as 1).  DQ_ENOTPD when every rung fails.  Needs L->H only (not V,
 * c or Hf). */
dq_status dq_gptq_factor(const dq_layer_t *L, int act_order, int decoupleq_damping,
                         dq_gptq_factor_t *F);
void dq_gptq_factor_free(dq_gptq_factor_t *F);
/* The act-order permutation alone (ALGORITHM 3.7): columns by decreasing
 * diag H, ties by ascending index; the one dq_gptq_factor uses. */
dq_status dq_act_order_perm(const double *H, int64_t n, int64_t *perm);

/* decoupleQ's GPTQ step (ALGORITHM 2.2): fixed (S, Z) per element, start
 * from W, lazy blocks of `blocksize` columns.  Writes A and the row errors
 * measured with H00. */
dq_status dq_round_gptq(const dq_layer_t *L, const dq_gptq_factor_t *F, const float *S,
                        const float *Z, int64_t blocksize, int8_t *A, double *err);
/* The same for a caller that keeps a row only if its error is below
 * err_ref[r] (NULL: every error exact): a row whose error from the sweep's
 * identity is above err_ref[r] by more than the identity's noise is not
 * measured exactly and keeps that (inexact, but certainly >= err_ref[r])
 * value. */
dq_status dq_round_gptq_vs(const dq_layer_t *L, const dq_gptq_factor_t *F, const float *S,
                           const float *Z, int64_t blocksize, const double *err_ref, int8_t *A,
                           double *err);

/* Reference GPTQ (ALGORITHM 2.1) as a baseline method: min-max group
 * parameters recomputed from the updated weights at each group start
 * (static groups from the original W when act_order is on), written back in
 * this library's signed-code / float-zero convention. */
dq_status dq_gptq_baseline(const dq_layer_t *L, const dq_gptq_factor_t *F, int64_t blocksize,
                           int8_t *A, float *S, float *Z, double *err);

/* ---- integer step "pgd" (dq_round_pgd.c) ----------------------------- */
typedef struct {
    int64_t steps_before_round;  /* K1 */
    int64_t steps_per_column;    /* K2 */
    double lr;                   /* phase A learning rate; phase B is fixed at 1e-3 */
} dq_pgd_opts_t;

/* Projected Adam on the box relaxation, then column-by-column rounding with
 * continued PGD on the remaining columns (ALGORITHM 3.5, 6.6).  perm: column
 * order (NULL = natural). */
dq_status dq_round_pgd(const dq_layer_t *L, const int64_t *perm, const float *S, const float *Z,
                       const dq_pgd_opts_t *opts, int8_t *A, double *err);

/* ---- the alternating loop (dq_solver.c) ------------------------------ */
enum { DQ_METHOD_RTN = 0, DQ_METHOD_GPTQ = 1, DQ_METHOD_DECOUPLEQ = 2 };
enum { DQ_ROUNDING_GPTQ = 0, DQ_ROUNDING_PGD = 1 };

typedef struct {
    int method, rounding, act_order, iterations;
    int init;            /* DQ_INIT_*: decoupleQ's start (DQ_INIT_SHRINK: the reference's) */
    int64_t blocksize;
    dq_pgd_opts_t pgd;
} dq_solve_opts_t;

/* Quantise one layer.  trace (may be NULL) receives the per-row best error
 * after each accepted step, n_trace rows of m; *n_trace_out says how many
 * were written. */
dq_status dq_solve(const dq_layer_t *L, const dq_solve_opts_t *opts, int8_t *A, float *S,
                   float *Z, double *err, double *trace, int64_t max_trace, int64_t *n_trace_out);

#endif
