/* Python boundary of the Hessian accumulator, damping and the benchmark's
 * bare ssyrk.  The accumulator state lives in a PyCapsule that
 * decoupleq/hessian.py wraps in the HessianAccumulator class. */
#include "py_common.h"
#include "dq_hessian.h"
#include "dq_solver.h"

#define STATE_NAME "decoupleq._C.hessian_state"

typedef struct {
    dq_hess_t h;
    int busy; /* set, with the GIL held, while a call works on h without it */
} state_t;

static void state_destroy(PyObject *capsule)
{
    state_t *s = (state_t *)PyCapsule_GetPointer(capsule, STATE_NAME);
    if (!s) {
        PyErr_Clear();
        return;
    }
    dq_hess_free(&s->h);
    PyMem_RawFree(s);
}

/* The state behind `obj`, marked busy; NULL with an exception set. */
static state_t *acquire(PyObject *obj)
{
    if (!PyCapsule_IsValid(obj, STATE_NAME)) {
        PyErr_Format(PyExc_TypeError, "state must be an accumulator state from hessian_new(), got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    state_t *s = (state_t *)PyCapsule_GetPointer(obj, STATE_NAME);
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this HessianAccumulator is in use by another thread; use one "
                        "accumulator per thread");
        return NULL;
    }
    s->busy = 1;
    return s;
}

static PyObject *py_hessian_new(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"n_features", "skip_nonfinite", "flush_tokens", NULL};
    long long n = 0, flush_tokens = DQ_HESS_FLUSH_TOKENS;
    int skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|pL:hessian_new", kwlist, &n, &skip,
                                     &flush_tokens))
        return NULL;
    if (n < 1 || n > (1LL << 28)) {
        PyErr_Format(PyExc_ValueError, "n_features must be in [1, 2^28], got %lld", n);
        return NULL;
    }
    if (flush_tokens < 1 || flush_tokens > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "flush_tokens must be in [1, %d], got %lld", INT_MAX,
                     flush_tokens);
        return NULL;
    }
    state_t *s = (state_t *)PyMem_RawCalloc(1, sizeof(state_t));
    if (!s) return PyErr_NoMemory();
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_hess_init(&s->h, n, flush_tokens, skip);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_hess_free(&s->h);
        PyMem_RawFree(s);
        return dq_py_status_error(st, "hessian_new");
    }
    PyObject *cap = PyCapsule_New(s, STATE_NAME, state_destroy);
    if (!cap) {
        dq_hess_free(&s->h);
        PyMem_RawFree(s);
    }
    return cap;
}

static PyObject *py_hessian_add(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"state", "X", "weights", "seq_len", NULL};
    PyObject *state_obj, *X_obj, *w_obj = Py_None;
    long long seq_len = 0;
    PyArrayObject *X = NULL, *w = NULL;
    PyObject *ret = NULL;
    state_t *s = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OL:hessian_add", kwlist, &state_obj, &X_obj,
                                     &w_obj, &seq_len))
        return NULL;
    s = acquire(state_obj);
    if (!s) return NULL;
    const int64_t n = s->h.n;
    int typenum = (PyArray_Check(X_obj) && PyArray_TYPE((PyArrayObject *)X_obj) == NPY_FLOAT64)
                      ? NPY_FLOAT64
                      : NPY_FLOAT32;
    X = dq_py_take(X_obj, "X", typenum, 2);
    if (!X) goto fail;
    const int64_t rows = PyArray_DIM(X, 0);
    if (PyArray_DIM(X, 1) != n) {
        PyErr_Format(PyExc_ValueError, "X has %lld features (shape (%lld, %lld)), expected n_features %lld",
                     (long long)PyArray_DIM(X, 1), (long long)rows, (long long)PyArray_DIM(X, 1),
                     (long long)n);
        goto fail;
    }
    if (w_obj != Py_None) {
        w = dq_py_take(w_obj, "weights", NPY_FLOAT64, 1);
        if (!w) goto fail;
        if (PyArray_DIM(w, 0) != rows) {
            PyErr_Format(PyExc_ValueError, "weights has %lld entries, expected one per row of X (%lld)",
                         (long long)PyArray_DIM(w, 0), (long long)rows);
            goto fail;
        }
    }
    const double *wp = w ? (const double *)PyArray_DATA(w) : NULL;
    int64_t bad_row = -1;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    if (typenum == NPY_FLOAT64)
        st = dq_hess_add_f64(&s->h, (const double *)PyArray_DATA(X), rows, wp, &bad_row);
    else
        st = dq_hess_add_f32(&s->h, (const float *)PyArray_DATA(X), rows, wp, &bad_row);
    Py_END_ALLOW_THREADS
    if (st == DQ_ENONFINITE) {
        if (seq_len > 0)
            PyErr_Format(PyExc_ValueError,
                         "X contains NaN or Inf at token [%lld, %lld] (row %lld of the flattened "
                         "tokens); nothing was accumulated (skip_nonfinite=True skips such tokens)",
                         (long long)(bad_row / seq_len), (long long)(bad_row % seq_len),
                         (long long)bad_row);
        else
            PyErr_Format(PyExc_ValueError,
                         "X contains NaN or Inf in row %lld; nothing was accumulated "
                         "(skip_nonfinite=True skips such rows)",
                         (long long)bad_row);
        goto fail;
    }
    if (st == DQ_EINVAL && bad_row >= 0) {
        PyObject *v = PyFloat_FromDouble(wp[bad_row]);
        if (v) {
            PyErr_Format(PyExc_ValueError, "weights must be finite and nonnegative, got weights[%lld] = %R",
                         (long long)bad_row, v);
            Py_DECREF(v);
        }
        goto fail;
    }
    if (st != DQ_OK) {
        dq_py_status_error(st, "hessian_add");
        goto fail;
    }
    ret = Py_None;
    Py_INCREF(ret);
fail:
    if (s) s->busy = 0;
    Py_XDECREF(X);
    Py_XDECREF(w);
    return ret;
}

static PyObject *py_hessian_mean(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"state", NULL};
    PyObject *state_obj;
    PyArrayObject *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:hessian_mean", kwlist, &state_obj))
        return NULL;
    state_t *s = acquire(state_obj);
    if (!s) return NULL;
    if (s->h.n_tokens == 0) {
        PyErr_Format(PyExc_ValueError,
                     "the accumulator holds no tokens (n_tokens = 0, n_skipped = %lld): the mean "
                     "Hessian is undefined; add() some inputs first",
                     (long long)s->h.n_skipped);
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)s->h.n, (npy_intp)s->h.n};
    out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (!out) goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_hess_mean(&s->h, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "hessian_mean");
        Py_CLEAR(out);
    }
fail:
    s->busy = 0;
    return (PyObject *)out;
}

static PyObject *py_hessian_stats(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"state", NULL};
    PyObject *state_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:hessian_stats", kwlist, &state_obj))
        return NULL;
    state_t *s = acquire(state_obj);
    if (!s) return NULL;
    PyObject *r = Py_BuildValue("{s:L,s:L,s:L,s:d,s:L,s:O}", "n_features", (long long)s->h.n,
                                "n_tokens", (long long)s->h.n_tokens, "n_skipped",
                                (long long)s->h.n_skipped, "total_weight", s->h.total_weight,
                                "flush_tokens", (long long)s->h.flush_tokens, "skip_nonfinite",
                                s->h.skip_nonfinite ? Py_True : Py_False);
    s->busy = 0;
    return r;
}

static PyObject *py_damp(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"H", "percdamp", NULL};
    PyObject *H_obj;
    double percdamp;
    PyArrayObject *H = NULL, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Od:damp", kwlist, &H_obj, &percdamp))
        return NULL;
    if (!(percdamp >= 0.0) || !isfinite(percdamp)) {
        PyObject *v = PyFloat_FromDouble(percdamp);
        if (v) {
            PyErr_Format(PyExc_ValueError, "percdamp must be finite and >= 0, got %R", v);
            Py_DECREF(v);
        }
        return NULL;
    }
    H = dq_py_take(H_obj, "H", NPY_FLOAT64, 2);
    if (!H) goto fail;
    const int64_t n = PyArray_DIM(H, 0);
    if (PyArray_DIM(H, 1) != n || n == 0) {
        PyErr_Format(PyExc_ValueError, "H must be a non-empty square matrix, got shape (%lld, %lld)",
                     (long long)n, (long long)PyArray_DIM(H, 1));
        goto fail;
    }
    if (dq_py_check_finite(H, "H") < 0) goto fail;
    const double *h = (const double *)PyArray_DATA(H);
    int any = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = h[i * n + i];
        if (d < 0.0) {
            char v[32];
            dq_py_format_double(d, v, sizeof v);
            PyErr_Format(PyExc_ValueError,
                         "H has a negative diagonal entry H[%lld, %lld] = %s: not a Hessian "
                         "(a mean outer product has a nonnegative diagonal)",
                         (long long)i, (long long)i, v);
            goto fail;
        }
        any |= d != 0.0;
    }
    if (!any && percdamp == 0.0) {
        PyErr_SetString(PyExc_ValueError,
                        "H has an all-zero diagonal and percdamp is 0: the damped matrix would be "
                        "singular (give percdamp > 0)");
        goto fail;
    }
    npy_intp dims[2] = {(npy_intp)n, (npy_intp)n};
    out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (!out) goto fail;
    Py_BEGIN_ALLOW_THREADS
    dq_damp(h, n, percdamp, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
fail:
    Py_XDECREF(H);
    return (PyObject *)out;
}

static PyObject *py_bare_ssyrk(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"X", "C", NULL};
    PyObject *X_obj, *C_obj;
    PyArrayObject *X = NULL, *C = NULL;
    PyObject *ret = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:bare_ssyrk", kwlist, &X_obj, &C_obj))
        return NULL;
    X = dq_py_take(X_obj, "X", NPY_FLOAT32, 2);
    if (!X) goto fail;
    C = dq_py_take_out(C_obj, "C", NPY_FLOAT32, 2);
    if (!C) goto fail;
    const int64_t rows = PyArray_DIM(X, 0), n = PyArray_DIM(X, 1);
    if (PyArray_DIM(C, 0) != n || PyArray_DIM(C, 1) != n) {
        PyErr_Format(PyExc_ValueError, "C must have shape (%lld, %lld) to match X, got (%lld, %lld)",
                     (long long)n, (long long)n, (long long)PyArray_DIM(C, 0),
                     (long long)PyArray_DIM(C, 1));
        goto fail;
    }
    if (rows > INT_MAX || n > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "X is too large for one BLAS call");
        goto fail;
    }
    if (rows > 0 && n > 0) {
        Py_BEGIN_ALLOW_THREADS
        dq_hess_bare_ssyrk((const float *)PyArray_DATA(X), rows, n, (float *)PyArray_DATA(C));
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
fail:
    Py_XDECREF(X);
    Py_XDECREF(C);
    return ret;
}

PyMethodDef dq_py_hessian_methods[] = {
    {"hessian_new", (PyCFunction)(void (*)(void))py_hessian_new, METH_VARARGS | METH_KEYWORDS,
     "hessian_new(n_features, skip_nonfinite=False, flush_tokens=4096) -> state\n\n"
     "Empty streaming accumulator of sum_t w_t x_t x_t^T over n_features inputs (use\n"
     "decoupleq.HessianAccumulator rather than this)."},
    {"hessian_add", (PyCFunction)(void (*)(void))py_hessian_add, METH_VARARGS | METH_KEYWORDS,
     "hessian_add(state, X, weights=None, seq_len=0)\n\n"
     "Add the rows of X (float32 or float64 (T, n_features), C-contiguous) with optional\n"
     "float64 (T,) nonnegative weights (0 excludes a row).  All or nothing: raises\n"
     "ValueError naming the row on a non-finite row (unless the state skips them) or a bad\n"
     "weight.  seq_len > 0 only changes the message to [batch, position] form."},
    {"hessian_mean", (PyCFunction)(void (*)(void))py_hessian_mean, METH_VARARGS | METH_KEYWORDS,
     "hessian_mean(state) -> float64 (n, n): sum_t w_t x_t x_t^T / sum_t w_t, full symmetric,\n"
     "a new array.  ValueError if no token was accumulated."},
    {"hessian_stats", (PyCFunction)(void (*)(void))py_hessian_stats, METH_VARARGS | METH_KEYWORDS,
     "hessian_stats(state) -> dict(n_features, n_tokens, n_skipped, total_weight,\n"
     "flush_tokens, skip_nonfinite)."},
    {"damp", (PyCFunction)(void (*)(void))py_damp, METH_VARARGS | METH_KEYWORDS,
     "damp(H, percdamp) -> H00\n\n"
     "H: float64 (n, n) C-contiguous, finite, nonnegative diagonal.  Returns the new array\n"
     "H + percdamp * mean(diag H) * I (dead columns with H_cc == 0 thus get a positive\n"
     "diagonal); if diag H is all zero, H + percdamp * I, and ValueError if percdamp is\n"
     "also 0.  percdamp must be finite and >= 0."},
    {"bare_ssyrk", (PyCFunction)(void (*)(void))py_bare_ssyrk, METH_VARARGS | METH_KEYWORDS,
     "bare_ssyrk(X, C): C (float32 (n, n), upper triangle) += X^T X for float32 (T, n) X;\n"
     "one plain OpenBLAS ssyrk call, the baseline of benchmarks/bench_hessian.py."},
    {NULL, NULL, 0, NULL},
};
