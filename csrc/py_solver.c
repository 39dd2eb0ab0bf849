/* Python boundary of the solver routines. */
#include "py_common.h"

PyMethodDef dq_py_solver_methods[] = {
    {NULL, NULL, 0, NULL},
};
