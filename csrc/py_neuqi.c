/* Python boundary of the NeUQI initialisation (dq_neuqi.c). */
#include "py_common.h"
#include "dq_solver.h"

PyDoc_STRVAR(neuqi_params_doc,
"neuqi_params(W, bits, group_size, symmetric, hdiag=None, integer_zero=False) -> (S, Z, obj)\n\n"
"NeUQI's scale and zero of every row and group (ALGORITHM 7). W float32 (m, n), finite;\n"
"group_size -1 (per-channel) or a divisor of n; hdiag float64 (n,), finite and >= 0:\n"
"per-column weights (the damped Hessian diagonal), None for equal weights; each group's\n"
"weights are normalised to sum 1. integer_zero: NeUQI_int (integer zero point, 2048\n"
"scale steps). symmetric: Z = 0, the scale alone is searched. Returns S, Z float32\n"
"(m, G) in this library's convention (a code q dequantises to S*q + Z) and obj float64\n"
"(m, G), each group's weighted squared error at the chosen float64 (s, z).");

static PyObject *py_neuqi_params(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "bits", "group_size", "symmetric", "hdiag", "integer_zero", NULL};
    PyObject *W_obj, *h_obj = Py_None;
    int bits, symmetric, integer_zero = 0;
    long group_size;
    PyArrayObject *W = NULL, *Hd = NULL, *S = NULL, *Z = NULL, *obj = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oilp|Op", kwlist, &W_obj, &bits, &group_size,
                                     &symmetric, &h_obj, &integer_zero))
        return NULL;
    if (bits < 2 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits must be in 2..8, got %d", bits);
        return NULL;
    }
    if (!(W = dq_py_take(W_obj, "W", NPY_FLOAT32, 2))) goto fail;
    const int64_t m = PyArray_DIM(W, 0), n = PyArray_DIM(W, 1);
    if (m < 1 || n < 1) {
        PyErr_Format(PyExc_ValueError,
                     "W must have at least one row and one column, got shape (%lld, %lld)",
                     (long long)m, (long long)n);
        goto fail;
    }
    if (dq_py_check_finite(W, "W") < 0) goto fail;
    int64_t g = n;
    if (group_size != -1) {
        if (group_size < 1 || n % group_size != 0) {
            PyErr_Format(PyExc_ValueError,
                         "group_size must be -1 (per-channel) or a positive divisor of in_features "
                         "%lld, got %ld",
                         (long long)n, group_size);
            goto fail;
        }
        g = group_size;
    }
    if (h_obj != Py_None) {
        if (!(Hd = dq_py_take(h_obj, "hdiag", NPY_FLOAT64, 1))) goto fail;
        if (PyArray_DIM(Hd, 0) != n) {
            PyErr_Format(PyExc_ValueError,
                         "hdiag must have shape (%lld,) to match W's in_features, got (%lld,)",
                         (long long)n, (long long)PyArray_DIM(Hd, 0));
            goto fail;
        }
        if (dq_py_check_finite(Hd, "hdiag") < 0) goto fail;
        const double *h = PyArray_DATA(Hd);
        for (int64_t c = 0; c < n; c++) {
            if (h[c] < 0.0) {
                PyErr_Format(PyExc_ValueError, "hdiag must be >= 0, got a negative value at index %lld",
                             (long long)c);
                goto fail;
            }
        }
    }
    npy_intp dims[2] = {m, n / g};
    if (!(S = dq_py_zeros(2, dims, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, dims, NPY_FLOAT32)) ||
        !(obj = dq_py_zeros(2, dims, NPY_FLOAT64)))
        goto fail;
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(W), NULL, m, n, g, bits, symmetric, DQ_ROUND_HALF_UP);
    if (st == DQ_OK) {
        st = dq_neuqi_params(&L, Hd ? PyArray_DATA(Hd) : NULL, integer_zero, PyArray_DATA(S),
                             PyArray_DATA(Z), PyArray_DATA(obj));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "neuqi_params");
        goto fail;
    }
    result = Py_BuildValue("(NNN)", S, Z, obj);
    S = Z = obj = NULL;
fail:
    Py_XDECREF(W);
    Py_XDECREF(Hd);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(obj);
    return result;
}

PyMethodDef dq_py_neuqi_methods[] = {
    {"neuqi_params", (PyCFunction)(void (*)(void))py_neuqi_params, METH_VARARGS | METH_KEYWORDS,
     neuqi_params_doc},
    {NULL, NULL, 0, NULL},
};
