/* Python boundary of the round_gptq routines. */
#include "py_common.h"

PyMethodDef dq_py_round_gptq_methods[] = {
    {NULL, NULL, 0, NULL},
};
