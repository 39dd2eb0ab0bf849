/* Python boundary of the init routines: minmax_params, rtn_codes,
 * row_errors, the rtn method and NeUQI's neuqi_params. */
#include "py_common.h"
#include "dq_solver.h"

static int check_bits(int bits) { return dq_py_check_bits(bits, 2, 8); }

/* W float32 (m, n), finite, at least 1 x 1. */
static PyArrayObject *take_W(PyObject *obj, int64_t *m, int64_t *n)
{
    PyArrayObject *W = dq_py_take_matrix(obj, "W", m, n);
    if (!W) return NULL;
    if (*m > INT32_MAX || *n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "W shape (%lld, %lld) is too large (2^31 - 1 at most)",
                     (long long)*m, (long long)*n);
        goto fail;
    }
    if (dq_py_check_finite(W, "W") < 0 || dq_py_check_weight_range(W, "W") < 0) goto fail;
    return W;
fail:
    Py_DECREF(W);
    return NULL;
}

/* The last group is shorter when group_size does not divide n. */
static int resolve_group(long group_size, int64_t n, int64_t *g) { return dq_py_resolve_group(group_size, n, 0, g); }

/* An optional group_size argument: None (0 here: infer it from S) or an int. */
static int parse_opt_group(PyObject *obj, long *out)
{
    *out = 0;
    if (obj == Py_None) return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "group_size must be an int or None, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = PyLong_AsLong(obj);
    if (*out == -1 && PyErr_Occurred()) return -1;
    if (*out == 0) {
        PyErr_SetString(PyExc_ValueError, "group_size must be -1 (per-channel) or positive, got 0");
        return -1;
    }
    return 0;
}

/* S and Z float32 (m, G), finite; *g_out gets the group size.  group_size 0
 * (not given) infers it as n / G, which needs G to divide n: a layer with a
 * short last group has G = ceil(n / g) for several g, so its caller must
 * pass group_size, and then G must be ceil(n / group_size). */
static int take_SZ(PyObject *S_obj, PyObject *Z_obj, int64_t m, int64_t n, long group_size,
                   PyArrayObject **S, PyArrayObject **Z, int64_t *g_out)
{
    *S = dq_py_take(S_obj, "S", NPY_FLOAT32, 2);
    if (!*S) return -1;
    *Z = dq_py_take(Z_obj, "Z", NPY_FLOAT32, 2);
    if (!*Z) return -1;
    const int64_t G = PyArray_DIM(*S, 1);
    int64_t g = 0;
    if (group_size != 0) {
        if (resolve_group(group_size, n, &g) < 0) return -1;
        if (PyArray_DIM(*S, 0) != m || G != dq_num_groups(n, g)) {
            PyErr_Format(PyExc_ValueError,
                         "S must have shape (%lld, %lld) (rows, groups of group_size %ld over "
                         "in_features %lld), got (%lld, %lld)",
                         (long long)m, (long long)dq_num_groups(n, g), group_size, (long long)n,
                         (long long)PyArray_DIM(*S, 0), (long long)G);
            return -1;
        }
    } else {
        if (PyArray_DIM(*S, 0) != m || G < 1 || n % G != 0) {
            PyErr_Format(PyExc_ValueError,
                         "S must have shape (%lld, G) with G groups dividing in_features %lld, got "
                         "(%lld, %lld) (pass group_size for a shorter last group)",
                         (long long)m, (long long)n, (long long)PyArray_DIM(*S, 0), (long long)G);
            return -1;
        }
        g = n / G;
    }
    if (PyArray_DIM(*Z, 0) != m || PyArray_DIM(*Z, 1) != G) {
        PyErr_Format(PyExc_ValueError, "Z must have the shape of S (%lld, %lld), got (%lld, %lld)",
                     (long long)m, (long long)G, (long long)PyArray_DIM(*Z, 0),
                     (long long)PyArray_DIM(*Z, 1));
        return -1;
    }
    if (dq_py_check_finite(*S, "S") < 0 || dq_py_check_finite(*Z, "Z") < 0) return -1;
    *g_out = g;
    return 0;
}

/* ---- minmax_params ------------------------------------------------------ */

PyDoc_STRVAR(minmax_params_doc,
"minmax_params(W, bits, group_size, symmetric, p_row=None) -> (S, Z)\n\n"
"Min-max scale and zero per row and group (ALGORITHM 1.2). W float32 (m, n);\n"
"group_size -1 (per-channel) or positive (a last group that it does not fill is\n"
"shorter); p_row float32 (m,) shrinks each\n"
"row's range to (p*lo, p*hi). Returns S and Z float32 (m, G); Z is 0 when symmetric.");

static PyObject *py_minmax_params(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "bits", "group_size", "symmetric", "p_row", NULL};
    PyObject *W_obj, *p_obj = Py_None;
    int bits, symmetric;
    long group_size;
    PyArrayObject *W = NULL, *P = NULL, *S = NULL, *Z = NULL;
    PyObject *result = NULL;
    int64_t m, n, g;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oilp|O", kwlist, &W_obj, &bits, &group_size,
                                     &symmetric, &p_obj))
        return NULL;
    if (check_bits(bits) < 0) return NULL;
    if (!(W = take_W(W_obj, &m, &n))) goto fail;
    if (resolve_group(group_size, n, &g) < 0) goto fail;
    if (p_obj != Py_None) {
        if (!(P = dq_py_take_vector(p_obj, "p_row", m, "rows"))) goto fail;
        const float *p = PyArray_DATA(P);
        for (int64_t r = 0; r < m; r++) {
            if (!(p[r] > 0.0f && p[r] <= 1.0f)) {
                char v[32];
                dq_py_format_double((double)p[r], v, sizeof v);
                PyErr_Format(PyExc_ValueError, "p_row must lie in (0, 1], got %s at row %lld", v,
                             (long long)r);
                goto fail;
            }
        }
    }
    npy_intp dims[2] = {m, dq_num_groups(n, g)};
    if (!(S = dq_py_zeros(2, dims, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, dims, NPY_FLOAT32))) goto fail;
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(W), NULL, m, n, g, bits, symmetric, DQ_ROUND_HALF_UP);
    if (st == DQ_OK) {
        dq_minmax_params(&L, P ? PyArray_DATA(P) : NULL, PyArray_DATA(S), PyArray_DATA(Z));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "minmax_params");
        goto fail;
    }
    result = Py_BuildValue("(NN)", S, Z);
    S = Z = NULL;
fail:
    Py_XDECREF(W);
    Py_XDECREF(P);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    return result;
}

/* ---- rtn_codes ---------------------------------------------------------- */

PyDoc_STRVAR(rtn_codes_doc,
"rtn_codes(W, S, Z, bits, symmetric, rule, group_size=None) -> A\n\n"
"Round to the grid: A = clamp(R((W - Z)/S), qmin, qmax) per group (symmetric:\n"
"R(W/S)). W float32 (m, n); S, Z float32 (m, G) with G = ceil(n / group_size)\n"
"(group_size None: n / G, G dividing n; pass it when the last group is short); rule 'half_up'\n"
"or 'half_even'. Returns A int8 (m, n) in [-2^(bits-1), 2^(bits-1) - 1].");

static PyObject *py_rtn_codes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "S", "Z", "bits", "symmetric", "rule", "group_size", NULL};
    PyObject *W_obj, *S_obj, *Z_obj, *g_obj = Py_None;
    int bits, symmetric, rule;
    long group_size;
    const char *rule_s;
    PyArrayObject *W = NULL, *S = NULL, *Z = NULL, *A = NULL;
    int64_t m, n, g;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOips|O", kwlist, &W_obj, &S_obj, &Z_obj, &bits,
                                     &symmetric, &rule_s, &g_obj))
        return NULL;
    if (check_bits(bits) < 0 || dq_py_parse_rule(rule_s, &rule) < 0) return NULL;
    if (parse_opt_group(g_obj, &group_size) < 0) return NULL;
    if (!(W = take_W(W_obj, &m, &n))) goto fail;
    if (take_SZ(S_obj, Z_obj, m, n, group_size, &S, &Z, &g) < 0) goto fail;
    npy_intp dims[2] = {m, n};
    if (!(A = dq_py_zeros(2, dims, NPY_INT8))) goto fail;
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(W), NULL, m, n, g, bits, symmetric, rule);
    if (st == DQ_OK) {
        dq_rtn_codes(&L, PyArray_DATA(S), PyArray_DATA(Z), PyArray_DATA(A));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "rtn_codes");
        goto fail;
    }
    Py_DECREF(W);
    Py_DECREF(S);
    Py_DECREF(Z);
    return (PyObject *)A;
fail:
    Py_XDECREF(W);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(A);
    return NULL;
}

/* ---- row_errors --------------------------------------------------------- */

PyDoc_STRVAR(row_errors_doc,
"row_errors(W, A, S, Z, H00, group_size=None) -> err\n\n"
"Per-row error e_r = (w^_r - w_r) H00 (w^_r - w_r)^T of W^ = A*S + Z. W float32\n"
"(m, n); A int8 (m, n); S, Z float32 (m, G) with G = ceil(n / group_size) (None:\n"
"n / G, G dividing n; pass it when the last group is short); H00 float64 (n, n).\n"
"Returns err float64 (m,). One float32 GEMM, row sums in float64.");

static PyObject *py_row_errors(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "A", "S", "Z", "H00", "group_size", NULL};
    PyObject *W_obj, *A_obj, *S_obj, *Z_obj, *H_obj, *g_obj = Py_None;
    PyArrayObject *W = NULL, *A = NULL, *S = NULL, *Z = NULL, *H = NULL, *err = NULL;
    long group_size;
    int64_t m, n, g;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|O", kwlist, &W_obj, &A_obj, &S_obj, &Z_obj,
                                     &H_obj, &g_obj))
        return NULL;
    if (parse_opt_group(g_obj, &group_size) < 0) return NULL;
    if (!(W = take_W(W_obj, &m, &n))) goto fail;
    if (!(A = dq_py_take(A_obj, "A", NPY_INT8, 2))) goto fail;
    if (PyArray_DIM(A, 0) != m || PyArray_DIM(A, 1) != n) {
        PyErr_Format(PyExc_ValueError, "A must have W's shape (%lld, %lld), got (%lld, %lld)",
                     (long long)m, (long long)n, (long long)PyArray_DIM(A, 0),
                     (long long)PyArray_DIM(A, 1));
        goto fail;
    }
    if (take_SZ(S_obj, Z_obj, m, n, group_size, &S, &Z, &g) < 0) goto fail;
    if (!(H = dq_py_take(H_obj, "H00", NPY_FLOAT64, 2))) goto fail;
    if (PyArray_DIM(H, 0) != n || PyArray_DIM(H, 1) != n) {
        PyErr_Format(PyExc_ValueError,
                     "H00 must have shape (%lld, %lld) to match W's in_features, got (%lld, %lld)",
                     (long long)n, (long long)n, (long long)PyArray_DIM(H, 0),
                     (long long)PyArray_DIM(H, 1));
        goto fail;
    }
    if (dq_py_check_hessian(H, "H00", W, "W") < 0) goto fail;
    npy_intp dims[1] = {m};
    if (!(err = dq_py_zeros(1, dims, NPY_FLOAT64))) goto fail;
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    /* bits and rule play no part in the error: any valid value does. */
    st = dq_layer_init_basic(&L, PyArray_DATA(W), PyArray_DATA(H), m, n, g, 8, 0,
                             DQ_ROUND_HALF_UP);
    if (st == DQ_OK) {
        st = dq_row_errors(&L, PyArray_DATA(A), PyArray_DATA(S), PyArray_DATA(Z), PyArray_DATA(err));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "row_errors");
        goto fail;
    }
    Py_DECREF(W);
    Py_DECREF(A);
    Py_DECREF(S);
    Py_DECREF(Z);
    Py_DECREF(H);
    return (PyObject *)err;
fail:
    Py_XDECREF(W);
    Py_XDECREF(A);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(H);
    Py_XDECREF(err);
    return NULL;
}

/* ---- rtn ---------------------------------------------------------------- */

PyDoc_STRVAR(rtn_doc,
"rtn(W, H00, bits, group_size, symmetric, rule) -> (A, S, Z, err)\n\n"
"Min-max round-to-nearest (no shrink). W float32 (m, n); H00 float64 (n, n),\n"
"already damped. Returns A int8 (m, n), S and Z float32 (m, G), err float64 (m,)\n"
"measured with H00.");

static PyObject *py_rtn(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "H00", "bits", "group_size", "symmetric", "rule", NULL};
    PyObject *W_obj, *H_obj;
    int bits, symmetric;
    long group_size;
    const char *rule;
    dq_py_layer_args_t a = {0};
    PyArrayObject *A = NULL, *S = NULL, *Z = NULL, *err = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOilps", kwlist, &W_obj, &H_obj, &bits,
                                     &group_size, &symmetric, &rule))
        return NULL;
    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    const int64_t m = a.m, n = a.n, G = dq_num_groups(a.n, a.group_size);
    npy_intp dims_A[2] = {m, n}, dims_S[2] = {m, G}, dims_e[1] = {m};
    if (!(A = dq_py_zeros(2, dims_A, NPY_INT8)) || !(S = dq_py_zeros(2, dims_S, NPY_FLOAT32)) ||
        !(Z = dq_py_zeros(2, dims_S, NPY_FLOAT32)) || !(err = dq_py_zeros(1, dims_e, NPY_FLOAT64)))
        goto fail;
    dq_layer_t L;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), m, n, a.group_size, a.bits,
                             a.symmetric, a.rule);
    if (st == DQ_OK) {
        dq_minmax_params(&L, NULL, PyArray_DATA(S), PyArray_DATA(Z));
        dq_rtn_codes(&L, PyArray_DATA(S), PyArray_DATA(Z), PyArray_DATA(A));
        st = dq_row_errors(&L, PyArray_DATA(A), PyArray_DATA(S), PyArray_DATA(Z), PyArray_DATA(err));
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "rtn");
        goto fail;
    }
    result = Py_BuildValue("(NNNN)", A, S, Z, err);
    A = S = Z = err = NULL;
fail:
    dq_py_layer_args_release(&a);
    Py_XDECREF(A);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(err);
    return result;
}

/* ---- neuqi_params (dq_neuqi.c) ------------------------------------------ */

PyDoc_STRVAR(neuqi_params_doc,
"neuqi_params(W, bits, group_size, symmetric, hdiag=None, integer_zero=False) -> (S, Z, obj)\n\n"
"NeUQI's scale and zero of every row and group (ALGORITHM 7). W float32 (m, n), finite;\n"
"group_size -1 (per-channel) or positive (a shorter last group); hdiag float64 (n,), finite and >= 0:\n"
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
    int64_t m, n, g;
    if (check_bits(bits) < 0) return NULL;
    if (!(W = take_W(W_obj, &m, &n))) goto fail;
    if (resolve_group(group_size, n, &g) < 0) goto fail;
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
    npy_intp dims[2] = {m, dq_num_groups(n, g)};
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

PyMethodDef dq_py_init_methods[] = {
    {"minmax_params", (PyCFunction)(void (*)(void))py_minmax_params, METH_VARARGS | METH_KEYWORDS,
     minmax_params_doc},
    {"rtn_codes", (PyCFunction)(void (*)(void))py_rtn_codes, METH_VARARGS | METH_KEYWORDS,
     rtn_codes_doc},
    {"row_errors", (PyCFunction)(void (*)(void))py_row_errors, METH_VARARGS | METH_KEYWORDS,
     row_errors_doc},
    {"rtn", (PyCFunction)(void (*)(void))py_rtn, METH_VARARGS | METH_KEYWORDS, rtn_doc},
    {"neuqi_params", (PyCFunction)(void (*)(void))py_neuqi_params, METH_VARARGS | METH_KEYWORDS,
     neuqi_params_doc},
    {NULL, NULL, 0, NULL},
};
