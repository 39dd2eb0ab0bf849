/* Python boundary of UniQuanF's unified initialisation: bcq_init. */
#include "py_common.h"
#include "dq_bcq_init.h"

PyDoc_STRVAR(bcq_init_doc,
"bcq_init(W, bits, group_size, clip_steps=1, iters=15, hdiag=None) -> (S, Z, alpha, delta, idx)\n\n"
"UniQuanF's unified initialisation (ALGORITHM 8) per row and group: min-max\n"
"scale and zero, clipping ratios k/clip_steps (k = 1..clip_steps; 0 means ratio 1\n"
"with the BCQ shift fitted), and a BCQ fit of u = W/S + Z - c with `iters`\n"
"alternating refinements; the candidate with the lowest mean |W - W_hat|^2.4\n"
"is kept. W float32 (m, n), finite; bits 2..8; group_size -1 or a divisor of n;\n"
"hdiag None or float32 (n,), finite and >= 0: column weights (a Hessian's\n"
"diagonal) of every mean, the least-squares fit and the selection error.\n"
"Returns S, Z, delta float32 (m, G), alpha float32 (m, G, bits) sorted\n"
"descending, idx uint8 (m, n): the level index of each weight.");

static PyObject *py_bcq_init(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "bits", "group_size", "clip_steps", "iters", "hdiag", NULL};
    PyObject *W_obj, *d_obj = Py_None;
    int bits, clip_steps = 1, iters = 15;
    long group_size;
    PyArrayObject *W = NULL, *Dg = NULL, *S = NULL, *Z = NULL, *A = NULL, *D = NULL, *Ix = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oil|iiO", kwlist, &W_obj, &bits, &group_size,
                                     &clip_steps, &iters, &d_obj))
        return NULL;
    if (dq_py_check_bits(bits, 2, DQ_BCQ_MAX_BITS) < 0) return NULL;
    if (clip_steps < 0) {
        PyErr_Format(PyExc_ValueError, "clip_steps must be >= 0, got %d", clip_steps);
        return NULL;
    }
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    int64_t m, n, g;
    if (!(W = dq_py_take_matrix(W_obj, "W", &m, &n))) goto fail;
    if (dq_py_resolve_group(group_size, n, 1, &g) < 0) goto fail;
    if (dq_py_check_finite(W, "W") < 0) goto fail;
    if (d_obj != Py_None) {
        if (!(Dg = dq_py_take_vector(d_obj, "hdiag", n, "columns"))) goto fail;
        const float *dp = PyArray_DATA(Dg);
        for (int64_t j = 0; j < n; j++) {
            if (dp[j] < 0.0f) {
                PyErr_Format(PyExc_ValueError, "hdiag must be >= 0, got %g at column %lld", (double)dp[j],
                             (long long)j);
                goto fail;
            }
        }
    }
    npy_intp d2[2] = {m, n / g}, d3[3] = {m, n / g, bits}, di[2] = {m, n};
    if (!(S = dq_py_zeros(2, d2, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, d2, NPY_FLOAT32)) ||
        !(D = dq_py_zeros(2, d2, NPY_FLOAT32)) || !(A = dq_py_zeros(3, d3, NPY_FLOAT32)) ||
        !(Ix = dq_py_zeros(2, di, NPY_UINT8)))
        goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_init(PyArray_DATA(W), Dg ? PyArray_DATA(Dg) : NULL, m, n, g, bits, clip_steps, iters, PyArray_DATA(S),
                     PyArray_DATA(Z), PyArray_DATA(A), PyArray_DATA(D), PyArray_DATA(Ix));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_init");
        goto fail;
    }
    result = Py_BuildValue("(NNNNN)", S, Z, A, D, Ix);
    S = Z = A = D = Ix = NULL;
fail:
    Py_XDECREF(W);
    Py_XDECREF(Dg);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(A);
    Py_XDECREF(D);
    Py_XDECREF(Ix);
    return result;
}

PyMethodDef dq_py_bcq_init_methods[] = {
    {"bcq_init", (PyCFunction)(void (*)(void))py_bcq_init, METH_VARARGS | METH_KEYWORDS,
     bcq_init_doc},
    {NULL, NULL, 0, NULL},
};
