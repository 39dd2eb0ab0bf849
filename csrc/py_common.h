/* Helpers shared by the py_*.c boundary files (the only files that see Python).
 *
 * Pattern of every boundary function: parse -> take each array once with
 * dq_py_take (exact dtype, C-contiguous, aligned: nothing is ever copied, so
 * the core can never write into a silent copy of a caller's array) -> check
 * shapes and finiteness -> Py_BEGIN_ALLOW_THREADS around the core -> one
 * fail: label that releases everything and maps dq_status to an exception.
 */
#ifndef DQ_PY_COMMON_H
#define DQ_PY_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef DQ_IMPORTS_ARRAY
#define NO_IMPORT_ARRAY
#endif
#define PY_ARRAY_UNIQUE_SYMBOL decoupleq_ARRAY_API
#include <numpy/arrayobject.h>

#include "dq_common.h"

/* Borrow obj as an ndarray of exactly this dtype and rank (ndim < 0: any),
 * C-contiguous and aligned; returns a new reference or NULL with TypeError /
 * ValueError naming `argname`. */
PyArrayObject *dq_py_take(PyObject *obj, const char *argname, int typenum, int ndim);

/* Like dq_py_take, and the array must also be writeable (an output). */
PyArrayObject *dq_py_take_out(PyObject *obj, const char *argname, int typenum, int ndim);

/* ValueError unless every element is finite. Returns 0 on success. */
int dq_py_check_finite(PyArrayObject *a, const char *argname);
/* A scale or zero argument: float32 (m, G) C-contiguous and finite, the
 * error naming the argument and both shapes.  New reference or NULL. */
PyArrayObject *dq_py_take_params(PyObject *obj, const char *name, int64_t m, int64_t G);

/* Set the Python exception for a failed core call; `what` says which
 * routine (e.g. "float_step"). Always returns NULL for `return` chaining. */
PyObject *dq_py_status_error(dq_status st, const char *what);

/* New C-contiguous zeroed array of the given dtype and shape. */
PyArrayObject *dq_py_zeros(int ndim, const npy_intp *dims, int typenum);

/* Method tables, one per boundary file, each ending with a NULL sentinel. */
extern PyMethodDef dq_py_hessian_methods[];
extern PyMethodDef dq_py_init_methods[];
extern PyMethodDef dq_py_float_step_methods[];
extern PyMethodDef dq_py_round_gptq_methods[];
extern PyMethodDef dq_py_round_pgd_methods[];
extern PyMethodDef dq_py_solver_methods[];
extern PyMethodDef dq_py_kernels_methods[];
extern PyMethodDef dq_py_start_methods[];
extern PyMethodDef dq_py_bcq_kernels_methods[];
extern PyMethodDef dq_py_bcq_init_methods[];
extern PyMethodDef dq_py_bcq_solve_methods[];

/* Extra entries for backend_info(); kernels fill in their choice here. */
int dq_py_kernels_info(PyObject *dict);

#endif

/* The arguments every layer-solver entry point shares, taken and checked
 * once: W float32 (m, n), H00 float64 (n, n), both finite; bits in 2..8;
 * group_size -1 (per-channel) or positive (the last group is shorter when it
 * does not divide n; past n it is n); rule a string. */
typedef struct {
    PyArrayObject *W, *H;
    int64_t m, n, group_size; /* group_size resolved: n when per-channel */
    int bits, symmetric, rule;
} dq_py_layer_args_t;

int dq_py_layer_args(PyObject *W, PyObject *H, long group_size, int bits, int symmetric,
                     const char *rule, dq_py_layer_args_t *out);
void dq_py_layer_args_release(dq_py_layer_args_t *a);

/* W's entries below FLT_MAX / 2 in magnitude (min-max ranges stay finite);
 * else ValueError naming it. */
int dq_py_check_weight_range(PyArrayObject *W, const char *name);

/* H (float64 n x n, already taken) as the solver needs it: finite, diag >= 0,
 * entries within float32, symmetric within DQ_SYM_RTOL, W H within float32
 * (W NULL: not checked), positive semi-definite within DQ_PSD_RTOL (a
 * Cholesky, with the GIL released).  ValueError naming it, else 0. */
int dq_py_check_hessian(PyArrayObject *H, const char *name, PyArrayObject *W, const char *wname);

/* Installs the core's interrupt hook (module init). */
int dq_py_install_interrupt_hook(void);

/* "%.6g" of x into buf: PyErr_Format has no %g. */
void dq_py_format_double(double x, char *buf, size_t size);

/* "minmax" / "shrink" / "neuqi" / "neuqi_int" -> DQ_INIT_*; else ValueError naming init. */
int dq_py_parse_init(const char *init, int *out);

/* The argument checks the entry points share (each sets a ValueError naming the argument
 * and returns -1 / NULL). */
/* lo <= bits <= hi: "bits must be in lo..hi". */
int dq_py_check_bits(int bits, int lo, int hi);
/* An input matrix `name`: float32 (m, n) with at least one row and one column.  New
 * reference or NULL; finiteness and value ranges are the caller's to check. */
PyArrayObject *dq_py_take_matrix(PyObject *obj, const char *name, int64_t *m, int64_t *n);
/* group_size -1 (per-channel: n) or positive.  `equal` (BCQ layers, equal groups): it must
 * divide n; otherwise any size (the last group is shorter when it does not divide n; a size
 * past n is one group per row).  *g gets the group size in columns. */
int dq_py_resolve_group(long group_size, int64_t n, int equal, int64_t *g);
/* An optional weight vector `name` over W's `what` ("rows" / "columns"): float32 (len,),
 * finite.  New reference or NULL. */
PyArrayObject *dq_py_take_vector(PyObject *obj, const char *name, int64_t len, const char *what);

/* "half_up" -> DQ_ROUND_HALF_UP, "half_even" -> DQ_ROUND_HALF_EVEN; else ValueError. */
int dq_py_parse_rule(const char *rule, int *out);
