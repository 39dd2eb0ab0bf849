/* Python boundary of the kernels routines. */
#include "py_common.h"

PyMethodDef dq_py_kernels_methods[] = {
    {NULL, NULL, 0, NULL},
};

int dq_py_kernels_info(PyObject *dict)
{
    (void)dict;
    return 0;
}
