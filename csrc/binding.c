/*
 * The CPython extension module gqsa._native_cpu: argument parsing (tensors arrive as data pointers), checks,
 * the GIL released around the kernels of driver.c, kernel_a8.c and kernel_scalar.c. Python wrapper:
 * src/gqsa/ops/cpu.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "gqsa_cpu.h"

static void *as_ptr(unsigned long long v) { return (void *)(uintptr_t)v; }

static int check_problem(const Problem *p) {
    if (p->g < 8 || p->g > 256 || (p->g & (p->g - 1)) || p->K % p->g) {
        PyErr_SetString(PyExc_ValueError, "group_size must be a power of two in [8, 256] dividing in_features");
        return -1;
    }
    if (p->bits != 2 && p->bits != 3 && p->bits != 4 && p->bits != 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be 2, 3, 4 or 8");
        return -1;
    }
    if (p->M < 0 || p->N < 1 || p->K < 1 || p->nnz < 0) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return -1;
    }
    return 0;
}

/*
 * Parse the common arguments: pointers (integers, data_ptr()) and sizes. Format (see py_linear's docstring):
 * x, crow, col, col_int32, values, scale, zero, y, M, N, K, nnz, group_size, bits.
 */
static int parse_problem(PyObject *args, Problem *p, int *threads, int *mode, int *isa) {
    unsigned long long x, crow, col, values, scale, zero, y;
    long long M, N, K, nnz;
    memset(p, 0, sizeof *p); /* every optional field (x rearrangements) starts NULL */
    if (!PyArg_ParseTuple(args, "KKKiKKKKLLLLiiiii", &x, &crow, &col, &p->col_int32, &values, &scale, &zero, &y, &M,
                          &N, &K, &nnz, &p->g, &p->bits, threads, mode, isa))
        return -1;
    p->x = as_ptr(x);
    p->crow = as_ptr(crow);
    p->col = as_ptr(col);
    p->values = as_ptr(values);
    p->scale = as_ptr(scale);
    p->zero = as_ptr(zero);
    p->y = as_ptr(y);
    p->M = M;
    p->N = N;
    p->K = K;
    p->ldx = K;
    p->ldq = K;
    p->nnz = nnz;
    p->zero_nbytes = (nnz * p->bits + 7) / 8;
    return check_problem(p);
}

PyDoc_STRVAR(py_linear_doc,
             "linear(x, crow, col, col_int32, values, scale, zero, y, M, N, K, nnz, group_size, bits, threads, "
             "mode, isa)\n\n"
             "y (M, N) float32 = x (M, K) float32 @ W^T. Every tensor argument is a data pointer (int) of a "
             "contiguous tensor; zero is 0 for symmetric weights. mode: 0 task-centric, 1 row split. "
             "isa: 0 best available, 1 scalar, 2 AVX2 (never AVX-512), 3 AVX-512 where the CPU has it.");

/* linear / linear_a8: parse, check, run without the GIL. */
static PyObject *run_linear(PyObject *args, int act8) {
    Problem p;
    int threads, mode, isa, rc;
    if (parse_problem(args, &p, &threads, &mode, &isa) < 0) return NULL;
    if (act8 && (p.bits != 4 || p.g % 16)) {
        PyErr_SetString(PyExc_ValueError, "linear_a8: 4-bit weights with a group size multiple of 16 only");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = linear(&p, threads, mode, isa, act8);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    return run_linear(args, 0);
}

PyDoc_STRVAR(py_linear_a8_doc,
             "linear_a8(...same arguments as linear...)\n\n"
             "y ~= x @ W^T with x quantized to int8 per 16 columns (symmetric, scale amax / 127) and integer "
             "dot products: 4-bit weights with a group size that is a multiple of 16 only.");

static PyObject *py_linear_a8(PyObject *self, PyObject *args) {
    (void)self;
    return run_linear(args, 1);
}

/* add_rms_norm (kernel_scalar.c): the decode step's residual add + RMSNorm in one call. */
static PyObject *py_add_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, delta, w, out;
    long long rows, n;
    double eps;
    if (!PyArg_ParseTuple(args, "KKKKLLd", &x, &delta, &w, &out, &rows, &n, &eps)) return NULL;
    if (rows < 0 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "add_rms_norm: rows must be >= 0 and n >= 1");
        return NULL;
    }
    add_rms_norm(as_ptr(x), as_ptr(delta), as_ptr(w), as_ptr(out), rows, n, (float)eps);
    Py_RETURN_NONE;
}

static PyObject *py_quantize_x(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, xq, xs;
    long long M, K;
    if (!PyArg_ParseTuple(args, "KKKLL", &x, &xq, &xs, &M, &K)) return NULL;
    if (M < 0 || K < 16 || K % 16) {
        PyErr_SetString(PyExc_ValueError, "quantize_x: K must be a positive multiple of 16");
        return NULL;
    }
    quantize_x(as_ptr(x), M, K, K, as_ptr(xq), K, as_ptr(xs));
    Py_RETURN_NONE;
}

PyDoc_STRVAR(py_dequantize_doc,
             "dequantize(0, crow, col, col_int32, values, scale, zero, w, 0, N, K, nnz, group_size, bits, threads, "
             "0, isa)\n\nDense W (N, K) float32 written to the pointer w (same argument order as linear).");

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    Problem p;
    int threads, mode, isa;
    if (parse_problem(args, &p, &threads, &mode, &isa) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    dequantize_dense(&p, threads, isa);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(use_avx512(ISA_AUTO) ? "avx512" : use_avx2(ISA_AUTO) ? "avx2" : "scalar");
}

static PyObject *py_a8_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(use_vnni(ISA_AUTO) ? "avx512-vnni" : use_avx2(ISA_AUTO) ? "avx2" : "scalar");
}

static PyObject *py_avx512_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(avx512_supported());
}

static PyObject *py_openmp(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, py_linear_doc},
    {"dequantize", py_dequantize, METH_VARARGS, py_dequantize_doc},
    {"linear_a8", py_linear_a8, METH_VARARGS, py_linear_a8_doc},
    {"quantize_x", py_quantize_x, METH_VARARGS,
     "quantize_x(x, xq, xs, M, K): x (M, K) float32 -> xq (M, K) int8, xs (M, K / 16) float32 (pointers)."},
    {"add_rms_norm", py_add_rms_norm, METH_VARARGS,
     "add_rms_norm(x, delta, w, out, rows, n, eps): x (rows, n) += delta (0: none), out = w * rmsnorm(x)."},
    {"isa", py_isa, METH_NOARGS,
     "Instruction set the kernels use here: 'avx512' (the batch-1 path; opt-in), 'avx2' or 'scalar'."},
    {"a8_isa", py_a8_isa, METH_NOARGS,
     "Instruction set of linear_a8 here for 4-bit group-16 weights: 'avx512-vnni', 'avx2' or 'scalar'."},
    {"avx512_supported", py_avx512_supported, METH_NOARGS, "Whether this CPU has what the AVX-512 path needs."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the module was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gqsa._native_cpu",
                                    "Native CPU kernels for gqsa::linear (see csrc/gqsa_cpu.h).", -1, methods};

PyMODINIT_FUNC PyInit__native_cpu(void) { return PyModule_Create(&module); }
