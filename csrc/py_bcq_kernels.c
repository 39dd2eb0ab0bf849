/* Python boundary of the BCQ packed layout and its kernels. */
#include "py_common.h"
#include "dq_kernels_bcq.h"

#include <string.h>

static int check_bcq_bits(int bits)
{
    if (bits < 1 || bits > DQ_BCQ_MAX_BITS) {
        PyErr_Format(PyExc_ValueError, "bits must be in [1, %d], got %d", DQ_BCQ_MAX_BITS, bits);
        return -1;
    }
    return 0;
}

static int check_in(Py_ssize_t in)
{
    if (in < 1 || (long long)in > (long long)INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "in_features must be in [1, %d], got %zd", INT32_MAX, in);
        return -1;
    }
    return 0;
}

static const dq_bcq_kernel_t *take_kernel(PyObject *name)
{
    if (name == NULL || name == Py_None) return dq_bcq_kernel_default();
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "kernel must be a str or None, got %s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8(name);
    if (!s) return NULL;
    const dq_bcq_kernel_t *k = dq_bcq_kernel_by_name(s);
    if (!k) {
        PyErr_Format(PyExc_ValueError, "kernel '%s' is not available here; choose from auto, reference%s%s",
                     s, dq_bcq_kernel_by_name("avx2") ? ", avx2" : "",
                     dq_bcq_kernel_by_name("avx512") ? ", avx512" : "");
        return NULL;
    }
    return k;
}

/* packed, alpha, offset checked against each other and the shape
 * arguments; owned references in *pk, *pa, *po. */
static int take_bcq(PyObject *packed, PyObject *alpha, PyObject *offset, int bits, Py_ssize_t in,
                    Py_ssize_t group_size, dq_bcq_t *W, PyArrayObject **pk, PyArrayObject **pa,
                    PyArrayObject **po)
{
    *pk = *pa = *po = NULL;
    if (check_bcq_bits(bits) < 0 || check_in(in) < 0) return -1;
    if (group_size != -1 && group_size < 1) {
        PyErr_Format(PyExc_ValueError, "group_size must be -1 (per-channel) or positive, got %zd",
                     group_size);
        return -1;
    }
    if (group_size > 0 && in % group_size != 0) {
        PyErr_Format(PyExc_ValueError, "group_size %zd does not divide in_features %zd", group_size,
                     in);
        return -1;
    }
    if (!(*pk = dq_py_take(packed, "packed", NPY_UINT32, 2))) return -1;
    dq_bcq_describe(W, PyArray_DIM(*pk, 0), in, bits, group_size);
    if (PyArray_DIM(*pk, 1) != W->row_words) {
        PyErr_Format(PyExc_ValueError,
                     "packed has %zd words per row; %d-bit BCQ rows of in_features %zd need %lld",
                     (Py_ssize_t)PyArray_DIM(*pk, 1), bits, in, (long long)W->row_words);
        goto fail;
    }
    if (!(*pa = dq_py_take(alpha, "alpha", NPY_FLOAT32, 3))) goto fail;
    if (PyArray_DIM(*pa, 0) != W->out || PyArray_DIM(*pa, 1) != W->G || PyArray_DIM(*pa, 2) != bits) {
        PyErr_Format(PyExc_ValueError, "alpha must have shape (%lld, %lld, %d), got (%zd, %zd, %zd)",
                     (long long)W->out, (long long)W->G, bits, (Py_ssize_t)PyArray_DIM(*pa, 0),
                     (Py_ssize_t)PyArray_DIM(*pa, 1), (Py_ssize_t)PyArray_DIM(*pa, 2));
        goto fail;
    }
    if (!(*po = dq_py_take(offset, "offset", NPY_FLOAT32, 2))) goto fail;
    if (PyArray_DIM(*po, 0) != W->out || PyArray_DIM(*po, 1) != W->G) {
        PyErr_Format(PyExc_ValueError, "offset must have shape (%lld, %lld), got (%zd, %zd)",
                     (long long)W->out, (long long)W->G, (Py_ssize_t)PyArray_DIM(*po, 0),
                     (Py_ssize_t)PyArray_DIM(*po, 1));
        goto fail;
    }
    W->words = (const uint32_t *)PyArray_DATA(*pk);
    W->alpha = (const float *)PyArray_DATA(*pa);
    W->offset = (const float *)PyArray_DATA(*po);
    return 0;
fail:
    Py_CLEAR(*pk);
    Py_CLEAR(*pa);
    Py_CLEAR(*po);
    return -1;
}

static int check_threads(int threads)
{
    if (threads < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0: automatic), got %d", threads);
        return -1;
    }
    return 0;
}

static PyObject *py_bcq_pack(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"indices", "bits", NULL};
    PyObject *idx_obj;
    int bits;
    PyArrayObject *A = NULL, *P = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi:bcq_pack", kwlist, &idx_obj, &bits))
        return NULL;
    if (check_bcq_bits(bits) < 0) return NULL;
    if (!(A = dq_py_take(idx_obj, "indices", NPY_UINT8, 2))) return NULL;
    npy_intp out = PyArray_DIM(A, 0), in = PyArray_DIM(A, 1);
    if (in < 1) {
        PyErr_SetString(PyExc_ValueError, "indices must have at least one column");
        goto fail;
    }
    if (check_in(in) < 0) goto fail;
    npy_intp dims[2] = {out, (npy_intp)dq_bcq_row_words(bits, in)};
    if (!(P = dq_py_zeros(2, dims, NPY_UINT32))) goto fail;
    dq_status st;
    int64_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_pack((const uint8_t *)PyArray_DATA(A), out, in, bits, (uint32_t *)PyArray_DATA(P),
                     &bad);
    Py_END_ALLOW_THREADS
    if (st == DQ_EINVAL && bad >= 0) {
        PyErr_Format(PyExc_ValueError, "indices[%lld, %lld] = %d is outside [0, %d] for %d bits",
                     (long long)(bad / in), (long long)(bad % in),
                     (int)((const uint8_t *)PyArray_DATA(A))[bad], (1 << bits) - 1, bits);
        goto fail;
    }
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_pack");
        goto fail;
    }
    Py_DECREF(A);
    return (PyObject *)P;
fail:
    Py_XDECREF(A);
    Py_XDECREF(P);
    return NULL;
}

static PyObject *py_bcq_unpack(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"packed", "bits", "in_features", NULL};
    PyObject *packed_obj;
    int bits;
    Py_ssize_t in;
    PyArrayObject *P = NULL, *A = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oin:bcq_unpack", kwlist, &packed_obj, &bits, &in))
        return NULL;
    if (check_bcq_bits(bits) < 0 || check_in(in) < 0) return NULL;
    if (!(P = dq_py_take(packed_obj, "packed", NPY_UINT32, 2))) return NULL;
    int64_t rw = dq_bcq_row_words(bits, in);
    if (PyArray_DIM(P, 1) != rw) {
        PyErr_Format(PyExc_ValueError,
                     "packed has %zd words per row; %d-bit BCQ rows of in_features %zd need %lld",
                     (Py_ssize_t)PyArray_DIM(P, 1), bits, in, (long long)rw);
        goto fail;
    }
    npy_intp dims[2] = {PyArray_DIM(P, 0), in};
    if (!(A = dq_py_zeros(2, dims, NPY_UINT8))) goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_unpack((const uint32_t *)PyArray_DATA(P), dims[0], in, bits,
                       (uint8_t *)PyArray_DATA(A));
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_unpack");
        goto fail;
    }
    Py_DECREF(P);
    return (PyObject *)A;
fail:
    Py_XDECREF(P);
    Py_XDECREF(A);
    return NULL;
}

static PyObject *py_bcq_dequantize_packed(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"packed", "alpha", "offset", "bits", "in_features", "group_size",
                             "threads", "kernel", NULL};
    PyObject *packed, *alpha, *offset, *kname = Py_None;
    int bits, threads = 0;
    Py_ssize_t in, group_size;
    PyArrayObject *pk = NULL, *pa = NULL, *po = NULL, *out = NULL;
    dq_bcq_t W;
    const dq_bcq_kernel_t *k;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOinn|iO:bcq_dequantize_packed", kwlist,
                                     &packed, &alpha, &offset, &bits, &in, &group_size, &threads,
                                     &kname))
        return NULL;
    if (check_threads(threads) < 0 || !(k = take_kernel(kname))) return NULL;
    if (take_bcq(packed, alpha, offset, bits, in, group_size, &W, &pk, &pa, &po) < 0) return NULL;
    npy_intp dims[2] = {W.out, W.in};
    if (!(out = dq_py_zeros(2, dims, NPY_FLOAT32))) goto fail;
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_dequantize(&W, (float *)PyArray_DATA(out), threads, k);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_dequantize_packed");
        goto fail;
    }
    Py_DECREF(pk);
    Py_DECREF(pa);
    Py_DECREF(po);
    return (PyObject *)out;
fail:
    Py_XDECREF(pk);
    Py_XDECREF(pa);
    Py_XDECREF(po);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *py_bcq_packed_matmul(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"x", "packed", "alpha", "offset", "bits", "in_features",
                             "group_size", "out", "threads", "kernel", "tile_rows", NULL};
    PyObject *x_obj, *packed, *alpha, *offset, *out_obj = Py_None, *kname = Py_None;
    int bits, threads = 0;
    Py_ssize_t in, group_size, tile_rows = 0;
    PyArrayObject *X = NULL, *pk = NULL, *pa = NULL, *po = NULL, *Y = NULL;
    dq_bcq_t W;
    const dq_bcq_kernel_t *k;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOinn|OiOn:bcq_packed_matmul", kwlist, &x_obj,
                                     &packed, &alpha, &offset, &bits, &in, &group_size, &out_obj,
                                     &threads, &kname, &tile_rows))
        return NULL;
    if (check_threads(threads) < 0 || !(k = take_kernel(kname))) return NULL;
    if (tile_rows < 0) {
        PyErr_Format(PyExc_ValueError, "tile_rows must be >= 0 (0: automatic), got %zd", tile_rows);
        return NULL;
    }
    if (take_bcq(packed, alpha, offset, bits, in, group_size, &W, &pk, &pa, &po) < 0) return NULL;
    if (!(X = dq_py_take(x_obj, "x", NPY_FLOAT32, 2))) goto fail;
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
        const char *y0 = PyArray_BYTES(Y), *x0 = PyArray_BYTES(X);
        if (y0 < x0 + PyArray_NBYTES(X) && x0 < y0 + PyArray_NBYTES(Y)) {
            PyErr_SetString(PyExc_ValueError, "out must not share memory with x");
            goto fail;
        }
    }
    dq_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dq_bcq_matmul(&W, (const float *)PyArray_DATA(X), dims[0], (float *)PyArray_DATA(Y),
                       threads, k, tile_rows);
    Py_END_ALLOW_THREADS
    if (st != DQ_OK) {
        dq_py_status_error(st, "bcq_packed_matmul");
        goto fail;
    }
    Py_DECREF(X);
    Py_DECREF(pk);
    Py_DECREF(pa);
    Py_DECREF(po);
    return (PyObject *)Y;
fail:
    Py_XDECREF(X);
    Py_XDECREF(pk);
    Py_XDECREF(pa);
    Py_XDECREF(po);
    Py_XDECREF(Y);
    return NULL;
}

static PyObject *py_bcq_kernel_names(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    /* the default (auto) last */
    if (dq_bcq_kernel_by_name("avx512")) return Py_BuildValue("[sss]", "reference", "avx2", "avx512");
    return dq_bcq_kernel_by_name("avx2") ? Py_BuildValue("[ss]", "reference", "avx2")
                                         : Py_BuildValue("[s]", "reference");
}

static PyObject *py_bcq_default_kernel(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(dq_bcq_kernel_default()->name);
}

PyMethodDef dq_py_bcq_kernels_methods[] = {
    {"bcq_pack", (PyCFunction)(void (*)(void))py_bcq_pack, METH_VARARGS | METH_KEYWORDS,
     "bcq_pack(indices, bits) -> packed: uint8 (out, in) level indices < 2**bits -> uint32 "
     "(out, row_words) in the layout of decoupleq.bcq."},
    {"bcq_unpack", (PyCFunction)(void (*)(void))py_bcq_unpack, METH_VARARGS | METH_KEYWORDS,
     "bcq_unpack(packed, bits, in_features) -> uint8 (out, in_features) level indices."},
    {"bcq_dequantize_packed", (PyCFunction)(void (*)(void))py_bcq_dequantize_packed,
     METH_VARARGS | METH_KEYWORDS,
     "bcq_dequantize_packed(packed, alpha, offset, bits, in_features, group_size, threads=0, "
     "kernel=None) -> float32 (out, in_features)."},
    {"bcq_packed_matmul", (PyCFunction)(void (*)(void))py_bcq_packed_matmul,
     METH_VARARGS | METH_KEYWORDS,
     "bcq_packed_matmul(x, packed, alpha, offset, bits, in_features, group_size, out=None, "
     "threads=0, kernel=None, tile_rows=0) -> float32 (batch, out): x @ dequant(packed).T."},
    {"bcq_kernel_names", py_bcq_kernel_names, METH_NOARGS,
     "bcq_kernel_names() -> the BCQ kernels runnable on this CPU, reference first."},
    {"bcq_default_kernel", py_bcq_default_kernel, METH_NOARGS,
     "bcq_default_kernel() -> name of the BCQ kernel used when none is named."},
    {NULL, NULL, 0, NULL},
};
