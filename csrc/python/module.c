/*
 * lampe._C: the CPython + NumPy C-API binding of the C core. It checks types, shapes, dtypes and
 * strides, turns arrays into the plain parameter structs of lampe.h, releases the GIL around
 * kernels and maps status codes to Python exceptions. No algorithm lives here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include "lampe/lampe.h"

#ifndef LAMPE_COMPILER
#define LAMPE_COMPILER "unknown"
#endif
#ifndef LAMPE_CFLAGS
#define LAMPE_CFLAGS ""
#endif

/* ------------------------------------------------------------------ helpers */

static PyObject *raise_status(int st, const char *what)
{
    PyObject *exc = PyExc_ValueError;
    if (st == LAMPE_ERR_NOMEM) return PyErr_NoMemory();
    if (st == LAMPE_ERR_UNSUPPORTED) exc = PyExc_NotImplementedError;
    PyErr_Format(exc, "%s: %s", what, lampe_status_string(st));
    return NULL;
}

/* An ndarray argument with the given dtype and ndim whose last axis is contiguous. */
static int check_array(PyObject *o, const char *name, int type, int ndim, PyArrayObject **out)
{
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(o)->tp_name);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return 0;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim, PyArray_NDIM(a));
        return 0;
    }
    if (PyArray_SIZE(a) == 0) { /* NumPy gives empty arrays zero strides: nothing to check or touch */
        *out = a;
        return 1;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned", name);
        return 0;
    }
    const int nd = PyArray_NDIM(a);
    if (nd > 0 && PyArray_DIM(a, nd - 1) > 1 && PyArray_STRIDE(a, nd - 1) != PyArray_ITEMSIZE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be contiguous in its last dimension", name);
        return 0;
    }
    for (int i = 0; i < nd; i++) {
        if (PyArray_STRIDE(a, i) % PyArray_ITEMSIZE(a)) {
            PyErr_Format(PyExc_ValueError, "%s has a stride that is not a multiple of its item size", name);
            return 0;
        }
    }
    *out = a;
    return 1;
}

static int check_writeable(PyArrayObject *a, const char *name)
{
    if (!PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return 0;
    }
    return 1;
}

static int64_t estride(PyArrayObject *a, int i)
{
    return (int64_t)(PyArray_STRIDE(a, i) / PyArray_ITEMSIZE(a));
}

static int dtype_code(PyArrayObject *a, int is_bf16, const char *name)
{
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: return LAMPE_F32;
    case NPY_FLOAT16: return LAMPE_F16;
    case NPY_UINT16:
        if (is_bf16) return LAMPE_BF16;
        /* fallthrough */
    default:
        PyErr_Format(PyExc_TypeError, "%s must be float32, float16 or bfloat16 (as uint16 bits), got %S", name,
                     (PyObject *)PyArray_DESCR(a));
        return -1;
    }
}

/* Byte extent [lo, hi) an array touches. */
static void extent(PyArrayObject *a, char **lo, char **hi)
{
    char *l = (char *)PyArray_DATA(a), *h = l;
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        const npy_intp span = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (PyArray_DIM(a, i) == 0) { *lo = *hi = l; return; }
        if (span < 0) l += span; else h += span;
    }
    *lo = l;
    *hi = h + PyArray_ITEMSIZE(a);
}

static int disjoint(PyArrayObject *a, PyArrayObject *b)
{
    char *al, *ah, *bl, *bh;
    extent(a, &al, &ah);
    extent(b, &bl, &bh);
    return ah <= bl || bh <= al;
}

/* In-place (identical view) or disjoint memory: the two cases a row-wise kernel handles. */
static int same_or_disjoint(PyArrayObject *a, PyArrayObject *b)
{
    char *al, *ah, *bl, *bh;
    extent(a, &al, &ah);
    extent(b, &bl, &bh);
    if (ah <= bl || bh <= al) return 1;
    if (PyArray_DATA(a) != PyArray_DATA(b) || PyArray_NDIM(a) != PyArray_NDIM(b)) return 0;
    for (int i = 0; i < PyArray_NDIM(a); i++)
        if (PyArray_STRIDE(a, i) != PyArray_STRIDE(b, i) && PyArray_DIM(a, i) > 1) return 0;
    return 1;
}

/* ------------------------------------------------------------------ dispatch / info */

static PyObject *py_available_isas(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    uint32_t mask = lampe_isa_available_mask();
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int i = 0; i < LAMPE_ISA_COUNT; i++) {
        if (!(mask & (1u << i))) continue;
        PyObject *s = PyUnicode_FromString(lampe_isa_name((lampe_isa)i));
        if (!s || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(s);
    }
    return list;
}

static PyObject *py_current_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(lampe_isa_name(lampe_isa_current()));
}

static PyObject *py_set_cpu_isa(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_cpu_isa", &name)) return NULL;
    int isa = lampe_isa_from_name(name);
    if (isa < 0) {
        PyErr_Format(PyExc_ValueError, "isa: unknown ISA %R (expected scalar, avx2, avx512 or avx512bf16)",
                     PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    int st = lampe_set_isa((lampe_isa)isa);
    if (st == LAMPE_ERR_UNSUPPORTED) {
        PyErr_Format(PyExc_ValueError, "isa: %s is not available on this CPU or build", name);
        return NULL;
    }
    if (st) return raise_status(st, "isa");
    Py_RETURN_NONE;
}

static PyObject *py_default_threads(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(lampe_default_threads());
}

static PyObject *py_build_info(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return Py_BuildValue("{s:s,s:s,s:s}", "compiler", LAMPE_COMPILER, "cflags", LAMPE_CFLAGS, "c_version",
                         LAMPE_VERSION_STRING);
}

/* ------------------------------------------------------------------ planner */

static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"length", "window", "sink", "mapping_length", "decode", "mode", NULL};
    long long L, H, T, U;
    int decode = 0, mode = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLL|ii:plan", kwlist, &L, &H, &T, &U, &decode, &mode)) return NULL;
    if (L < 1) return PyErr_Format(PyExc_ValueError, "length must be >= 1, got %lld", L);
    if (L > LAMPE_MAX_LENGTH)
        return PyErr_Format(PyExc_ValueError, "length %lld is above the supported maximum 2^24 = %lld "
                            "(the float32 mapping recipe is exact only up to 2^24)", L, (long long)LAMPE_MAX_LENGTH);
    if (H < 1) return PyErr_Format(PyExc_ValueError, "window must be >= 1, got %lld", H);
    if (T < 1) return PyErr_Format(PyExc_ValueError, "sink must be >= 1, got %lld (the method needs a sink)", T);
    if (U < 1) return PyErr_Format(PyExc_ValueError, "mapping_length must be >= 1, got %lld", U);
    if (H > LAMPE_MAX_LENGTH || T > LAMPE_MAX_LENGTH || U > LAMPE_MAX_LENGTH)
        return PyErr_Format(PyExc_ValueError, "window, sink and mapping_length must be <= 2^24");
    npy_intp dims[1] = {(npy_intp)L};
    PyArrayObject *m = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!m) return NULL;
    lampe_plan plan;
    int st = lampe_plan_make(&plan, L, H, T, U, mode, decode, (int64_t *)PyArray_DATA(m));
    if (st == LAMPE_ERR_SINK) {
        Py_DECREF(m);
        return PyErr_Format(PyExc_ValueError,
                            "sink=%lld is invalid for length=%lld, window=%lld, mapping_length=%lld: the sink "
                            "extended to the end of its chunk is R=%lld, but the method needs 1 <= R <= "
                            "length - window = %lld",
                            T, L, H, U, (long long)plan.sink_size, L - H);
    }
    if (st) {
        Py_DECREF(m);
        return raise_status(st, "plan");
    }
    return Py_BuildValue("(NLLLi)", (PyObject *)m, (long long)plan.sink_size, (long long)plan.bias_map,
                         (long long)plan.bias_sink, (int)plan.fallback);
}

/* Rebuild a lampe_plan from the Python-side fields; *keep holds the mapped-id array. */
static int plan_from_tuple(PyObject *t, lampe_plan *plan, PyArrayObject **keep)
{
    PyObject *mo;
    long long L, H, T, U, R, b1, b2;
    int fb, decode, mode;
    if (!PyArg_ParseTuple(t, "OLLLLLLLiii;plan must be a tuple (mapped_ids, L, H, T, U, R, b1, b2, fallback, decode, mode)",
                          &mo, &L, &H, &T, &U, &R, &b1, &b2, &fb, &decode, &mode))
        return 0;
    if (mode < LAMPE_MODE_LAMPE || mode > LAMPE_MODE_REROPE) {
        PyErr_SetString(PyExc_ValueError, "plan: unknown mode");
        return 0;
    }
    PyArrayObject *m;
    if (!check_array(mo, "plan.mapped_ids", NPY_INT64, 1, &m)) return 0;
    if (!PyArray_IS_C_CONTIGUOUS(m) || PyArray_DIM(m, 0) != L || L < 1) {
        PyErr_SetString(PyExc_ValueError, "plan.mapped_ids must be a contiguous int64 array of plan.length entries");
        return 0;
    }
    memset(plan, 0, sizeof(*plan));
    plan->length = L;
    plan->window = H;
    plan->sink = T;
    plan->mapping_length = U;
    plan->sink_size = R;
    plan->bias_map = b1;
    plan->bias_sink = b2;
    plan->fallback = fb;
    plan->decode = decode;
    plan->mode = mode;
    plan->mapped_ids = (const int64_t *)PyArray_DATA(m);
    if (H < 1 || U < 1 || R < 0 || (mode == LAMPE_MODE_LAMPE && !fb && (R < 1 || R > L - H))) {
        PyErr_SetString(PyExc_ValueError, "plan: inconsistent fields");
        return 0;
    }
    /* Every index the planner may read must be inside mapped_ids. */
    const int64_t *mm = plan->mapped_ids;
    (void)mm;
    *keep = m;
    return 1;
}

/* regions(plan, positions int64[n]) -> int64[n, 3, 6]: kind, mapped, lo, hi, qpos, shift; kind -1 absent */
static PyObject *py_regions(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *pt, *po;
    if (!PyArg_ParseTuple(args, "OO:regions", &pt, &po)) return NULL;
    lampe_plan plan;
    PyArrayObject *keep, *pos;
    if (!plan_from_tuple(pt, &plan, &keep)) return NULL;
    if (!check_array(po, "positions", NPY_INT64, 1, &pos)) return NULL;
    const npy_intp n = PyArray_DIM(pos, 0);
    npy_intp dims[3] = {n, LAMPE_MAX_REGIONS, 6};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_INT64);
    if (!out) return NULL;
    int64_t *o = (int64_t *)PyArray_DATA(out);
    const char *pp = (const char *)PyArray_DATA(pos);
    const npy_intp ps = PyArray_STRIDE(pos, 0);
    for (npy_intp i = 0; i < n; i++) {
        const int64_t position = *(const int64_t *)(pp + i * ps);
        if (position < 0) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_ValueError, "position must be >= 0, got %lld", (long long)position);
        }
        if (plan.mode != LAMPE_MODE_LAMPE && position >= plan.length) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_ValueError, "position %lld is beyond the planned length %lld: SelfExtend and "
                                "ReRoPE plans cover every position below their length (plan the total length)",
                                (long long)position, (long long)plan.length);
        }
        lampe_region r[LAMPE_MAX_REGIONS];
        int cnt = 0;
        int st = lampe_plan_regions(&plan, position, r, &cnt);
        if (st == LAMPE_ERR_DECODE_RANGE) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_ValueError,
                                "position %lld is decode step %lld after a prompt of %lld tokens, but "
                                "decode='reference' (the authors' rule kpos = m[j]) is defined only for steps "
                                "<= window = %lld; use decode='shifted'",
                                (long long)position, (long long)(position - plan.length + 1),
                                (long long)plan.length, (long long)plan.window);
        }
        if (st) {
            Py_DECREF(out);
            return raise_status(st, "position");
        }
        for (int k = 0; k < LAMPE_MAX_REGIONS; k++) {
            int64_t *e = o + (i * LAMPE_MAX_REGIONS + k) * 6;
            if (k < cnt) {
                e[0] = r[k].kind; e[1] = r[k].mapped; e[2] = r[k].key_lo;
                e[3] = r[k].key_hi; e[4] = r[k].qpos; e[5] = r[k].shift;
            } else {
                e[0] = -1; e[1] = e[2] = e[3] = e[4] = e[5] = 0;
            }
        }
    }
    return (PyObject *)out;
}

static PyObject *py_mapping_length(PyObject *self, PyObject *args)
{
    (void)self;
    long long L;
    const char *preset;
    long long window = 0;
    if (!PyArg_ParseTuple(args, "Ls|L:mapping_length", &L, &preset, &window)) return NULL;
    if (L < 1) return PyErr_Format(PyExc_ValueError, "length must be >= 1, got %lld", L);
    if (L > LAMPE_MAX_LENGTH) return PyErr_Format(PyExc_ValueError, "length %lld is above 2^24", L);
    lampe_sigmoid s;
    int st;
    if (!strcmp(preset, "auto")) {
        if (window < 16 || window > LAMPE_MAX_LENGTH)
            return PyErr_Format(PyExc_ValueError,
                                "pretrained_window must be between 16 and 2^24 for mapping_length='auto', got %lld",
                                window);
        st = lampe_sigmoid_generic(window, &s);
    } else {
        st = lampe_sigmoid_preset(preset, &s);
    }
    if (st)
        return PyErr_Format(PyExc_ValueError,
                            "mapping_length: unknown preset %R (expected 'llama2', 'llama3', 'mistral', 'llama3.1' or "
                            "'auto')", PyTuple_GET_ITEM(args, 1));
    return PyLong_FromLongLong((long long)lampe_sigmoid_eval(&s, L));
}

static PyObject *py_sigmoid_params(PyObject *self, PyObject *args)
{
    (void)self;
    const char *preset;
    long long window = 0;
    if (!PyArg_ParseTuple(args, "s|L:sigmoid_params", &preset, &window)) return NULL;
    lampe_sigmoid s;
    int st = !strcmp(preset, "auto") ? lampe_sigmoid_generic(window, &s) : lampe_sigmoid_preset(preset, &s);
    if (st) return PyErr_Format(PyExc_ValueError, "unknown preset %R", PyTuple_GET_ITEM(args, 0));
    return Py_BuildValue("{s:d,s:d,s:d,s:L,s:L}", "a", s.a, "b", s.b, "lmax", s.lmax, "threshold",
                         (long long)s.threshold, "below", (long long)s.below);
}

/* rotary_dim even in [0, D] and inv_freq a contiguous float32 array of rotary_dim / 2 entries. */
static int check_rotary(PyArrayObject *freq, long long rotary_dim, int64_t D)
{
    if (rotary_dim < 0 || rotary_dim > D || rotary_dim % 2) {
        PyErr_Format(PyExc_ValueError, "rotary_dim must be even and in [0, %lld], got %lld", (long long)D, rotary_dim);
        return 0;
    }
    if (PyArray_DIM(freq, 0) != rotary_dim / 2 || !PyArray_IS_C_CONTIGUOUS(freq)) {
        PyErr_Format(PyExc_ValueError, "inv_freq must be a contiguous float32 array of rotary_dim/2 = %lld entries, "
                     "got %lld", rotary_dim / 2, (long long)PyArray_DIM(freq, 0));
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------ rope */

static PyObject *py_rope(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"src", "dst", "positions", "inv_freq", "rotary_dim", "layout",
                             "amplitude", "bf16", "num_threads", NULL};
    PyObject *so, *dso, *po, *fo;
    long long rotary_dim;
    int layout, bf16, nth;
    double amp;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOLidpi:rope", kwlist, &so, &dso, &po, &fo, &rotary_dim,
                                     &layout, &amp, &bf16, &nth))
        return NULL;
    if (!PyArray_Check(so)) return PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray");
    PyArrayObject *src, *dst, *pos, *freq;
    const int type = PyArray_TYPE((PyArrayObject *)so);
    if (!check_array(so, "x", type, 4, &src) || !check_array(dso, "out", type, 4, &dst)) return NULL;
    if (!check_writeable(dst, "out")) return NULL;
    const int dt = dtype_code(src, bf16, "x");
    if (dt < 0) return NULL;
    for (int i = 0; i < 4; i++)
        if (PyArray_DIM(src, i) != PyArray_DIM(dst, i))
            return PyErr_Format(PyExc_ValueError, "out must have the shape of x");
    if (!check_array(po, "positions", NPY_INT64, -1, &pos)) return NULL;
    if (!check_array(fo, "inv_freq", NPY_FLOAT32, 1, &freq)) return NULL;
    const int64_t B = PyArray_DIM(src, 0), Hh = PyArray_DIM(src, 1), L = PyArray_DIM(src, 2), D = PyArray_DIM(src, 3);
    if (D < 1) return PyErr_Format(PyExc_ValueError, "x: head dimension must be >= 1");
    if (!check_rotary(freq, rotary_dim, D)) return NULL;
    int64_t pos_sb = 0;
    if (!PyArray_IS_C_CONTIGUOUS(pos)) return PyErr_Format(PyExc_ValueError, "positions must be contiguous");
    if (PyArray_NDIM(pos) == 1) {
        if (PyArray_DIM(pos, 0) != L)
            return PyErr_Format(PyExc_ValueError, "positions must have %lld entries (the token axis of x), got %lld",
                                (long long)L, (long long)PyArray_DIM(pos, 0));
    } else if (PyArray_NDIM(pos) == 2) {
        if (PyArray_DIM(pos, 0) != B || PyArray_DIM(pos, 1) != L)
            return PyErr_Format(PyExc_ValueError, "positions must have shape [%lld, %lld]", (long long)B, (long long)L);
        pos_sb = L;
    } else {
        return PyErr_Format(PyExc_ValueError, "positions must be 1-D [L] or 2-D [B, L]");
    }
    if (layout != LAMPE_LAYOUT_HALF && layout != LAMPE_LAYOUT_INTERLEAVED)
        return PyErr_Format(PyExc_ValueError, "layout must be 'half' or 'interleaved'");
    /* dst may be src itself, but not a partial overlap (rows would be read after being written). */
    if (!same_or_disjoint(src, dst)) return PyErr_Format(PyExc_ValueError, "out must be x itself or not overlap it");
    lampe_rope_params p = {0};
    p.src = PyArray_DATA(src);
    p.dst = PyArray_DATA(dst);
    p.dtype = dt;
    p.batch = B; p.heads = Hh; p.tokens = L; p.head_dim = D;
    p.src_stride_b = estride(src, 0); p.src_stride_h = estride(src, 1); p.src_stride_t = estride(src, 2);
    p.dst_stride_b = estride(dst, 0); p.dst_stride_h = estride(dst, 1); p.dst_stride_t = estride(dst, 2);
    p.positions = (const int64_t *)PyArray_DATA(pos);
    p.pos_stride_b = pos_sb;
    p.inv_freq = (const float *)PyArray_DATA(freq);
    p.rotary_dim = rotary_dim;
    p.layout = layout;
    p.amplitude = (float)amp;
    p.num_threads = nth;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lampe_rope(&p);
    Py_END_ALLOW_THREADS
    if (st) return raise_status(st, "rope");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ attention */

#define MAX_BATCH_STACK 64

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"q", "k", "v", "out", "lse", "key_offsets", "key_counts", "query_starts", "plans",
                             "inv_freq", "rotary_dim", "layout", "amplitude", "scale", "softcap", "bf16", "rope_cos",
                             "rope_sin", "num_threads", NULL};
    PyObject *qo, *ko, *vo, *oo, *lo, *offo, *cnto, *qso, *plo, *fo, *co, *so;
    long long rotary_dim;
    int layout, bf16, nth;
    double amp, scale, softcap;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOOOLidddpOOi:attention", kwlist, &qo, &ko, &vo, &oo, &lo,
                                     &offo, &cnto, &qso, &plo, &fo, &rotary_dim, &layout, &amp, &scale, &softcap,
                                     &bf16, &co, &so, &nth))
        return NULL;
    if (!PyArray_Check(qo)) return PyErr_Format(PyExc_TypeError, "q must be a numpy.ndarray");
    const int type = PyArray_TYPE((PyArrayObject *)qo);
    PyArrayObject *q, *k, *v, *out, *lse = NULL, *offs, *cnts, *qss, *freq, *tc = NULL, *ts = NULL;
    if (!check_array(qo, "q", type, 4, &q) || !check_array(ko, "k", type, 4, &k) ||
        !check_array(vo, "v", type, 4, &v) || !check_array(oo, "out", type, 4, &out))
        return NULL;
    if (!check_writeable(out, "out")) return NULL;
    const int dt = dtype_code(q, bf16, "q");
    if (dt < 0) return NULL;
    if (lo != Py_None) {
        if (!check_array(lo, "lse", NPY_FLOAT32, 3, &lse) || !check_writeable(lse, "lse")) return NULL;
    }
    const int64_t B = PyArray_DIM(q, 0), Hq = PyArray_DIM(q, 1), Lq = PyArray_DIM(q, 2), D = PyArray_DIM(q, 3);
    const int64_t Hkv = PyArray_DIM(k, 1), Lk = PyArray_DIM(k, 2);
    if (PyArray_DIM(k, 0) != B || PyArray_DIM(k, 3) != D)
        return PyErr_Format(PyExc_ValueError, "k must have shape [B=%lld, Hkv, Lk, D=%lld]", (long long)B, (long long)D);
    for (int i = 0; i < 4; i++) {
        if (PyArray_DIM(v, i) != PyArray_DIM(k, i)) return PyErr_Format(PyExc_ValueError, "v must have the shape of k");
        if (PyArray_DIM(out, i) != PyArray_DIM(q, i)) return PyErr_Format(PyExc_ValueError, "out must have the shape of q");
    }
    if (lse && (PyArray_DIM(lse, 0) != B || PyArray_DIM(lse, 1) != Hq || PyArray_DIM(lse, 2) != Lq))
        return PyErr_Format(PyExc_ValueError, "lse must have shape [B, Hq, Lq]");
    if (D < 1 || Hq < 1 || Hkv < 1) return PyErr_Format(PyExc_ValueError, "q, k: head_dim and head counts must be >= 1");
    if (Hq % Hkv)
        return PyErr_Format(PyExc_ValueError, "the number of query heads (%lld) must be a multiple of the number of "
                            "key/value heads (%lld)", (long long)Hq, (long long)Hkv);
    if (Lq > Lk) return PyErr_Format(PyExc_ValueError, "q has more positions (%lld) than k (%lld)", (long long)Lq, (long long)Lk);
    if (!disjoint(q, out) || !disjoint(k, out) || !disjoint(v, out))
        return PyErr_Format(PyExc_ValueError, "out must not overlap q, k or v");
    if (lse && (!disjoint(lse, out) || !disjoint(lse, q) || !disjoint(lse, k) || !disjoint(lse, v)))
        return PyErr_Format(PyExc_ValueError, "lse must not overlap out, q, k or v");
    if (!check_array(offo, "key_offsets", NPY_INT64, 1, &offs)) return NULL;
    if (PyArray_DIM(offs, 0) != B || !PyArray_IS_C_CONTIGUOUS(offs))
        return PyErr_Format(PyExc_ValueError, "key_offsets must be a contiguous int64 array of B entries");
    if (!check_array(cnto, "key_counts", NPY_INT64, 1, &cnts)) return NULL;
    if (PyArray_DIM(cnts, 0) != B || !PyArray_IS_C_CONTIGUOUS(cnts))
        return PyErr_Format(PyExc_ValueError, "key_counts must be a contiguous int64 array of B entries");
    if (!check_array(qso, "query_starts", NPY_INT64, 1, &qss)) return NULL;
    if (PyArray_DIM(qss, 0) != B || !PyArray_IS_C_CONTIGUOUS(qss))
        return PyErr_Format(PyExc_ValueError, "query_starts must be a contiguous int64 array of B entries");
    if (!(softcap >= 0.0 && softcap < 3.4e38))
        return PyErr_Format(PyExc_ValueError, "softcap must be a finite number >= 0 (0: none)");
    if (!PyList_Check(plo) || PyList_GET_SIZE(plo) != B)
        return PyErr_Format(PyExc_TypeError, "plans must be a list of B entries (None or a plan tuple)");
    if (!check_array(fo, "inv_freq", NPY_FLOAT32, 1, &freq)) return NULL;
    if (!check_rotary(freq, rotary_dim, D)) return NULL;
    int64_t tab_len = 0;
    if (co != Py_None) {
        if (!check_array(co, "rope_cos", NPY_FLOAT32, 2, &tc) || !check_array(so, "rope_sin", NPY_FLOAT32, 2, &ts)) return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(tc) || !PyArray_IS_C_CONTIGUOUS(ts) || PyArray_DIM(tc, 1) != rotary_dim / 2 ||
            PyArray_DIM(ts, 1) != rotary_dim / 2 || PyArray_DIM(tc, 0) != PyArray_DIM(ts, 0))
            return PyErr_Format(PyExc_ValueError, "rope_cos/rope_sin must be contiguous [n, rotary_dim/2] tables");
        tab_len = PyArray_DIM(tc, 0);
    }
    lampe_attn_seq seq_stack[MAX_BATCH_STACK];
    lampe_plan plan_stack[MAX_BATCH_STACK];
    lampe_attn_seq *seqs = B <= MAX_BATCH_STACK ? seq_stack : (lampe_attn_seq *)PyMem_Malloc((size_t)B * sizeof(*seqs));
    lampe_plan *plans = B <= MAX_BATCH_STACK ? plan_stack : (lampe_plan *)PyMem_Malloc((size_t)B * sizeof(*plans));
    if (!seqs || !plans) {
        if (B > MAX_BATCH_STACK) { PyMem_Free(seqs); PyMem_Free(plans); }
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    const int64_t *off = (const int64_t *)PyArray_DATA(offs), *cnt = (const int64_t *)PyArray_DATA(cnts);
    const int64_t *qst = (const int64_t *)PyArray_DATA(qss);
    for (int64_t b = 0; b < B; b++) {
        if (off[b] < 0 || off[b] > Lk) {
            PyErr_Format(PyExc_ValueError, "key_offsets[%lld] must be in [0, %lld]", (long long)b, (long long)Lk);
            goto done;
        }
        if (cnt[b] < 0 || cnt[b] > Lk - off[b]) {
            PyErr_Format(PyExc_ValueError, "key_counts[%lld] must be in [0, %lld]", (long long)b,
                         (long long)(Lk - off[b]));
            goto done;
        }
        seqs[b].key_offset = off[b];
        seqs[b].key_count = cnt[b];
        seqs[b].query_start = qst[b];
        PyObject *item = PyList_GET_ITEM(plo, b);
        if (item == Py_None) {
            seqs[b].plan = NULL;
            continue;
        }
        PyArrayObject *keep;
        if (!plan_from_tuple(item, &plans[b], &keep)) goto done;
        if (plans[b].decode != LAMPE_DECODE_SHIFTED) {
            PyErr_SetString(PyExc_NotImplementedError, "decode='reference' is supported only by plan.table()");
            goto done;
        }
        seqs[b].plan = &plans[b]; /* the list holds the arrays alive for the call */
    }
    lampe_attn_params p;
    memset(&p, 0, sizeof(p));
    p.q = PyArray_DATA(q); p.k = PyArray_DATA(k); p.v = PyArray_DATA(v); p.out = PyArray_DATA(out);
    p.lse = lse ? (float *)PyArray_DATA(lse) : NULL;
    p.dtype = dt;
    p.batch = B; p.q_heads = Hq; p.kv_heads = Hkv; p.q_len = Lq; p.kv_len = Lk; p.head_dim = D;
    for (int i = 0; i < 3; i++) {
        p.q_stride[i] = estride(q, i); p.k_stride[i] = estride(k, i);
        p.v_stride[i] = estride(v, i); p.out_stride[i] = estride(out, i);
        p.lse_stride[i] = lse ? estride(lse, i) : 0;
    }
    p.seqs = seqs;
    p.inv_freq = (const float *)PyArray_DATA(freq);
    p.rotary_dim = rotary_dim;
    p.layout = layout;
    p.rope_cos = tc ? (const float *)PyArray_DATA(tc) : NULL;
    p.rope_sin = ts ? (const float *)PyArray_DATA(ts) : NULL;
    p.rope_table_len = tab_len;
    p.amplitude = (float)amp;
    p.scale = (float)scale;
    p.softcap = (float)softcap;
    p.num_threads = nth;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lampe_attention(&p);
    Py_END_ALLOW_THREADS
    if (st == LAMPE_ERR_OVERFLOW) {
        PyErr_Format(PyExc_ValueError, "scale: a logit overflows float32 with scale=%g (scale * <q, k> is beyond "
                     "3.4e38 for some finite q, k); use a smaller scale", scale);
        goto done;
    }
    if (st) {
        raise_status(st, "attention");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (B > MAX_BATCH_STACK) {
        PyMem_Free(seqs);
        PyMem_Free(plans);
    }
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"available_isas", py_available_isas, METH_NOARGS, "ISAs compiled in and supported by this CPU."},
    {"current_isa", py_current_isa, METH_NOARGS, "The ISA kernels use now."},
    {"set_cpu_isa", py_set_cpu_isa, METH_VARARGS, "Cap the ISA (in-process)."},
    {"default_threads", py_default_threads, METH_NOARGS, "LAMPE_NUM_THREADS or the affinity count."},
    {"build_info", py_build_info, METH_NOARGS, "Compiler and flags of this build."},
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_VARARGS | METH_KEYWORDS,
     "plan(length, window, sink, mapping_length, decode=0) -> (mapped_ids, R, b1, b2, fallback)"},
    {"regions", py_regions, METH_VARARGS, "regions(plan_tuple, positions) -> int64 [n, 3, 6]"},
    {"mapping_length", py_mapping_length, METH_VARARGS, "mapping_length(length, preset[, window])"},
    {"sigmoid_params", py_sigmoid_params, METH_VARARGS, "sigmoid_params(preset[, window]) -> dict"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_VARARGS | METH_KEYWORDS, "Rotary application."},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "Fused multi-grained attention."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "lampe._C", "lampe's C core.", -1, methods};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "MAX_LENGTH", (long)LAMPE_MAX_LENGTH);
    PyModule_AddIntConstant(m, "MAX_POSITIONS", (long)LAMPE_MAX_POSITIONS);
    PyModule_AddIntConstant(m, "MAX_GROUP", (long)LAMPE_MAX_GROUP);
    PyModule_AddStringConstant(m, "C_VERSION", LAMPE_VERSION_STRING);
    return m;
}
