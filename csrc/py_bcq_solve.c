/* Python boundary of decoupleQ over BCQ levels: bcq_solve. */
#include "py_common.h"
#include "dq_bcq_solve.h"

#include <string.h>

PyDoc_STRVAR(bcq_solve_doc,
"bcq_solve(W, H00, indices, alpha, offset, bits, group_size, iters=4, act_order=True)\n"
"    -> (indices, alpha, offset, err, history)\n\n"
"decoupleQ over BCQ levels (issue 13 item 4): from the BCQ weight\n"
"(indices, alpha, offset), alternate the closed-form least-squares alpha and\n"
"offset per row under H00 (indices fixed) with a GPTQ sweep assigning each\n"
"weight to the nearest level of its group, keeping per row the state of\n"
"lowest (w_hat - w) H00 (w_hat - w)^T.  Schedule: a float step, then `iters`\n"
"times (assignment, float step); act_order: the sweep visits columns by\n"
"decreasing diag H00 (as decoupleQ's integer step), else in natural order.\n"
"W float32 (m, n) finite; H00 float64 (n, n) damped Hessian; bits 2..4;\n"
"group_size -1 or a divisor of n; indices uint8 (m, n) < 2**bits, alpha\n"
"float32 (m, G, bits), offset float32 (m, G), finite (not modified).\n"
"Returns new indices, alpha, offset (the best state), err float64 (m,) its\n"
"per-row objective, history float64 (iters + 2,): the summed best objective\n"
"at the start, after the first float step and after every iteration.");

static PyObject *py_bcq_solve(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "H00", "indices", "alpha", "offset", "bits", "group_size", "iters", "act_order", NULL};
    PyObject *oW, *oH, *oI, *oA, *oO;
    int bits, iters = 4, act_order = 1;
    long group_size;
    dq_py_layer_args_t la;
    PyArrayObject *Ix = NULL, *Al = NULL, *Of = NULL;
    PyArrayObject *Io = NULL, *Ao = NULL, *Oo = NULL, *E = NULL, *Hist = NULL;
    PyObject *result = NULL;
    (void)self;
    memset(&la, 0, sizeof(la));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOil|ip:bcq_solve", kwlist, &oW, &oH, &oI, &oA,
                                     &oO, &bits, &group_size, &iters, &act_order))
        return NULL;
    if (dq_py_check_bits(bits, 2, DQ_BCQ_SOLVE_MAX_BITS) < 0) return NULL;
    if (iters < 0) {
        PyErr_Format(PyExc_ValueError, "iters must be >= 0, got %d", iters);
        return NULL;
    }
    if (dq_py_layer_args(oW, oH, group_size, bits, 0, "half_up", &la) < 0) goto fail;
    /* BCQ layers have equal groups (the uniform solvers accept a shorter last one); a size
     * past n was already made one group per row. */
    int64_t g;
    if (dq_py_resolve_group(la.group_size, la.n, 1, &g) < 0) goto fail;
    const int64_t m = la.m, n = la.n, G = n / g;
    if (!(Ix = dq_py_take(oI, "indices", NPY_UINT8, 2))) goto fail;
    if (PyArray_DIM(Ix, 0) != m || PyArray_DIM(Ix, 1) != n) {
        PyErr_Format(PyExc_ValueError, "indices must have the shape of W (%lld, %lld), got (%lld, %lld)",
                     (long long)m, (long long)n, (long long)PyArray_DIM(Ix, 0), (long long)PyArray_DIM(Ix, 1));
        goto fail;
    }
    {
        const uint8_t *ip = PyArray_DATA(Ix);
        for (int64_t k = 0; k < m * n; k++) {
            if (ip[k] >> bits) {
                PyErr_Format(PyExc_ValueError, "indices[%lld, %lld] = %d is outside [0, %d] for bits=%d",
                             (long long)(k / n), (long long)(k % n), (int)ip[k], (1 << bits) - 1, bits);
                goto fail;
            }
        }
    }
    if (!(Al = dq_py_take(oA, "alpha", NPY_FLOAT32, 3))) goto fail;
    if (PyArray_DIM(Al, 0) != m || PyArray_DIM(Al, 1) != G || PyArray_DIM(Al, 2) != bits) {
        PyErr_Format(PyExc_ValueError, "alpha must have shape (%lld, %lld, %d), got (%lld, %lld, %lld)",
                     (long long)m, (long long)G, bits, (long long)PyArray_DIM(Al, 0),
                     (long long)PyArray_DIM(Al, 1), (long long)PyArray_DIM(Al, 2));
        goto fail;
    }
    if (dq_py_check_finite(Al, "alpha") < 0) goto fail;
    if (!(Of = dq_py_take_params(oO, "offset", m, G))) goto fail;

    npy_intp di[2] = {m, n}, da[3] = {m, G, bits}, d2[2] = {m, G}, dm[1] = {m}, dh[1] = {iters + 2};
    if (!(Io = dq_py_zeros(2, di, NPY_UINT8)) || !(Ao = dq_py_zeros(3, da, NPY_FLOAT32)) ||
        !(Oo = dq_py_zeros(2, d2, NPY_FLOAT32)) || !(E = dq_py_zeros(1, dm, NPY_FLOAT64)) ||
        !(Hist = dq_py_zeros(1, dh, NPY_FLOAT64)))
        goto fail;
    /* The core works in place: the caller's start goes into fresh arrays. */
    memcpy(PyArray_DATA(Io), PyArray_DATA(Ix), (size_t)(m * n));
    memcpy(PyArray_DATA(Ao), PyArray_DATA(Al), sizeof(float) * (size_t)(m * G * bits));
    memcpy(PyArray_DATA(Oo), PyArray_DATA(Of), sizeof(float) * (size_t)(m * G));
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_solve(PyArray_DATA(la.W), PyArray_DATA(la.H), m, n, g, bits, iters, act_order, PyArray_DATA(Io),
                      PyArray_DATA(Ao), PyArray_DATA(Oo), PyArray_DATA(E), PyArray_DATA(Hist));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_solve");
        goto fail;
    }
    result = Py_BuildValue("(NNNNN)", Io, Ao, Oo, E, Hist);
    Io = NULL;
    Ao = NULL;
    Oo = NULL;
    E = NULL;
    Hist = NULL;
fail:
    dq_py_layer_args_release(&la);
    Py_XDECREF(Ix);
    Py_XDECREF(Al);
    Py_XDECREF(Of);
    Py_XDECREF(Io);
    Py_XDECREF(Ao);
    Py_XDECREF(Oo);
    Py_XDECREF(E);
    Py_XDECREF(Hist);
    return result;
}

PyMethodDef dq_py_bcq_solve_methods[] = {
    {"bcq_solve", (PyCFunction)(void (*)(void))py_bcq_solve, METH_VARARGS | METH_KEYWORDS,
     bcq_solve_doc},
    {NULL, NULL, 0, NULL},
};
