/* Python boundary of the float step and of the shrink search. */
#include "py_common.h"
#include "dq_solver.h"

#include <string.h>

static PyObject *py_float_step(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"W", "A", "H00", "group_size", "symmetric", NULL};
    PyObject *oW, *oA, *oH;
    long group_size;
    int symmetric;
    dq_py_layer_args_t la;
    PyArrayObject *A = NULL, *S = NULL, *Z = NULL, *E = NULL;
    PyObject *result = NULL;
    dq_status st = DQ_OK;
    memset(&la, 0, sizeof(la));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOlp:float_step", kwlist, &oW, &oA, &oH,
                                     &group_size, &symmetric))
        return NULL;
    /* The float step does not depend on the bit width or the rounding rule:
     * 8 bits admits every int8 code. */
    if (dq_py_layer_args(oW, oH, group_size, 8, symmetric, "half_up", &la) < 0) goto fail;
    if (!(A = dq_py_take(oA, "A", NPY_INT8, 2))) goto fail;
    if (PyArray_DIM(A, 0) != la.m || PyArray_DIM(A, 1) != la.n) {
        PyErr_Format(PyExc_ValueError, "A must have the shape of W (%lld, %lld), got (%lld, %lld)",
                     (long long)la.m, (long long)la.n, (long long)PyArray_DIM(A, 0),
                     (long long)PyArray_DIM(A, 1));
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)la.m, (npy_intp)dq_num_groups(la.n, la.group_size)};
    if (!(S = dq_py_zeros(2, dims, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, dims, NPY_FLOAT32)) ||
        !(E = dq_py_zeros(1, dims, NPY_FLOAT64)))
        goto fail;

    Py_BEGIN_ALLOW_THREADS
    dq_layer_t L;
    st = dq_layer_init(&L, (const float *)PyArray_DATA(la.W), (const double *)PyArray_DATA(la.H),
                       la.m, la.n, la.group_size, la.bits, la.symmetric, la.rule);
    if (st == DQ_OK) {
        st = dq_float_step(&L, (const int8_t *)PyArray_DATA(A), (float *)PyArray_DATA(S),
                           (float *)PyArray_DATA(Z), (double *)PyArray_DATA(E));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "float_step");
        goto fail;
    }
    result = Py_BuildValue("(OOO)", S, Z, E);
fail:
    dq_py_layer_args_release(&la);
    Py_XDECREF(A);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(E);
    return result;
}

static PyObject *py_shrink_search(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"W", "H00", "bits", "group_size", "symmetric", "rule", NULL};
    PyObject *oW, *oH;
    long group_size;
    int bits, symmetric;
    const char *rule = "half_up";
    dq_py_layer_args_t la;
    PyArrayObject *S = NULL, *Z = NULL, *P = NULL, *E = NULL;
    PyObject *result = NULL;
    dq_status st = DQ_OK;
    memset(&la, 0, sizeof(la));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOilp|s:shrink_search", kwlist, &oW, &oH,
                                     &bits, &group_size, &symmetric, &rule))
        return NULL;
    if (dq_py_layer_args(oW, oH, group_size, bits, symmetric, rule, &la) < 0) goto fail;
    npy_intp dims[2] = {(npy_intp)la.m, (npy_intp)dq_num_groups(la.n, la.group_size)};
    if (!(S = dq_py_zeros(2, dims, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, dims, NPY_FLOAT32)) ||
        !(P = dq_py_zeros(1, dims, NPY_FLOAT32)) || !(E = dq_py_zeros(1, dims, NPY_FLOAT64)))
        goto fail;

    Py_BEGIN_ALLOW_THREADS
    dq_layer_t L;
    st = dq_layer_init(&L, (const float *)PyArray_DATA(la.W), (const double *)PyArray_DATA(la.H),
                       la.m, la.n, la.group_size, la.bits, la.symmetric, la.rule);
    if (st == DQ_OK) {
        /* The starting point every candidate must beat: min-max RTN. */
        double *err0 = dq_malloc(sizeof(double) * (size_t)la.m);
        int8_t *A0 = dq_malloc((size_t)(la.m * la.n));
        float *S0 = (float *)PyArray_DATA(S), *Z0 = (float *)PyArray_DATA(Z);
        if (!err0 || !A0) {
            st = DQ_ENOMEM;
        } else {
            dq_minmax_params(&L, NULL, S0, Z0);
            dq_rtn_codes(&L, S0, Z0, A0);
            st = dq_row_errors(&L, A0, S0, Z0, err0);
        }
        if (st == DQ_OK)
            st = dq_shrink_search(&L, err0, S0, Z0, (float *)PyArray_DATA(P),
                                  (double *)PyArray_DATA(E));
        dq_free(err0);
        dq_free(A0);
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "shrink_search");
        goto fail;
    }
    result = Py_BuildValue("(OOOO)", S, Z, P, E);
fail:
    dq_py_layer_args_release(&la);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(P);
    Py_XDECREF(E);
    return result;
}

PyMethodDef dq_py_float_step_methods[] = {
    {"float_step", (PyCFunction)(void (*)(void))py_float_step, METH_VARARGS | METH_KEYWORDS,
     "float_step(W, A, H00, group_size, symmetric) -> (S, Z, err)\n\n"
     "Closed-form least-squares scales and zeros for fixed codes (ALGORITHM 3.6).\n"
     "W float32 (m, n), A int8 (m, n), H00 float64 (n, n) damped Hessian;\n"
     "returns S, Z float32 (m, G) and err float64 (m,), the per-row H00 error."},
    {"shrink_search", (PyCFunction)(void (*)(void))py_shrink_search, METH_VARARGS | METH_KEYWORDS,
     "shrink_search(W, H00, bits, group_size, symmetric, rule='half_up') -> (S, Z, p_row, err)\n\n"
     "Per-row shrink of the min-max range (ALGORITHM 3.3): the best RTN (S, Z) over\n"
     "p = float32(1 - i/200), i = 1..159, kept only where strictly better than min-max.\n"
     "S, Z float32 (m, G), p_row float32 (m,), err float64 (m,)."},
    {NULL, NULL, 0, NULL},
};
