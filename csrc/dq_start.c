/* The starting (S, Z) of a layer, by initialisation (ALGORITHM 3.2, 3.3, 7).
 *
 * One switch for every method: RTN rounds with these parameters, GPTQ holds
 * them fixed through its sweep (static groups), decoupleQ starts its
 * alternation from them.
 */
#include "dq_solver.h"

dq_status dq_start_params(const dq_layer_t *L, int init, float *S, float *Z)
{
    switch (init) {
    case DQ_INIT_MINMAX:
        dq_minmax_params(L, NULL, S, Z);
        return DQ_OK;
    case DQ_INIT_NEUQI:
    case DQ_INIT_NEUQI_INT:
        return dq_neuqi_params_damped(L, init == DQ_INIT_NEUQI_INT, S, Z, NULL);
    case DQ_INIT_SHRINK: {
        /* Min-max, then each row's best shrunk range (ALGORITHM 3.3): the
         * search needs the min-max errors and their product D Hf. */
        if (!L->H || !L->V) return DQ_EINVAL;
        const int64_t m = L->m, n = L->n;
        int8_t *A = dq_malloc((size_t)(m * n));
        float *DH = dq_malloc(sizeof(float) * (size_t)(m * n));
        double *err = dq_malloc(sizeof(double) * (size_t)m);
        float *p_row = dq_malloc(sizeof(float) * (size_t)m);
        dq_status st = DQ_ENOMEM;
        if (A && DH && err && p_row) {
            dq_minmax_params(L, NULL, S, Z);
            dq_rtn_codes(L, S, Z, A);
            st = dq_row_errors_keep(L, A, S, Z, err, DH);
            if (st == DQ_OK) st = dq_shrink_search_choose(L, err, DH, S, Z, p_row, NULL);
        }
        dq_free(A);
        dq_free(DH);
        dq_free(err);
        dq_free(p_row);
        return st;
    }
    default:
        return DQ_EINVAL;
    }
}
