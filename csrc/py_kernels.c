/* Python boundary of the packed format and its kernels. */
#include "py_common.h"
#include "dq_blas.h"
#include "dq_kernels.h"

#include <string.h>

/* ---- argument helpers ------------------------------------------------------ */

static int check_bits(int bits)
{
    if (bits < 2 || bits > 4) {
        PyErr_Format(PyExc_ValueError, "bits must be 2, 3 or 4, got %d", bits);
        return -1;
    }
    return 0;
}

/* in_features from Python: 1 .. DQ_PACK_MAX_IN. */
static int check_in_features(Py_ssize_t in)
{
    if (in < 1 || (long long)in > (long long)DQ_PACK_MAX_IN) {
        PyErr_Format(PyExc_ValueError, "in_features must be in [1, %lld], got %zd",
                     (long long)DQ_PACK_MAX_IN, in);
        return -1;
    }
    return 0;
}

/* A row count (out_features, batch) the kernels and BLAS can index. */
static int check_rows(Py_ssize_t rows, const char *what)
{
    if ((long long)rows > (long long)DQ_PACK_MAX_IN) {
        PyErr_Format(PyExc_ValueError, "%s must be at most %lld, got %zd", what,
                     (long long)DQ_PACK_MAX_IN, rows);
        return -1;
    }
    return 0;
}

static int check_threads(int threads)
{
    if (threads < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0: automatic), got %d", threads);
        return -1;
    }
    return 0;
}

/* kernel name (None: the default) -> table entry, or NULL with ValueError. */
static const dq_kernel_t *take_kernel(PyObject *name)
{
    if (name == NULL || name == Py_None) return dq_kernel_default();
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "kernel must be a str or None, got %s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8(name);
    if (!s) return NULL;
    const dq_kernel_t *k = strcmp(s, "auto") == 0 ? dq_kernel_default() : dq_kernel_by_name(s);
    if (!k) {
        char names[160] = "";
        const dq_kernel_t *const *list = dq_kernel_list();
        for (int i = 0; list[i]; i++) {
            if (i) strncat(names, ", ", sizeof names - strlen(names) - 1);
            strncat(names, list[i]->name, sizeof names - strlen(names) - 1);
        }
        PyErr_Format(PyExc_ValueError, "kernel '%s' is not available here; choose from %s", s, names);
        return NULL;
    }
    return k;
}

/* The packed weight's arrays, checked against each other; owned references
 * in *pk, *ps, *pz (pz NULL when zero is None). */
static int take_packed(PyObject *packed, PyObject *scale, PyObject *zero, int bits,
                       Py_ssize_t in_features, Py_ssize_t group_size, dq_packed_t *W,
                       PyArrayObject **pk, PyArrayObject **ps, PyArrayObject **pz)
{
    *pk = *ps = *pz = NULL;
    if (check_bits(bits) < 0 || check_in_features(in_features) < 0) return -1;
    if (group_size != -1 && group_size < 1) {
        PyErr_Format(PyExc_ValueError, "group_size must be -1 (per-channel) or positive, got %zd",
                     group_size);
        return -1;
    }
    /* Any group_size: the last group is shorter when it does not divide in_features. */
    if (!(*pk = dq_py_take(packed, "packed", NPY_UINT32, 2))) return -1;
    if (check_rows(PyArray_DIM(*pk, 0), "packed's row count (out_features)") < 0) goto fail;
    dq_packed_describe(W, PyArray_DIM(*pk, 0), in_features, bits, group_size);
    if (PyArray_DIM(*pk, 1) != W->row_words) {
        PyErr_Format(PyExc_ValueError,
                     "packed has %zd words per row; %d-bit rows of in_features %zd need %lld",
                     (Py_ssize_t)PyArray_DIM(*pk, 1), bits, in_features, (long long)W->row_words);
        goto fail;
    }
    if (!PyArray_Check(scale)) {
        PyErr_Format(PyExc_TypeError, "scale must be a numpy.ndarray, got %s", Py_TYPE(scale)->tp_name);
        goto fail;
    }
    int typenum = PyArray_TYPE((PyArrayObject *)scale);
    if (typenum != NPY_FLOAT16 && typenum != NPY_FLOAT32) {
        PyErr_SetString(PyExc_TypeError, "scale must have dtype float16 or float32");
        goto fail;
    }
    if (!(*ps = dq_py_take(scale, "scale", typenum, 2))) goto fail;
    if (PyArray_DIM(*ps, 0) != W->out || PyArray_DIM(*ps, 1) != W->G) {
        PyErr_Format(PyExc_ValueError, "scale must have shape (%lld, %lld), got (%zd, %zd)",
                     (long long)W->out, (long long)W->G, (Py_ssize_t)PyArray_DIM(*ps, 0),
                     (Py_ssize_t)PyArray_DIM(*ps, 1));
        goto fail;
    }
    if (zero != Py_None) {
        if (PyArray_Check(zero) && PyArray_TYPE((PyArrayObject *)zero) != typenum) {
            PyErr_Format(PyExc_TypeError, "zero must have the dtype of scale (%s)",
                         typenum == NPY_FLOAT16 ? "float16" : "float32");
            goto fail;
        }
        if (!(*pz = dq_py_take(zero, "zero", typenum, 2))) goto fail;
        if (PyArray_DIM(*pz, 0) != W->out || PyArray_DIM(*pz, 1) != W->G) {
            PyErr_Format(PyExc_ValueError, "zero must have shape (%lld, %lld), got (%zd, %zd)",
                         (long long)W->out, (long long)W->G, (Py_ssize_t)PyArray_DIM(*pz, 0),
                         (Py_ssize_t)PyArray_DIM(*pz, 1));
            goto fail;
        }
    }
    W->codes = (const uint32_t *)PyArray_DATA(*pk);
    W->scale = PyArray_DATA(*ps);
    W->zero = *pz ? PyArray_DATA(*pz) : NULL;
    W->sz_type = typenum == NPY_FLOAT16 ? DQ_SZ_F16 : DQ_SZ_F32;
    return 0;
fail:
    Py_CLEAR(*pk);
    Py_CLEAR(*ps);
    Py_CLEAR(*pz);
    return -1;
}

static int overlaps(PyArrayObject *a, PyArrayObject *b)
{
    const char *a0 = PyArray_BYTES(a), *b0 = PyArray_BYTES(b);
    const char *a1 = a0 + PyArray_NBYTES(a), *b1 = b0 + PyArray_NBYTES(b);
    return a0 < b1 && b0 < a1;
}

/* ---- pack / unpack ------------------------------------------------------------ */

static PyObject *py_pack_codes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"codes", "bits", "out", NULL};
    PyObject *codes_obj, *out_obj = Py_None;
    int bits;
    PyArrayObject *A = NULL, *P = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi|O:pack_codes", kwlist, &codes_obj, &bits,
                                     &out_obj))
        return NULL;
    if (check_bits(bits) < 0) return NULL;
    if (!(A = dq_py_take(codes_obj, "codes", NPY_INT8, 2))) return NULL;
    npy_intp out = PyArray_DIM(A, 0), in = PyArray_DIM(A, 1);
    if (in < 1) {
        PyErr_SetString(PyExc_ValueError, "codes must have at least one column");
        goto fail;
    }
    if (check_in_features(in) < 0 || check_rows(out, "codes' row count") < 0) goto fail;
    npy_intp dims[2] = {out, (npy_intp)dq_pack_row_words(bits, in)};
    if (out_obj == Py_None) {
        if (!(P = dq_py_zeros(2, dims, NPY_UINT32))) goto fail;
    } else {
        if (!(P = dq_py_take_out(out_obj, "out", NPY_UINT32, 2))) goto fail;
        if (PyArray_DIM(P, 0) != dims[0] || PyArray_DIM(P, 1) != dims[1]) {
            PyErr_Format(PyExc_ValueError, "out must have shape (%zd, %zd), got (%zd, %zd)",
                         (Py_ssize_t)dims[0], (Py_ssize_t)dims[1], (Py_ssize_t)PyArray_DIM(P, 0),
                         (Py_ssize_t)PyArray_DIM(P, 1));
            goto fail;
        }
    }
    dq_status st;
    int64_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    st = dq_pack((const int8_t *)PyArray_DATA(A), out, in, bits, (uint32_t *)PyArray_DATA(P), &bad);
    Py_END_ALLOW_THREADS
    if (st == DQ_EINVAL && bad >= 0) {
        PyErr_Format(PyExc_ValueError, "codes[%lld, %lld] = %d is outside [%d, %d] for %d bits",
                     (long long)(bad / in), (long long)(bad % in),
                     (int)((const int8_t *)PyArray_DATA(A))[bad], dq_qmin(bits), dq_qmax(bits), bits);
        goto fail;
    }
    if (st != DQ_OK) {
        dq_py_status_error(st, "pack_codes");
        goto fail;
    }
    Py_DECREF(A);
    return (PyObject *)P;
fail:
    Py_XDECREF(A);
    Py_XDECREF(P);
    return NULL;
}

static PyObject *py_unpack_codes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"packed", "bits", "in_features", NULL};
    PyObject *packed_obj;
    int bits;
    Py_ssize_t in;
    PyArrayObject *P = NULL, *A = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oin:unpack_codes", kwlist, &packed_obj, &bits,
                                     &in))
        return NULL;
    if (check_bits(bits) < 0 || check_in_features(in) < 0) return NULL;
    if (!(P = dq_py_take(packed_obj, "packed", NPY_UINT32, 2))) return NULL;
    int64_t rw = dq_pack_row_words(bits, in);
    if (PyArray_DIM(P, 1) != rw) {
        PyErr_Format(PyExc_ValueError,
                     "packed has %zd words per row; %d-bit rows of in_features %zd need %lld",
                     (Py_ssize_t)PyArray_DIM(P, 1), bits, in, (long long)rw);
        goto fail;
    }
    npy_intp dims[2] = {PyArray_DIM(P, 0), in};
    if (!(A = dq_py_zeros(2, dims, NPY_INT8))) goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_unpack((const uint32_t *)PyArray_DATA(P), dims[0], in, bits, (int8_t *)PyArray_DATA(A));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "unpack_codes");
        goto fail;
    }
    Py_DECREF(P);
    return (PyObject *)A;
fail:
    Py_XDECREF(P);
    Py_XDECREF(A);
    return NULL;
}

/* ---- dequantize / matmul ---------------------------------------------------------- */

static PyObject *py_dequantize_packed(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"packed", "scale", "zero", "bits", "in_features", "group_size",
                             "threads", "kernel", NULL};
    PyObject *packed, *scale, *zero, *kname = Py_None;
    int bits, threads = 0;
    Py_ssize_t in, group_size;
    PyArrayObject *pk = NULL, *ps = NULL, *pz = NULL, *out = NULL;
    dq_packed_t W;
    const dq_kernel_t *k;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOinn|iO:dequantize_packed", kwlist, &packed,
                                     &scale, &zero, &bits, &in, &group_size, &threads, &kname))
        return NULL;
    if (check_threads(threads) < 0 || !(k = take_kernel(kname))) return NULL;
    if (take_packed(packed, scale, zero, bits, in, group_size, &W, &pk, &ps, &pz) < 0) return NULL;
    npy_intp dims[2] = {W.out, W.in};
    if (!(out = dq_py_zeros(2, dims, NPY_FLOAT32))) goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_packed_dequantize(&W, (float *)PyArray_DATA(out), threads, k);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "dequantize_packed");
        goto fail;
    }
    Py_DECREF(pk);
    Py_DECREF(ps);
    Py_XDECREF(pz);
    return (PyObject *)out;
fail:
    Py_XDECREF(pk);
    Py_XDECREF(ps);
    Py_XDECREF(pz);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *py_packed_matmul(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"x", "packed", "scale", "zero", "bits", "in_features", "group_size",
                             "out", "threads", "kernel", "tile_rows", NULL};
    PyObject *x_obj, *packed, *scale, *zero, *out_obj = Py_None, *kname = Py_None;
    int bits, threads = 0;
    Py_ssize_t in, group_size, tile_rows = 0;
    PyArrayObject *X = NULL, *pk = NULL, *ps = NULL, *pz = NULL, *Y = NULL;
    dq_packed_t W;
    const dq_kernel_t *k;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOinn|OiOn:packed_matmul", kwlist, &x_obj,
                                     &packed, &scale, &zero, &bits, &in, &group_size, &out_obj,
                                     &threads, &kname, &tile_rows))
        return NULL;
    if (check_threads(threads) < 0 || !(k = take_kernel(kname))) return NULL;
    if (tile_rows < 0) {
        PyErr_Format(PyExc_ValueError, "tile_rows must be >= 0 (0: automatic), got %zd", tile_rows);
        return NULL;
    }
    if (take_packed(packed, scale, zero, bits, in, group_size, &W, &pk, &ps, &pz) < 0) return NULL;
    if (!(X = dq_py_take(x_obj, "x", NPY_FLOAT32, 2))) goto fail;
    if (check_rows(PyArray_DIM(X, 0), "x's batch size") < 0) goto fail;
    if (PyArray_DIM(X, 1) != in) {
        PyErr_Format(PyExc_ValueError, "x must have shape (batch, %zd), got (%zd, %zd)", in,
                     (Py_ssize_t)PyArray_DIM(X, 0), (Py_ssize_t)PyArray_DIM(X, 1));
        goto fail;
    }
    npy_intp dims[2] = {PyArray_DIM(X, 0), W.out};
    if (out_obj == Py_None) {
        if (!(Y = dq_py_zeros(2, dims, NPY_FLOAT32))) goto fail;
    } else {
        if (!(Y = dq_py_take_out(out_obj, "out", NPY_FLOAT32, 2))) goto fail;
        if (PyArray_DIM(Y, 0) != dims[0] || PyArray_DIM(Y, 1) != dims[1]) {
            PyErr_Format(PyExc_ValueError, "out must have shape (%zd, %zd), got (%zd, %zd)",
                         (Py_ssize_t)dims[0], (Py_ssize_t)dims[1], (Py_ssize_t)PyArray_DIM(Y, 0),
                         (Py_ssize_t)PyArray_DIM(Y, 1));
            goto fail;
        }
        if (overlaps(Y, X)) {
            PyErr_SetString(PyExc_ValueError, "out must not share memory with x");
            goto fail;
        }
    }
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_packed_matmul(&W, (const float *)PyArray_DATA(X), dims[0], (float *)PyArray_DATA(Y),
                          threads, k, tile_rows);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "packed_matmul");
        goto fail;
    }
    Py_DECREF(X);
    Py_DECREF(pk);
    Py_DECREF(ps);
    Py_XDECREF(pz);
    return (PyObject *)Y;
fail:
    Py_XDECREF(X);
    Py_XDECREF(pk);
    Py_XDECREF(ps);
    Py_XDECREF(pz);
    Py_XDECREF(Y);
    return NULL;
}

/* ---- helpers for benchmarks and introspection ---------------------------------------- */

static PyObject *py_kernel_names(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObject *lst = PyList_New(0);
    if (!lst) return NULL;
    const dq_kernel_t *const *list = dq_kernel_list();
    for (int i = 0; list[i]; i++) {
        PyObject *s = PyUnicode_FromString(list[i]->name);
        if (!s || PyList_Append(lst, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(lst);
            return NULL;
        }
        Py_DECREF(s);
    }
    return lst;
}

static int check_repeats(int repeats)
{
    if (repeats < 1) {
        PyErr_Format(PyExc_ValueError, "repeats must be >= 1, got %d", repeats);
        return -1;
    }
    return 0;
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"nbytes", "threads", "repeats", NULL};
    Py_ssize_t nbytes = (Py_ssize_t)1 << 28;
    int threads = 0, repeats = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nii:read_bandwidth", kwlist, &nbytes, &threads,
                                     &repeats))
        return NULL;
    if (nbytes < 65536) {
        PyErr_Format(PyExc_ValueError, "nbytes must be >= 65536, got %zd", nbytes);
        return NULL;
    }
    if (check_threads(threads) < 0) return NULL;
    if (check_repeats(repeats) < 0) return NULL;
    double gbps = 0.0;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_read_bandwidth((size_t)nbytes, threads, repeats, &gbps);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) return dq_py_status_error(st, "read_bandwidth");
    return PyFloat_FromDouble(gbps);
}

static PyObject *py_fma_throughput(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"threads", "repeats", NULL};
    int threads = 0, repeats = 3;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ii:fma_throughput", kwlist, &threads, &repeats))
        return NULL;
    if (check_threads(threads) < 0) return NULL;
    if (check_repeats(repeats) < 0) return NULL;
    double gmacs = 0.0;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_fma_throughput(threads, repeats, &gmacs);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) return dq_py_status_error(st, "fma_throughput");
    return PyFloat_FromDouble(gmacs);
}

/* y = x @ w.T with the library's own OpenBLAS (sgemv for one row): the
 * fp32 baseline of the kernel benchmark, on the same BLAS and threads. */
static PyObject *py_blas_linear(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"x", "w", NULL};
    PyObject *x_obj, *w_obj;
    PyArrayObject *X = NULL, *Wt = NULL, *Y = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:blas_linear", kwlist, &x_obj, &w_obj))
        return NULL;
    if (!(X = dq_py_take(x_obj, "x", NPY_FLOAT32, 2))) return NULL;
    if (!(Wt = dq_py_take(w_obj, "w", NPY_FLOAT32, 2))) goto fail;
    npy_intp b = PyArray_DIM(X, 0), n = PyArray_DIM(X, 1), m = PyArray_DIM(Wt, 0);
    if (PyArray_DIM(Wt, 1) != n) {
        PyErr_Format(PyExc_ValueError, "w must have shape (out, %zd), got (%zd, %zd)", (Py_ssize_t)n,
                     (Py_ssize_t)m, (Py_ssize_t)PyArray_DIM(Wt, 1));
        goto fail;
    }
    if (b > INT32_MAX || n > INT32_MAX || m > INT32_MAX || n < 1) {
        PyErr_SetString(PyExc_ValueError, "blas_linear: sizes must be in [1, 2^31)");
        goto fail;
    }
    npy_intp dims[2] = {b, m};
    if (!(Y = dq_py_zeros(2, dims, NPY_FLOAT32))) goto fail;
    const float *xp = (const float *)PyArray_DATA(X), *wp = (const float *)PyArray_DATA(Wt);
    float *yp = (float *)PyArray_DATA(Y);
    Py_BEGIN_ALLOW_THREADS
    if (b == 1)
        dq_cblas_sgemv(DqRowMajor, DqNoTrans, (int)m, (int)n, 1.0f, wp, (int)n, xp, 1, 0.0f, yp, 1);
    else if (b > 1 && m > 0)
        dq_cblas_sgemm(DqRowMajor, DqNoTrans, DqTrans, (int)b, (int)m, (int)n, 1.0f, xp, (int)n, wp,
                       (int)n, 0.0f, yp, (int)m);
    Py_END_ALLOW_THREADS
    Py_DECREF(X);
    Py_DECREF(Wt);
    return (PyObject *)Y;
fail:
    Py_XDECREF(X);
    Py_XDECREF(Wt);
    Py_XDECREF(Y);
    return NULL;
}

PyMethodDef dq_py_kernels_methods[] = {
    {"pack_codes", (PyCFunction)(void (*)(void))py_pack_codes, METH_VARARGS | METH_KEYWORDS,
     "pack_codes(codes, bits, out=None) -> packed: int8 (out, in) codes in [qmin, qmax] -> "
     "uint32 (out, row_words) in the layout of decoupleq.packing."},
    {"unpack_codes", (PyCFunction)(void (*)(void))py_unpack_codes, METH_VARARGS | METH_KEYWORDS,
     "unpack_codes(packed, bits, in_features) -> int8 (out, in_features) codes."},
    {"dequantize_packed", (PyCFunction)(void (*)(void))py_dequantize_packed,
     METH_VARARGS | METH_KEYWORDS,
     "dequantize_packed(packed, scale, zero, bits, in_features, group_size, threads=0, "
     "kernel=None) -> float32 (out, in_features): code * s + z."},
    {"packed_matmul", (PyCFunction)(void (*)(void))py_packed_matmul, METH_VARARGS | METH_KEYWORDS,
     "packed_matmul(x, packed, scale, zero, bits, in_features, group_size, out=None, threads=0, "
     "kernel=None, tile_rows=0) -> float32 (batch, out): x @ dequant(packed).T.  Batches above 16 "
     "dequantize tile_rows rows at a time (0: up to 256 MiB) for sgemm."},
    {"kernel_names", py_kernel_names, METH_NOARGS,
     "kernel_names() -> list of the packed kernels runnable on this CPU, reference first."},
    {"read_bandwidth", (PyCFunction)(void (*)(void))py_read_bandwidth, METH_VARARGS | METH_KEYWORDS,
     "read_bandwidth(nbytes=2**28, threads=0, repeats=3) -> GB/s of a streaming read."},
    {"fma_throughput", (PyCFunction)(void (*)(void))py_fma_throughput, METH_VARARGS | METH_KEYWORDS,
     "fma_throughput(threads=0, repeats=3) -> G fp32 multiply-adds/s the threads issue at once "
     "(the compute ceiling of a kernel doing one per weight)."},
    {"blas_linear", (PyCFunction)(void (*)(void))py_blas_linear, METH_VARARGS | METH_KEYWORDS,
     "blas_linear(x, w) -> x @ w.T in float32 with the library's OpenBLAS (sgemv for one row)."},
    {NULL, NULL, 0, NULL},
};

int dq_py_kernels_info(PyObject *dict)
{
    PyObject *v = NULL, *lst = NULL;
    const char *env = getenv("DECOUPLEQ_KERNEL");
    if (!(v = PyUnicode_FromString(dq_kernel_default()->name)) ||
        PyDict_SetItemString(dict, "kernel", v) < 0)
        goto fail;
    Py_CLEAR(v);
    if (!(v = PyUnicode_FromString(dq_kernel_reason())) ||
        PyDict_SetItemString(dict, "kernel_reason", v) < 0)
        goto fail;
    Py_CLEAR(v);
    if (!(v = PyBool_FromLong(dq_cpu_has_avx2())) || PyDict_SetItemString(dict, "cpu_avx2_fma", v) < 0)
        goto fail;
    Py_CLEAR(v);
    if (env) {
        if (!(v = PyUnicode_FromString(env))) goto fail;
    } else {
        v = Py_None;
        Py_INCREF(v);
    }
    if (PyDict_SetItemString(dict, "kernel_env", v) < 0) goto fail;
    Py_CLEAR(v);
    if (!(lst = py_kernel_names(NULL, NULL)) || PyDict_SetItemString(dict, "kernels", lst) < 0)
        goto fail;
    Py_DECREF(lst);
    return 0;
fail:
    Py_XDECREF(v);
    Py_XDECREF(lst);
    return -1;
}
