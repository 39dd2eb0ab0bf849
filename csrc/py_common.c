/* Boundary helpers: array checks and dq_status -> Python exceptions. */
#include "py_common.h"

#include <string.h>

static const char *dtype_name(int typenum)
{
    switch (typenum) {
    case NPY_FLOAT32: return "float32";
    case NPY_FLOAT64: return "float64";
    case NPY_INT8: return "int8";
    case NPY_UINT8: return "uint8";
    case NPY_INT32: return "int32";
    case NPY_INT64: return "int64";
    case NPY_UINT32: return "uint32";
    case NPY_FLOAT16: return "float16";
    case NPY_BOOL: return "bool";
    default: return "another dtype";
    }
}

static PyArrayObject *take(PyObject *obj, const char *argname, int typenum, int ndim, int writeable)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", argname,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", argname, dtype_name(typenum),
                     dtype_name(PyArray_TYPE(a)));
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be in native byte order", argname);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", argname, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", argname);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", argname);
        return NULL;
    }
    Py_INCREF(a);
    return a;
}

PyArrayObject *dq_py_take(PyObject *obj, const char *argname, int typenum, int ndim)
{
    return take(obj, argname, typenum, ndim, 0);
}

PyArrayObject *dq_py_take_out(PyObject *obj, const char *argname, int typenum, int ndim)
{
    return take(obj, argname, typenum, ndim, 1);
}

int dq_py_check_finite(PyArrayObject *a, const char *argname)
{
    npy_intp size = PyArray_SIZE(a);
    int bad = 0;
    if (PyArray_TYPE(a) == NPY_FLOAT32) {
        const float *p = (const float *)PyArray_DATA(a);
        for (npy_intp i = 0; i < size; i++)
            if (!isfinite(p[i])) { bad = 1; break; }
    } else if (PyArray_TYPE(a) == NPY_FLOAT64) {
        const double *p = (const double *)PyArray_DATA(a);
        for (npy_intp i = 0; i < size; i++)
            if (!isfinite(p[i])) { bad = 1; break; }
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf", argname);
        return -1;
    }
    return 0;
}

PyObject *dq_py_status_error(dq_status st, const char *what)
{
    switch (st) {
    case DQ_OK: break;
    case DQ_ENOMEM: PyErr_Format(PyExc_MemoryError, "%s: out of memory", what); break;
    case DQ_EINVAL: PyErr_Format(PyExc_ValueError, "%s: invalid argument", what); break;
    case DQ_ENOTPD:
        PyErr_Format(PyExc_ValueError,
                     "%s: the Hessian is not positive definite even after the largest damping",
                     what);
        break;
    case DQ_ENONFINITE:
        PyErr_Format(PyExc_ValueError, "%s: a NaN or Inf appeared in the solution", what);
        break;
    default: PyErr_Format(PyExc_RuntimeError, "%s: failed with status %d", what, (int)st);
    }
    return NULL;
}

PyArrayObject *dq_py_zeros(int ndim, const npy_intp *dims, int typenum)
{
    return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)dims, typenum, 0);
}

int dq_py_parse_rule(const char *rule, int *out)
{
    if (strcmp(rule, "half_up") == 0) {
        *out = DQ_ROUND_HALF_UP;
        return 0;
    }
    if (strcmp(rule, "half_even") == 0) {
        *out = DQ_ROUND_HALF_EVEN;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "rule must be 'half_up' or 'half_even', got '%s'", rule);
    return -1;
}

void dq_py_layer_args_release(dq_py_layer_args_t *a)
{
    Py_CLEAR(a->W);
    Py_CLEAR(a->H);
}

int dq_py_layer_args(PyObject *W, PyObject *H, long group_size, int bits, int symmetric,
                     const char *rule, dq_py_layer_args_t *out)
{
    memset(out, 0, sizeof(*out));
    if (bits < 2 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits must be in 2..8, got %d", bits);
        return -1;
    }
    if (dq_py_parse_rule(rule, &out->rule) < 0) return -1;
    out->W = dq_py_take(W, "W", NPY_FLOAT32, 2);
    if (!out->W) goto fail;
    out->H = dq_py_take(H, "H00", NPY_FLOAT64, 2);
    if (!out->H) goto fail;
    out->m = PyArray_DIM(out->W, 0);
    out->n = PyArray_DIM(out->W, 1);
    if (out->m < 1 || out->n < 1) {
        PyErr_Format(PyExc_ValueError, "W must have at least one row and one column, got shape (%lld, %lld)",
                     (long long)out->m, (long long)out->n);
        goto fail;
    }
    if (PyArray_DIM(out->H, 0) != out->n || PyArray_DIM(out->H, 1) != out->n) {
        PyErr_Format(PyExc_ValueError, "H00 must have shape (%lld, %lld) to match W's in_features, got (%lld, %lld)",
                     (long long)out->n, (long long)out->n, (long long)PyArray_DIM(out->H, 0),
                     (long long)PyArray_DIM(out->H, 1));
        goto fail;
    }
    if (group_size == -1) {
        out->group_size = out->n;
    } else if (group_size < 1) {
        PyErr_Format(PyExc_ValueError, "group_size must be -1 (per-channel) or positive, got %ld", group_size);
        goto fail;
    } else if (out->n % group_size != 0) {
        PyErr_Format(PyExc_ValueError, "group_size %ld does not divide in_features %lld", group_size,
                     (long long)out->n);
        goto fail;
    } else {
        out->group_size = group_size;
    }
    if (dq_py_check_finite(out->W, "W") < 0 || dq_py_check_finite(out->H, "H00") < 0) goto fail;
    out->bits = bits;
    out->symmetric = symmetric ? 1 : 0;
    return 0;
fail:
    dq_py_layer_args_release(out);
    return -1;
}

PyArrayObject *dq_py_take_params(PyObject *obj, const char *name, int64_t m, int64_t G)
{
    PyArrayObject *a = dq_py_take(obj, name, NPY_FLOAT32, 2);
    if (!a) return NULL;
    if (PyArray_DIM(a, 0) != m || PyArray_DIM(a, 1) != G) {
        PyErr_Format(PyExc_ValueError,
                     "%s must have shape (%lld, %lld) (rows, groups), got (%lld, %lld)", name,
                     (long long)m, (long long)G, (long long)PyArray_DIM(a, 0),
                     (long long)PyArray_DIM(a, 1));
        Py_DECREF(a);
        return NULL;
    }
    if (dq_py_check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}
