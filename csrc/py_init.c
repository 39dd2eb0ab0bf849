/* Python boundary of the init routines. */
#include "py_common.h"

PyMethodDef dq_py_init_methods[] = {
    {NULL, NULL, 0, NULL},
};
