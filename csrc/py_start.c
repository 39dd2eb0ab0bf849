/* Python boundary of the starting parameters (dq_start.c): start_params. */
#include "py_common.h"
#include "dq_solver.h"

#include <string.h>

int dq_py_parse_init(const char *init, int *out)
{
    static const struct {
        const char *name;
        int value;
    } inits[] = {{"minmax", DQ_INIT_MINMAX},
                 {"shrink", DQ_INIT_SHRINK},
                 {"neuqi", DQ_INIT_NEUQI},
                 {"neuqi_int", DQ_INIT_NEUQI_INT}};
    for (size_t i = 0; i < sizeof(inits) / sizeof(inits[0]); i++) {
        if (strcmp(init, inits[i].name) == 0) {
            *out = inits[i].value;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError,
                 "init must be one of 'minmax', 'shrink', 'neuqi', 'neuqi_int'; got '%s'", init);
    return -1;
}

PyDoc_STRVAR(start_params_doc,
"start_params(W, H00, bits, group_size, symmetric, rule, init) -> (S, Z)\n\n"
"The starting scale and zero of every row and group: init 'minmax' (ALGORITHM 1.2),\n"
"'shrink' (min-max, then each row's best shrunk range by its H00 error, 3.3), 'neuqi'\n"
"or 'neuqi_int' (7, weights diag H00). W float32 (m, n); H00 float64 (n, n), damped.\n"
"Returns S, Z float32 (m, G).");

static PyObject *py_start_params(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"W", "H00", "bits", "group_size", "symmetric", "rule", "init", NULL};
    PyObject *W_obj, *H_obj;
    int bits, symmetric, init;
    long group_size;
    const char *rule, *init_s;
    dq_py_layer_args_t a = {0};
    PyArrayObject *S = NULL, *Z = NULL;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOilpss", kwlist, &W_obj, &H_obj, &bits,
                                     &group_size, &symmetric, &rule, &init_s))
        return NULL;
    if (dq_py_parse_init(init_s, &init) < 0) return NULL;
    if (dq_py_layer_args(W_obj, H_obj, group_size, bits, symmetric, rule, &a) < 0) return NULL;
    npy_intp dims[2] = {a.m, dq_num_groups(a.n, a.group_size)};
    if (!(S = dq_py_zeros(2, dims, NPY_FLOAT32)) || !(Z = dq_py_zeros(2, dims, NPY_FLOAT32)))
        goto fail;
    dq_layer_t L = {0};
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    /* Only the shrink search reads V = W H and c (the full layer set-up). */
    if (init == DQ_INIT_SHRINK)
        st = dq_layer_init(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), a.m, a.n, a.group_size,
                           a.bits, a.symmetric, a.rule);
    else
        st = dq_layer_init_basic(&L, PyArray_DATA(a.W), PyArray_DATA(a.H), a.m, a.n,
                                 a.group_size, a.bits, a.symmetric, a.rule);
    if (st == DQ_OK) st = dq_start_params(&L, init, PyArray_DATA(S), PyArray_DATA(Z));
    dq_layer_free(&L);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "start_params");
        goto fail;
    }
    result = Py_BuildValue("(NN)", S, Z);
    S = Z = NULL;
fail:
    dq_py_layer_args_release(&a);
    Py_XDECREF(S);
    Py_XDECREF(Z);
    return result;
}

PyMethodDef dq_py_start_methods[] = {
    {"start_params", (PyCFunction)(void (*)(void))py_start_params, METH_VARARGS | METH_KEYWORDS,
     start_params_doc},
    {NULL, NULL, 0, NULL},
};
