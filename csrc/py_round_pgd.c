/* Python boundary of the PGD integer step (round_pgd). */
#include "py_common.h"
#include "dq_solver.h"

#include <string.h>

typedef struct {
    double d;
    int64_t i;
} diag_key;

/* Descending diagonal, ties by ascending index: a stable descending argsort. */
static int cmp_diag_desc(const void *a, const void *b)
{
    const diag_key *x = (const diag_key *)a, *y = (const diag_key *)b;
    if (x->d > y->d) return -1;
    if (x->d < y->d) return 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* act-order: columns by decreasing diag H00 (ALGORITHM 3.7). */
static dq_status act_order_perm(const double *H, int64_t n, int64_t *perm)
{
    diag_key *k = dq_malloc((size_t)n * sizeof(diag_key));
    if (!k) return DQ_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        k[i].d = H[i * n + i];
        k[i].i = i;
    }
    qsort(k, (size_t)n, sizeof(diag_key), cmp_diag_desc);
    for (int64_t i = 0; i < n; i++) perm[i] = k[i].i;
    dq_free(k);
    return DQ_OK;
}

static int parse_rule(const char *rule, int *out)
{
    if (strcmp(rule, "half_up") == 0) *out = DQ_ROUND_HALF_UP;
    else if (strcmp(rule, "half_even") == 0) *out = DQ_ROUND_HALF_EVEN;
    else {
        PyErr_Format(PyExc_ValueError, "rule must be 'half_up' or 'half_even', got '%s'", rule);
        return -1;
    }
    return 0;
}

static int all_zero_f32(PyArrayObject *a)
{
    const float *p = (const float *)PyArray_DATA(a);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++)
        if (p[i] != 0.0f) return 0;
    return 1;
}

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
"n / group_size (Z all zero when symmetric); H00: float64 (n, n), damped;\n"
"bits: 2..8; rule: 'half_up' or 'half_even'; steps_before_round,\n"
"steps_per_column: >= 0; lr: > 0.  Returns A int8 (m, n) in [-2^(b-1),\n"
"2^(b-1) - 1] and err float64 (m,), the row errors of A measured with H00.\n"
"Deterministic for a given thread count; releases the GIL.");

static PyObject *py_round_pgd(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"W", "S", "Z", "H00", "bits", "group_size", "symmetric",
                             "act_order", "rule", "steps_before_round", "steps_per_column",
                             "lr", NULL};
    PyObject *oW, *oS, *oZ, *oH;
    int bits, symmetric, act_order;
    long long group_size, k1, k2;
    const char *rule_s;
    double lr;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOiLppsLLd:round_pgd", kwlist, &oW, &oS,
                                     &oZ, &oH, &bits, &group_size, &symmetric, &act_order,
                                     &rule_s, &k1, &k2, &lr))
        return NULL;

    PyArrayObject *W = NULL, *S = NULL, *Z = NULL, *H = NULL, *A = NULL, *E = NULL;
    int64_t *perm = NULL;
    dq_layer_t L;
    int have_layer = 0, rule;
    dq_status st = DQ_OK;

    if (parse_rule(rule_s, &rule) < 0) goto fail;
    if (bits < 2 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits must be in 2..8, got %d", bits);
        goto fail;
    }
    if (k1 < 0) {
        PyErr_Format(PyExc_ValueError, "steps_before_round must be >= 0, got %lld", k1);
        goto fail;
    }
    if (k2 < 0) {
        PyErr_Format(PyExc_ValueError, "steps_per_column must be >= 0, got %lld", k2);
        goto fail;
    }
    if (!(lr > 0.0) || !isfinite(lr)) {
        PyObject *o = PyFloat_FromDouble(lr);
        if (o) PyErr_Format(PyExc_ValueError, "lr must be a finite number > 0, got %R", o);
        Py_XDECREF(o);
        goto fail;
    }
    if (!(W = dq_py_take(oW, "W", NPY_FLOAT32, 2))) goto fail;
    if (!(S = dq_py_take(oS, "S", NPY_FLOAT32, 2))) goto fail;
    if (!(Z = dq_py_take(oZ, "Z", NPY_FLOAT32, 2))) goto fail;
    if (!(H = dq_py_take(oH, "H00", NPY_FLOAT64, 2))) goto fail;

    const npy_intp m = PyArray_DIM(W, 0), n = PyArray_DIM(W, 1);
    if (n < 1) {
        PyErr_Format(PyExc_ValueError, "W must have at least one column, got shape (%zd, %zd)",
                     (Py_ssize_t)m, (Py_ssize_t)n);
        goto fail;
    }
    if (m > INT32_MAX || n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "W shape (%zd, %zd) is too large for 32-bit BLAS",
                     (Py_ssize_t)m, (Py_ssize_t)n);
        goto fail;
    }
    if (PyArray_DIM(H, 0) != n || PyArray_DIM(H, 1) != n) {
        PyErr_Format(PyExc_ValueError, "H00 must have shape (%zd, %zd) to match W, got (%zd, %zd)",
                     (Py_ssize_t)n, (Py_ssize_t)n, (Py_ssize_t)PyArray_DIM(H, 0),
                     (Py_ssize_t)PyArray_DIM(H, 1));
        goto fail;
    }
    if (group_size != -1 && (group_size < 1 || n % group_size != 0)) {
        PyErr_Format(PyExc_ValueError,
                     "group_size %lld does not divide in_features %zd (use -1 for per-channel)",
                     group_size, (Py_ssize_t)n);
        goto fail;
    }
    const npy_intp G = group_size == -1 ? 1 : n / group_size;
    if (PyArray_DIM(S, 0) != m || PyArray_DIM(S, 1) != G) {
        PyErr_Format(PyExc_ValueError, "S must have shape (%zd, %zd), got (%zd, %zd)",
                     (Py_ssize_t)m, (Py_ssize_t)G, (Py_ssize_t)PyArray_DIM(S, 0),
                     (Py_ssize_t)PyArray_DIM(S, 1));
        goto fail;
    }
    if (PyArray_DIM(Z, 0) != m || PyArray_DIM(Z, 1) != G) {
        PyErr_Format(PyExc_ValueError, "Z must have shape (%zd, %zd), got (%zd, %zd)",
                     (Py_ssize_t)m, (Py_ssize_t)G, (Py_ssize_t)PyArray_DIM(Z, 0),
                     (Py_ssize_t)PyArray_DIM(Z, 1));
        goto fail;
    }
    if (dq_py_check_finite(W, "W") < 0 || dq_py_check_finite(S, "S") < 0 ||
        dq_py_check_finite(Z, "Z") < 0 || dq_py_check_finite(H, "H00") < 0)
        goto fail;
    if (symmetric && !all_zero_f32(Z)) {
        PyErr_SetString(PyExc_ValueError, "Z must be all zero when symmetric is true");
        goto fail;
    }

    npy_intp dA[2] = {m, n}, dE[1] = {m};
    if (!(A = dq_py_zeros(2, dA, NPY_INT8)) || !(E = dq_py_zeros(1, dE, NPY_FLOAT64))) goto fail;
    if (act_order && !(perm = dq_malloc((size_t)n * sizeof(int64_t)))) {
        PyErr_NoMemory();
        goto fail;
    }

    const dq_pgd_opts_t opts = {.steps_before_round = k1, .steps_per_column = k2, .lr = lr};
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init(&L, (const float *)PyArray_DATA(W), (const double *)PyArray_DATA(H), m, n,
                       group_size == -1 ? n : group_size, bits, symmetric, rule);
    if (st == DQ_OK) {
        have_layer = 1;
        if (perm) st = act_order_perm((const double *)PyArray_DATA(H), n, perm);
    }
    if (st == DQ_OK)
        st = dq_round_pgd(&L, perm, (const float *)PyArray_DATA(S), (const float *)PyArray_DATA(Z),
                          &opts, (int8_t *)PyArray_DATA(A), (double *)PyArray_DATA(E));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "round_pgd");
        goto fail;
    }
    if (have_layer) dq_layer_free(&L);
    dq_free(perm);
    Py_DECREF(W);
    Py_DECREF(S);
    Py_DECREF(Z);
    Py_DECREF(H);
    return Py_BuildValue("(NN)", A, E);

fail:
    if (have_layer) dq_layer_free(&L);
    dq_free(perm);
    Py_XDECREF(W);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(H);
    Py_XDECREF(A);
    Py_XDECREF(E);
    return NULL;
}

PyMethodDef dq_py_round_pgd_methods[] = {
    {"round_pgd", (PyCFunction)(void (*)(void))py_round_pgd, METH_VARARGS | METH_KEYWORDS,
     round_pgd_doc},
    {NULL, NULL, 0, NULL},
};
