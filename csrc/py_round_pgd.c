/* Python boundary of the round_pgd routines. */
#include "py_common.h"

PyMethodDef dq_py_round_pgd_methods[] = {
    {NULL, NULL, 0, NULL},
};
