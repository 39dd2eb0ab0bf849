/* Python boundary of the float_step routines. */
#include "py_common.h"

PyMethodDef dq_py_float_step_methods[] = {
    {NULL, NULL, 0, NULL},
};
