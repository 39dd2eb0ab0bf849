/* Python boundary of the PGD integer step (round_pgd). */
#include "py_common.h"
#include "dq_solver.h"

PyDoc_STRVAR(round_pgd_doc,
"round_pgd(W, S, Z, H00, bits, group_size, symmetric, act_order, rule,\n"
"          steps_before_round, steps_per_column, lr) -> (A, err)\n"
"\n"
"decoupleQ's projected-gradient integer step (round_fn='train', ALGORITHM 3.5)\n"
"for fixed scales and zeros.  V starts at W and lives in the box [L, U] of the\n"
"grid.  Phase A: steps_before_round (K1) projected Adam steps on\n"
"sum_r (v_r - w_r) H00 (v_r - w_r)^T with learning rate lr (eps 1e-5).\n"
"Phase B: for every column but the last (in act-order if act_order), snap it\n"
"to the grid, then steps_per_column (K2) projected Adam steps on the columns\n"
"not yet snapped (lr 1e-3, eps 1e-4, moments and step count carried over).\n"
"Finally every column is snapped; A = clamp(R((Q - Z) / S)).\n"
"\n"
"Cost: O(K1 m n^2 + K2 m n^3 / 3) multiply-adds (the gradient of the\n"
"remaining columns is kept up to date incrementally, ALGORITHM 6.6), plus\n"
"O(m n) memory of eight float32 m x n work arrays.  PGD is meant for small\n"
"layers: n = 4096 with K2 = 5 is about 1e11 m multiply-adds.\n"
"\n"
"W: float32 (m, n); S, Z: float32 (m, G) with G = 1 (group_size -1) or\n"
"ceil(n / group_size) (Z is ignored when symmetric); H00: float64 (n, n), damped;\n"
"bits: 2..8; rule: 'half_up' or 'half_even'; steps_before_round,\n"
"steps_per_column: >= 0; lr: > 0.  Returns A int8 (m, n) in [-2^(b-1),\n"
"2^(b-1) - 1] and err float64 (m,), the row errors of A measured with H00.\n"
"Deterministic for a given thread count; releases the GIL.");

static PyObject *py_round_pgd(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "S", "Z", "H00", "bits", "group_size", "symmetric",
                             "act_order", "rule", "steps_before_round", "steps_per_column",
                             "lr", NULL};
    PyObject *W_obj, *S_obj, *Z_obj, *H_obj;
    int bits, symmetric, act_order;
    long group_size;
    long long k1, k2;
    const char *rule;
    double lr;
    dq_py_layer_args_t a = {0};
    PyArrayObject *S = NULL, *Z = NULL, *A = NULL, *err = NULL;
    int64_t *perm = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOilppsLLd:round_pgd", kwlist, &W_obj,
                                     &S_obj, &Z_obj, &H_obj, &bits, &group_size, &symmetric,
                                     &act_order, &rule, &k1, &k2, &lr))
        return NULL;
    if (k1 < 0) {
        PyErr_Format(PyExc_ValueError, "steps_before_round must be >= 0, got %lld", k1);
        return NULL;
    }
    if (k2 < 0) {
        PyErr_Format(PyExc_ValueError, "steps_per_column must be >= 0, got %lld", k2);
        return NULL;
    }
    if (!(lr > 0.0) || !isfinite(lr)) {
        PyObject *o = PyFloat_FromDouble(lr);
        if (o) PyErr_Format(PyExc_ValueError, "lr must be finite and > 0, got %R", o);
        Py_XDECREF(o);
        return NULL;
    }
    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    const int64_t m = a.m, n = a.n, G = dq_num_groups(a.n, a.group_size);
    if (!(S = dq_py_take_params(S_obj, "S", m, G)) || !(Z = dq_py_take_params(Z_obj, "Z", m, G))) goto fail;
    npy_intp dims_A[2] = {m, n}, dims_e[1] = {m};
    if (!(A = dq_py_zeros(2, dims_A, NPY_INT8)) || !(err = dq_py_zeros(1, dims_e, NPY_FLOAT64)))
        goto fail;
    if (act_order && !(perm = dq_malloc(sizeof(int64_t) * (size_t)n))) {
        PyErr_NoMemory();
        goto fail;
    }
    const dq_pgd_opts_t opts = {.steps_before_round = k1, .steps_per_column = k2, .lr = lr};
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    /* PGD reads only Hf: V and c of the full layer setup are not needed. */
    st = dq_layer_init_basic(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), m, n, a.group_size, a.bits,
                             a.symmetric, a.rule);
    if (st == DQ_OK) {
        if (perm) st = dq_act_order_perm(PyArray_DATA(a.H), n, perm);
        if (st == DQ_OK)
            st = dq_round_pgd(&L, perm, PyArray_DATA(S), PyArray_DATA(Z), &opts,
                              PyArray_DATA(A), PyArray_DATA(err));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "round_pgd");
        goto fail;
    }
    result = Py_BuildValue("(NN)", A, err);
    A = err = NULL;
fail:
    dq_py_layer_args_release(&a);
    dq_free(perm);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(A);
    Py_XDECREF(err);
    return result;
}

PyMethodDef dq_py_round_pgd_methods[] = {
    {"round_pgd", (PyCFunction)(void (*)(void))py_round_pgd, METH_VARARGS | METH_KEYWORDS,
     round_pgd_doc},
    {NULL, NULL, 0, NULL},
};
