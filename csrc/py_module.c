/* decoupleq._C: module init, the merged method table and backend_info(). */
#define DQ_IMPORTS_ARRAY
#include "py_common.h"
#include "dq_blas.h"
#include "dq_kernels.h"
#include "dq_kernels_bcq.h"

static PyObject *py_backend_info(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    const char *config = dq_openblas_get_config();
    const char *core = dq_openblas_get_corename();
#if defined(DQ_BLAS_PREFIX_SCIPY)
    const char *source = "scipy-openblas32 (vendored)";
#else
    const char *source = "system OpenBLAS";
#endif
    PyObject *v;
#define SET(key, expr)                                              \
    do {                                                            \
        v = (expr);                                                 \
        if (!v || PyDict_SetItemString(d, key, v) < 0) goto fail;   \
        Py_DECREF(v);                                               \
    } while (0)
    SET("blas", PyUnicode_FromString(source));
    SET("blas_config", PyUnicode_FromString(config ? config : "unknown"));
    SET("blas_core", PyUnicode_FromString(core ? core : "unknown"));
    SET("blas_threads", PyLong_FromLong(dq_blas_threads()));
    SET("core_threads", PyLong_FromLong(dq_num_threads()));
    SET("bcq_kernel", PyUnicode_FromString(dq_bcq_kernel_default()->name));
#undef SET
    if (dq_py_kernels_info(d) < 0) goto fail2;
    return d;
fail:
    Py_XDECREF(v);
fail2:
    Py_DECREF(d);
    return NULL;
}

static PyObject *py_set_blas_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "threads must be in [1, 1024], got %ld", n);
        return NULL;
    }
    dq_blas_set_threads((int)n);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"backend_info", py_backend_info, METH_NOARGS,
     "backend_info() -> dict: BLAS library, its configuration and thread counts."},
    {"set_blas_threads", py_set_blas_threads, METH_O,
     "set_blas_threads(n): thread count of the vendored OpenBLAS."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef *all_tables[] = {
    module_methods,          dq_py_hessian_methods,     dq_py_init_methods,
    dq_py_float_step_methods, dq_py_round_gptq_methods, dq_py_round_pgd_methods,
    dq_py_solver_methods,    dq_py_kernels_methods,
    dq_py_start_methods,
    dq_py_bcq_kernels_methods, dq_py_bcq_init_methods,
    dq_py_bcq_solve_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "decoupleq._C", "The decoupleq C core (see decoupleq/ for the API).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyObject *modname = PyModule_GetNameObject(m);
    if (!modname) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t t = 0; t < sizeof(all_tables) / sizeof(all_tables[0]); t++) {
        for (PyMethodDef *def = all_tables[t]; def->ml_name; def++) {
            PyObject *fn = PyCFunction_NewEx(def, NULL, modname);
            if (!fn || PyModule_AddObject(m, def->ml_name, fn) < 0) {
                Py_XDECREF(fn);
                Py_DECREF(modname);
                Py_DECREF(m);
                return NULL;
            }
        }
    }
    Py_DECREF(modname);
    if (dq_py_install_interrupt_hook() < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* The batch size up to which packed_matmul reads the codes directly (above
     * it: dequantize, then GEMM); QuantLinear picks its own path by it. */
    if (PyModule_AddIntConstant(m, "SMALL_BATCH_MAX", DQ_SMALL_BATCH_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
