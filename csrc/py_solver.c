/* Python boundary of the whole-layer solver: decoupleq(). */
#include "py_common.h"
#include "dq_solver.h"
#include "dq_profile.h"

#include <string.h>

PyDoc_STRVAR(decoupleq_doc,
"decoupleq(W, H00, bits, group_size, symmetric, act_order, rule, iterations, rounding,\n"
"          blocksize=128, steps_before_round=0, steps_per_column=5, lr=1e-3, init='shrink')\n"
"    -> (A, S, Z, err, trace)\n\n"
"Quantize one layer with decoupleQ (ALGORITHM 3.2-3.4). W float32 (m, n); H00\n"
"float64 (n, n), already damped. Returns codes A int8 (m, n), scales S and zeros Z\n"
"float32 (m, G), per-row errors err float64 (m,) measured with H00, and trace\n"
"float64 (k, m): the per-row best error after min-max, after the first GPTQ pass,\n"
"then after each integer and each float step (shorter on early stop).\n"
"rounding='pgd' costs O(steps_per_column * m * n^3 / 3).\n"
"init: the start, 'shrink' (the reference's: min-max, then each row's shrink search\n"
"in iteration 0), 'minmax', 'neuqi' or 'neuqi_int' (ALGORITHM 7; weights diag H00).");

static PyObject *py_decoupleq(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "H00", "bits", "group_size", "symmetric", "act_order", "rule",
                             "iterations", "rounding", "blocksize", "steps_before_round",
                             "steps_per_column", "lr", "init", NULL};
    PyObject *W_obj, *H_obj;
    int bits, symmetric, act_order, iterations;
    long group_size;
    const char *rule, *rounding, *init = "shrink";
    long long blocksize = 128, k1 = 0, k2 = 5;
    double lr = 1e-3;
    dq_py_layer_args_t a = {0};
    dq_layer_t L = {0};
    int layer_ready = 0;
    PyArrayObject *A = NULL, *S = NULL, *Z = NULL, *err = NULL, *trace = NULL;
    PyObject *result = NULL;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOilppsis|LLLds", kwlist, &W_obj, &H_obj, &bits,
                                     &group_size, &symmetric, &act_order, &rule, &iterations,
                                     &rounding, &blocksize, &k1, &k2, &lr, &init))
        return NULL;
    dq_solve_opts_t opts = {0};
    opts.method = DQ_METHOD_DECOUPLEQ;
    if (dq_py_parse_init(init, &opts.init) < 0) return NULL;
    if (strcmp(rounding, "gptq") == 0) {
        opts.rounding = DQ_ROUNDING_GPTQ;
    } else if (strcmp(rounding, "pgd") == 0) {
        opts.rounding = DQ_ROUNDING_PGD;
    } else {
        PyErr_Format(PyExc_ValueError, "rounding must be 'gptq' or 'pgd', got '%s'", rounding);
        return NULL;
    }
    if (iterations < 1) {
        PyErr_Format(PyExc_ValueError, "iterations must be >= 1, got %d", iterations);
        return NULL;
    }
    if (blocksize < 1) {
        PyErr_Format(PyExc_ValueError, "blocksize must be >= 1, got %lld", blocksize);
        return NULL;
    }
    if (k1 < 0 || k2 < 0) {
        PyErr_Format(PyExc_ValueError, "steps_before_round and steps_per_column must be >= 0, got %lld and %lld",
                     k1, k2);
        return NULL;
    }
    if (!(lr > 0.0) || !isfinite(lr)) {
        char v[32];
        dq_py_format_double(lr, v, sizeof v);
        PyErr_Format(PyExc_ValueError, "lr must be a finite number > 0, got %s", v);
        return NULL;
    }
    opts.act_order = act_order;
    opts.iterations = iterations;
    opts.blocksize = blocksize;
    opts.pgd.steps_before_round = k1;
    opts.pgd.steps_per_column = k2;
    opts.pgd.lr = lr;

    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    const int64_t m = a.m, n = a.n, G = dq_num_groups(a.n, a.group_size);
    const int64_t max_trace = 2 + 2 * (int64_t)(iterations - 1);
    npy_intp dims_A[2] = {m, n}, dims_S[2] = {m, G}, dims_e[1] = {m}, dims_t[2] = {max_trace, m};
    A = dq_py_zeros(2, dims_A, NPY_INT8);
    S = dq_py_zeros(2, dims_S, NPY_FLOAT32);
    Z = dq_py_zeros(2, dims_S, NPY_FLOAT32);
    err = dq_py_zeros(1, dims_e, NPY_FLOAT64);
    if (!A || !S || !Z || !err) goto fail;
    /* The trace holds a row of m errors per step, 2 * iterations - 1 of
     * them at most: say so when that is what does not fit. */
    int64_t trace_bytes;
    if (dq_mul_overflow(max_trace, m, &trace_bytes) || dq_mul_overflow(trace_bytes, 8, &trace_bytes) ||
        !(trace = dq_py_zeros(2, dims_t, NPY_FLOAT64))) {
        PyErr_Clear();
        PyErr_Format(PyExc_MemoryError,
                     "iterations %d is too large: the trace of per-row errors "
                     "((2 * iterations - 1) x %lld float64) does not fit in memory",
                     iterations, (long long)m);
        goto fail;
    }

    dq_status st;
    int64_t n_trace = 0;
    Py_BEGIN_ALLOW_THREADS
    const int prof = dq_profile_on();
    double t0 = dq_wall_seconds(), t_all = t0;
    st = dq_layer_init(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), m, n, a.group_size, a.bits,
                       a.symmetric, a.rule);
    dq_profile_lap(prof, &t0, "layer init", -1);
    if (st == DQ_OK) {
        layer_ready = 1;
        st = dq_solve(&L, &opts, PyArray_DATA(A), PyArray_DATA(S), PyArray_DATA(Z),
                      PyArray_DATA(err), PyArray_DATA(trace), max_trace, &n_trace);
    }
    dq_profile_lap(prof, &t_all, "total", -1);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "decoupleq");
        goto fail;
    }
    PyObject *trace_view = PySequence_GetSlice((PyObject *)trace, 0, (Py_ssize_t)n_trace);
    if (!trace_view) goto fail;
    result = Py_BuildValue("(NNNNN)", A, S, Z, err, trace_view);
    A = S = Z = err = NULL;
fail:
    if (layer_ready) dq_layer_free(&L);
    dq_py_layer_args_release(&a);
    Py_XDECREF(A);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(err);
    Py_XDECREF(trace);
    return result;
}

PyMethodDef dq_py_solver_methods[] = {
    {"decoupleq", (PyCFunction)(void (*)(void))py_decoupleq, METH_VARARGS | METH_KEYWORDS, decoupleq_doc},
    {NULL, NULL, 0, NULL},
};
