/* Boundary helpers: array checks and dq_status -> Python exceptions. */
#include "py_common.h"
#include "dq_checks.h"

#include <float.h>
#include <stdio.h>
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

/* ---- interrupts ------------------------------------------------------- */

/* Ident of the interpreter's main thread: the only one that runs Python
 * signal handlers, so the only one whose polls can see Ctrl-C. */
static unsigned long main_thread_ident = 0;
/* The exception a signal handler raised during a core call (owned; only
 * touched with the GIL held), re-raised once the call has unwound. */
static PyObject *stashed_type = NULL, *stashed_value = NULL, *stashed_tb = NULL;

/* Called by dq_interrupted() in the thread running a core call, with the GIL
 * released.  Takes the GIL for the few microseconds PyErr_CheckSignals
 * needs; a handler that raises (KeyboardInterrupt by default) stops the
 * core call, a handler that returns lets it go on. */
static int interrupt_hook(void)
{
    if (PyThread_get_thread_ident() != main_thread_ident) return 0;
    PyGILState_STATE g = PyGILState_Ensure();
    int stop = 0;
    if (PyErr_CheckSignals() < 0) {
        Py_CLEAR(stashed_type);
        Py_CLEAR(stashed_value);
        Py_CLEAR(stashed_tb);
        PyErr_Fetch(&stashed_type, &stashed_value, &stashed_tb);
        stop = 1;
    }
    PyGILState_Release(g);
    return stop;
}

int dq_py_install_interrupt_hook(void)
{
    PyObject *threading = PyImport_ImportModule("threading");
    if (!threading) return -1;
    PyObject *main = PyObject_CallMethod(threading, "main_thread", NULL);
    Py_DECREF(threading);
    if (!main) return -1;
    PyObject *ident = PyObject_GetAttrString(main, "ident");
    Py_DECREF(main);
    if (!ident) return -1;
    main_thread_ident = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (PyErr_Occurred()) return -1;
    dq_set_interrupt_hook(interrupt_hook);
    return 0;
}

/* Raise what stopped the call: the handler's own exception, else a plain
 * KeyboardInterrupt. */
static void raise_interrupt(void)
{
    dq_interrupt_take();
    if (stashed_type) {
        PyErr_Restore(stashed_type, stashed_value, stashed_tb);
        stashed_type = stashed_value = stashed_tb = NULL;
    } else {
        PyErr_SetNone(PyExc_KeyboardInterrupt);
    }
}

void dq_py_format_double(double x, char *buf, size_t size)
{
    /* PyErr_Format has no %g: numbers are formatted here first. */
    snprintf(buf, size, "%.6g", x);
}

PyObject *dq_py_status_error(dq_status st, const char *what)
{
    if (st == DQ_EINTR) {
        raise_interrupt();
        return NULL;
    }
    /* An interrupt seen by a loop that then failed for another reason is
     * dropped with it: the failure is what the caller needs to know. */
    if (dq_interrupt_take()) {
        Py_CLEAR(stashed_type);
        Py_CLEAR(stashed_value);
        Py_CLEAR(stashed_tb);
    }
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
        PyErr_Format(PyExc_ValueError,
                     "%s: a NaN or Inf appeared in the solution (the inputs are finite, but "
                     "too large for float32 arithmetic; scale W or H00 down)",
                     what);
        break;
    case DQ_ERANGE:
        PyErr_Format(PyExc_OverflowError, "%s: the sizes are too large (a size computation "
                     "overflows 64-bit integers or the address space)", what);
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

/* a, if every element is finite; else NULL, a released, the ValueError naming it. */
static PyArrayObject *finite_or_release(PyArrayObject *a, const char *name)
{
    if (dq_py_check_finite(a, name) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int dq_py_check_bits(int bits, int lo, int hi)
{
    if (bits < lo || bits > hi) {
        PyErr_Format(PyExc_ValueError, "bits must be in %d..%d, got %d", lo, hi, bits);
        return -1;
    }
    return 0;
}

PyArrayObject *dq_py_take_matrix(PyObject *obj, const char *name, int64_t *m, int64_t *n)
{
    PyArrayObject *a = dq_py_take(obj, name, NPY_FLOAT32, 2);
    if (!a) return NULL;
    *m = PyArray_DIM(a, 0);
    *n = PyArray_DIM(a, 1);
    if (*m < 1 || *n < 1) {
        PyErr_Format(PyExc_ValueError, "%s must have at least one row and one column, got shape (%lld, %lld)",
                     name, (long long)*m, (long long)*n);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

int dq_py_resolve_group(long group_size, int64_t n, int equal, int64_t *g)
{
    if (group_size == -1) {
        *g = n;
        return 0;
    }
    if (group_size < 1) {
        PyErr_Format(PyExc_ValueError, "group_size must be -1 (per-channel) or positive, got %ld", group_size);
        return -1;
    }
    if (equal && n % group_size != 0) {
        PyErr_Format(PyExc_ValueError, "group_size %ld does not divide in_features %lld (BCQ layers need equal "
                     "groups)", group_size, (long long)n);
        return -1;
    }
    *g = group_size < n ? group_size : n;
    return 0;
}

PyArrayObject *dq_py_take_vector(PyObject *obj, const char *name, int64_t len, const char *what)
{
    PyArrayObject *a = dq_py_take(obj, name, NPY_FLOAT32, 1);
    if (!a) return NULL;
    if (PyArray_DIM(a, 0) != len) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%lld,) to match W's %s, got (%lld,)", name,
                     (long long)len, what, (long long)PyArray_DIM(a, 0));
        Py_DECREF(a);
        return NULL;
    }
    return finite_or_release(a, name);
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
    if (dq_py_check_bits(bits, 2, 8) < 0) return -1;
    if (dq_py_parse_rule(rule, &out->rule) < 0) return -1;
    out->W = dq_py_take_matrix(W, "W", &out->m, &out->n);
    if (!out->W) goto fail;
    out->H = dq_py_take(H, "H00", NPY_FLOAT64, 2);
    if (!out->H) goto fail;
    if (PyArray_DIM(out->H, 0) != out->n || PyArray_DIM(out->H, 1) != out->n) {
        PyErr_Format(PyExc_ValueError, "H00 must have shape (%lld, %lld) to match W's in_features, got (%lld, %lld)",
                     (long long)out->n, (long long)out->n, (long long)PyArray_DIM(out->H, 0),
                     (long long)PyArray_DIM(out->H, 1));
        goto fail;
    }
    if (dq_py_resolve_group(group_size, out->n, 0, &out->group_size) < 0) goto fail;
    if (dq_py_check_finite(out->W, "W") < 0 || dq_py_check_weight_range(out->W, "W") < 0) goto fail;
    if (dq_py_check_hessian(out->H, "H00", out->W, "W") < 0) goto fail;
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
    return finite_or_release(a, name);
}

int dq_py_check_weight_range(PyArrayObject *W, const char *name)
{
    const float big = dq_absmax_f32((const float *)PyArray_DATA(W), (int64_t)PyArray_SIZE(W));
    /* max - min of a group must stay finite: |w| < FLT_MAX / 2. */
    if (big >= FLT_MAX / 2) {
        char v[32];
        dq_py_format_double(big, v, sizeof v);
        PyErr_Format(PyExc_ValueError,
                     "%s has an entry of magnitude %s: weights must stay below 1.7e38 in "
                     "magnitude (FLT_MAX / 2), or the min-max scale of their group "
                     "overflows float32",
                     name, v);
        return -1;
    }
    return 0;
}

int dq_py_check_hessian(PyArrayObject *H, const char *name, PyArrayObject *W, const char *wname)
{
    if (dq_py_check_finite(H, name) < 0) return -1;
    const int64_t n = PyArray_DIM(H, 0);
    const double *h = (const double *)PyArray_DATA(H);
    char v[32], t[32];
    for (int64_t i = 0; i < n; i++) {
        if (h[i * n + i] < 0.0) {
            dq_py_format_double(h[i * n + i], v, sizeof v);
            PyErr_Format(PyExc_ValueError,
                         "%s is not positive semi-definite: %s[%lld, %lld] = %s < 0", name, name,
                         (long long)i, (long long)i, v);
            return -1;
        }
    }
    double hmax = 0.0;
    for (int64_t i = 0; i < n * n; i++)
        if (fabs(h[i]) > hmax) hmax = fabs(h[i]);
    /* The solver works on a float32 copy of H00. */
    if (hmax > FLT_MAX) {
        dq_py_format_double(hmax, v, sizeof v);
        PyErr_Format(PyExc_ValueError,
                     "%s has an entry of magnitude %s, beyond float32 (3.4e38), in which the "
                     "solver works; scale %s down (the codes do not depend on its scale)",
                     name, v, name);
        return -1;
    }
    int64_t bi, bj;
    if (dq_find_asymmetry(h, n, &bi, &bj)) {
        dq_py_format_double(h[bi * n + bj], v, sizeof v);
        dq_py_format_double(h[bj * n + bi], t, sizeof t);
        PyErr_Format(PyExc_ValueError,
                     "%s must be symmetric: %s[%lld, %lld] = %s but %s[%lld, %lld] = %s "
                     "(beyond a tolerance of 1e-5 * sqrt(%s[i, i] * %s[j, j]))",
                     name, name, (long long)bi, (long long)bj, v, name, (long long)bj,
                     (long long)bi, t, name, name);
        return -1;
    }
    if (W) {
        const double bound = dq_wh_bound((const float *)PyArray_DATA(W), PyArray_DIM(W, 0), n, h);
        if (bound > FLT_MAX) {
            dq_py_format_double(bound, v, sizeof v);
            PyErr_Format(PyExc_ValueError,
                         "%s and %s are too large together: max|%s| * max row sum |%s| = %s "
                         "overflows float32, in which the solver computes %s %s; scale %s down "
                         "(the codes do not depend on its scale)",
                         wname, name, wname, name, v, wname, name, name);
            return -1;
        }
    }
    dq_status st;
    int64_t col = -1;
    Py_BEGIN_ALLOW_THREADS
    st = dq_check_psd(h, n, &col);
    Py_END_ALLOW_THREADS
    if (st == DQ_ENOTPD) {
        PyErr_Format(PyExc_ValueError,
                     "%s is not positive semi-definite: its Cholesky factorisation with a "
                     "shift of 1e-5 * max(diag %s) fails at column %lld",
                     name, name, (long long)col);
        return -1;
    }
    if (st != DQ_OK) {
        dq_py_status_error(st, name);
        return -1;
    }
    return 0;
}
