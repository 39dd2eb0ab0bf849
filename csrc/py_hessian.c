/* Python boundary of the hessian routines. */
#include "py_common.h"

PyMethodDef dq_py_hessian_methods[] = {
    {NULL, NULL, 0, NULL},
};
