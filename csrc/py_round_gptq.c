/* Python boundary of the GPTQ routines: round_gptq (decoupleQ's integer
 * step) and gptq (the reference GPTQ baseline). */
#include "py_common.h"
#include "dq_solver.h"

static int check_blocksize(long long blocksize)
{
    if (blocksize < 1) {
        PyErr_Format(PyExc_ValueError, "blocksize must be >= 1, got %lld", blocksize);
        return -1;
    }
    return 0;
}

/* ---- round_gptq --------------------------------------------------------- */

PyDoc_STRVAR(round_gptq_doc,
"round_gptq(W, S, Z, H00, bits, group_size, symmetric, act_order, rule, blocksize=128,\n"
"           baseline_damping=False) -> (A, err)\n\n"
"decoupleQ's GPTQ integer step (ALGORITHM 2.2): every element keeps its group's fixed\n"
"(S, Z) (through the act-order permutation, each column keeps its natural group);\n"
"the column sweep starts from W and factors H00 + t*mean(diag H00)*I with t the first\n"
"of 0.01, 0.1, 1, 10, 100 that succeeds. W float32 (m, n); S, Z float32 (m, G);\n"
"H00 float64 (n, n), damped. Returns A int8 (m, n) and err float64 (m,) measured\n"
"with H00. Cost: 2n^3/3 (factor, float64) + about m*n^2 (float32 GEMM).\n"
"baseline_damping: factor as the GPTQ baseline does (H00 itself first, then the same\n"
"ladder), for GPTQ with static groups from a given initialisation.");

static PyObject *py_round_gptq(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "S", "Z", "H00", "bits", "group_size", "symmetric",
                             "act_order", "rule", "blocksize", "baseline_damping", NULL};
    PyObject *W_obj, *S_obj, *Z_obj, *H_obj;
    int bits, symmetric, act_order, baseline_damping = 0;
    long group_size;
    long long blocksize = 128;
    const char *rule;
    dq_py_layer_args_t a = {0};
    PyArrayObject *S = NULL, *Z = NULL, *A = NULL, *err = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOilpps|Lp", kwlist, &W_obj, &S_obj, &Z_obj,
                                     &H_obj, &bits, &group_size, &symmetric, &act_order, &rule,
                                     &blocksize, &baseline_damping))
        return NULL;
    if (check_blocksize(blocksize) < 0) return NULL;
    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    const int64_t m = a.m, n = a.n, G = dq_num_groups(a.n, a.group_size);
    if (!(S = dq_py_take_params(S_obj, "S", m, G)) || !(Z = dq_py_take_params(Z_obj, "Z", m, G))) goto fail;
    npy_intp dims_A[2] = {m, n}, dims_e[1] = {m};
    if (!(A = dq_py_zeros(2, dims_A, NPY_INT8)) || !(err = dq_py_zeros(1, dims_e, NPY_FLOAT64)))
        goto fail;
    dq_layer_t L;
    dq_gptq_factor_t F;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), m, n, a.group_size, a.bits,
                             a.symmetric, a.rule);
    if (st == DQ_OK) {
        st = dq_gptq_factor(&L, act_order, !baseline_damping, &F);
        if (st == DQ_OK) {
            st = dq_round_gptq(&L, &F, PyArray_DATA(S), PyArray_DATA(Z), (int64_t)blocksize,
                               PyArray_DATA(A), PyArray_DATA(err));
            dq_gptq_factor_free(&F);
        }
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "round_gptq");
        goto fail;
    }
    result = Py_BuildValue("(NN)", A, err);
    A = err = NULL;
fail:
    dq_py_layer_args_release(&a);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    Py_XDECREF(A);
    Py_XDECREF(err);
    return result;
}

/* ---- gptq --------------------------------------------------------------- */

PyDoc_STRVAR(gptq_doc,
"gptq(W, H00, bits, group_size, symmetric, act_order, rule, blocksize=128)\n"
"    -> (A, S, Z, err)\n\n"
"Reference GPTQ (ALGORITHM 2.1) as a baseline: min-max parameters on the unsigned\n"
"grid with an integer zero, found from the updated weights at each group start\n"
"(from the original W's natural groups when act_order and grouping are both on);\n"
"H00 itself is factored, with t = 0, 0.01, 0.1, 1, 10, 100 times mean(diag H00)\n"
"added on failure. W float32 (m, n); H00 float64 (n, n). Returns signed codes A int8\n"
"(m, n), S and Z float32 (m, G) with W^ = A*S + Z (z = -s*(qmin + zeta)), and err\n"
"float64 (m,) measured with H00.");

static PyObject *py_gptq(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "H00", "bits", "group_size", "symmetric", "act_order",
                             "rule", "blocksize", NULL};
    PyObject *W_obj, *H_obj;
    int bits, symmetric, act_order;
    long group_size;
    long long blocksize = 128;
    const char *rule;
    dq_py_layer_args_t a = {0};
    PyArrayObject *A = NULL, *S = NULL, *Z = NULL, *err = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOilpps|L", kwlist, &W_obj, &H_obj, &bits,
                                     &group_size, &symmetric, &act_order, &rule, &blocksize))
        return NULL;
    if (check_blocksize(blocksize) < 0) return NULL;
    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    const int64_t m = a.m, n = a.n, G = dq_num_groups(a.n, a.group_size);
    npy_intp dims_A[2] = {m, n}, dims_S[2] = {m, G}, dims_e[1] = {m};
    if (!(A = dq_py_zeros(2, dims_A, NPY_INT8)) || !(S = dq_py_zeros(2, dims_S, NPY_FLOAT32)) ||
        !(Z = dq_py_zeros(2, dims_S, NPY_FLOAT32)) || !(err = dq_py_zeros(1, dims_e, NPY_FLOAT64)))
        goto fail;
    dq_layer_t L;
    dq_gptq_factor_t F;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_layer_init_basic(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), m, n, a.group_size, a.bits,
                             a.symmetric, a.rule);
    if (st == DQ_OK) {
        st = dq_gptq_factor(&L, act_order, 0, &F);
        if (st == DQ_OK) {
            st = dq_gptq_baseline(&L, &F, (int64_t)blocksize, PyArray_DATA(A), PyArray_DATA(S),
                                  PyArray_DATA(Z), PyArray_DATA(err));
            dq_gptq_factor_free(&F);
        }
        dq_layer_free(&L);
    }
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "gptq");
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

PyMethodDef dq_py_round_gptq_methods[] = {
    {"round_gptq", (PyCFunction)(void (*)(void))py_round_gptq, METH_VARARGS | METH_KEYWORDS,
     round_gptq_doc},
    {"gptq", (PyCFunction)(void (*)(void))py_gptq, METH_VARARGS | METH_KEYWORDS, gptq_doc},
    {NULL, NULL, 0, NULL},
};
