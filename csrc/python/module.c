/*
 * lampe._C: the CPython + NumPy C-API binding of the C core. It checks types, shapes, dtypes and
 * strides, turns arrays into the plain parameter structs of lampe.h, releases the GIL around
 * kernels and maps status codes to Python exceptions. No algorithm lives here: plans come from
 * lampe_plan_make and travel as _C.Plan objects holding the struct itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
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

/* An ndarray argument with the given dtype (-1: any) and ndim (-1: any) whose last axis is
 * contiguous and whose strides are whole elements. */
static int check_array(PyObject *o, const char *name, int type, int ndim, PyArrayObject **out)
{
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(o)->tp_name);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (type >= 0 && PyArray_TYPE(a) != type) {
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
    *out = a;
    if (PyArray_SIZE(a) == 0) return 1; /* NumPy gives empty arrays zero strides: nothing to check or touch */
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
    return 1;
}

/* A C-contiguous int64 array of n entries (per batch row metadata). */
static int check_rows(PyObject *o, const char *name, npy_intp n, const int64_t **data)
{
    PyArrayObject *a;
    if (!check_array(o, name, NPY_INT64, 1, &a)) return 0;
    if (PyArray_DIM(a, 0) != n || !PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous int64 array of %lld entries", name, (long long)n);
        return 0;
    }
    *data = (const int64_t *)PyArray_DATA(a);
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

static int64_t estride(PyArrayObject *a, int i) { return (int64_t)(PyArray_STRIDE(a, i) / PyArray_ITEMSIZE(a)); }

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

static int same_shape(PyArrayObject *a, PyArrayObject *b)
{
    if (PyArray_NDIM(a) != PyArray_NDIM(b)) return 0;
    for (int i = 0; i < PyArray_NDIM(a); i++)
        if (PyArray_DIM(a, i) != PyArray_DIM(b, i)) return 0;
    return 1;
}

/* Byte extent [lo, hi) an array touches. */
static void extent(PyArrayObject *a, char **lo, char **hi)
{
    char *l = (char *)PyArray_DATA(a), *h = l;
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        const npy_intp span = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (PyArray_DIM(a, i) == 0) {
            *lo = *hi = l;
            return;
        }
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

/* In-place (identical view) or disjoint memory: the two cases a row-wise kernel handles. The
 * Python front end copies through a temporary for anything else. */
static int same_or_disjoint(PyArrayObject *a, PyArrayObject *b)
{
    if (disjoint(a, b)) return 1;
    if (PyArray_DATA(a) != PyArray_DATA(b) || !same_shape(a, b)) return 0;
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

/* ------------------------------------------------------------------ plans */

/*
 * _C.Plan(length, window, sink, mapping_length, decode=0, mode=0): the lampe_plan made by
 * lampe_plan_make, immutable. The mapped ids live in a bytes object (immutable storage) and are
 * shown as a read-only int64 array whose base is that bytes object, so it can never be made
 * writeable. lampe.positions.Plan subclasses this type.
 */
typedef struct {
    PyObject_HEAD
    lampe_plan plan; /* plan.mapped_ids points into ids */
    PyObject *ids;   /* bytes: m[0..length-1] as int64 */
    PyObject *ids_view;
} PlanObject;

static PyTypeObject PlanType;

static PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"length", "window", "sink", "mapping_length", "decode", "mode", NULL};
    long long L, H, T, U;
    int decode = LAMPE_DECODE_SHIFTED, mode = LAMPE_MODE_LAMPE;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLL|ii:Plan", kwlist, &L, &H, &T, &U, &decode, &mode)) return NULL;
    if (L < 1) return PyErr_Format(PyExc_ValueError, "length must be >= 1, got %lld", L);
    if (L > LAMPE_MAX_LENGTH)
        return PyErr_Format(PyExc_ValueError, "length %lld is above the supported maximum 2^24 = %lld "
                            "(the float32 mapping recipe is exact only up to 2^24)", L, (long long)LAMPE_MAX_LENGTH);
    if (H < 1) return PyErr_Format(PyExc_ValueError, "window must be >= 1, got %lld", H);
    if (T < 1) return PyErr_Format(PyExc_ValueError, "sink must be >= 1, got %lld (the method needs a sink)", T);
    if (U < 1) return PyErr_Format(PyExc_ValueError, "mapping_length must be >= 1, got %lld", U);
    if (H > LAMPE_MAX_LENGTH || T > LAMPE_MAX_LENGTH || U > LAMPE_MAX_LENGTH)
        return PyErr_Format(PyExc_ValueError, "window, sink and mapping_length must be <= 2^24");
    PyObject *ids = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(L * (long long)sizeof(int64_t)));
    if (!ids) return NULL;
    lampe_plan plan;
    int st = lampe_plan_make(&plan, L, H, T, U, mode, decode, (int64_t *)PyBytes_AS_STRING(ids));
    if (st == LAMPE_ERR_SINK) {
        Py_DECREF(ids);
        return PyErr_Format(PyExc_ValueError,
                            "sink=%lld is invalid for length=%lld, window=%lld, mapping_length=%lld: the sink "
                            "extended to the end of its chunk is R=%lld, but the method needs 1 <= R <= "
                            "length - window = %lld",
                            T, L, H, U, (long long)plan.sink_size, L - H);
    }
    if (st) {
        Py_DECREF(ids);
        return raise_status(st, "plan");
    }
    PlanObject *self = (PlanObject *)type->tp_alloc(type, 0);
    if (!self) {
        Py_DECREF(ids);
        return NULL;
    }
    self->plan = plan;
    self->ids = ids;
    self->ids_view = NULL;
    return (PyObject *)self;
}

static void plan_dealloc(PlanObject *self)
{
    Py_XDECREF(self->ids_view);
    Py_XDECREF(self->ids);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *plan_mapped_ids(PlanObject *self, void *closure)
{
    (void)closure;
    if (!self->ids_view) {
        npy_intp dims[1] = {(npy_intp)self->plan.length};
        PyObject *a = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_INT64), 1, dims, NULL,
                                           PyBytes_AS_STRING(self->ids), 0 /* read-only */, NULL);
        if (!a) return NULL;
        Py_INCREF(self->ids);
        if (PyArray_SetBaseObject((PyArrayObject *)a, self->ids) < 0) {
            Py_DECREF(a);
            return NULL;
        }
        self->ids_view = a;
    }
    Py_INCREF(self->ids_view);
    return self->ids_view;
}

static PyObject *plan_fallback(PlanObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->plan.fallback);
}

#define PLAN_MEMBER(name, field, doc) {name, T_LONGLONG, offsetof(PlanObject, plan) + offsetof(lampe_plan, field), READONLY, doc}
static PyMemberDef plan_members[] = {
    PLAN_MEMBER("length", length, "L: the prompt length"),
    PLAN_MEMBER("window", window, "H: the local window"),
    PLAN_MEMBER("sink", sink, "T: the requested sink"),
    PLAN_MEMBER("mapping_length", mapping_length, "U: the mapping length"),
    PLAN_MEMBER("sink_size", sink_size, "R: the sink extended to the end of its chunk"),
    PLAN_MEMBER("bias_map", bias_map, "b1"),
    PLAN_MEMBER("bias_sink", bias_sink, "b2"),
    {"mode_code", T_INT, offsetof(PlanObject, plan) + offsetof(lampe_plan, mode), READONLY, "lampe_mode"},
    {"decode_code", T_INT, offsetof(PlanObject, plan) + offsetof(lampe_plan, decode), READONLY, "lampe_decode"},
    {NULL, 0, 0, 0, NULL}};

static PyGetSetDef plan_getset[] = {
    {"mapped_ids", (getter)plan_mapped_ids, NULL, "m[0..L-1], read-only int64", NULL},
    {"fallback", (getter)plan_fallback, NULL, "L < 2H: plain causal attention with true positions", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lampe._C.Plan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Plan(length, window, sink, mapping_length, decode=0, mode=0): an immutable LaMPE plan.",
    .tp_members = plan_members,
    .tp_getset = plan_getset,
    .tp_new = plan_new,
};

static const lampe_plan *plan_of(PyObject *o, const char *name)
{
    if (!PyObject_TypeCheck(o, &PlanType)) {
        PyErr_Format(PyExc_TypeError, "%s must be a lampe plan, got %s", name, Py_TYPE(o)->tp_name);
        return NULL;
    }
    return &((PlanObject *)o)->plan;
}

/* regions(plan, positions int64[n]) -> int64[n, 3, 6]: kind, mapped, lo, hi, qpos, shift; kind -1 absent */
static PyObject *py_regions(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *po, *poso;
    PyArrayObject *pos;
    if (!PyArg_ParseTuple(args, "OO:regions", &po, &poso)) return NULL;
    const lampe_plan *plan = plan_of(po, "plan");
    if (!plan || !check_array(poso, "positions", NPY_INT64, 1, &pos)) return NULL;
    const npy_intp n = PyArray_DIM(pos, 0);
    npy_intp dims[3] = {n, LAMPE_MAX_REGIONS, 6};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_INT64);
    if (!out) return NULL;
    int64_t *o = (int64_t *)PyArray_DATA(out);
    for (npy_intp i = 0; i < n; i++) {
        const int64_t position = *(const int64_t *)((const char *)PyArray_DATA(pos) + i * PyArray_STRIDE(pos, 0));
        lampe_region r[LAMPE_MAX_REGIONS];
        int cnt = 0, st = LAMPE_OK;
        if (position < 0)
            PyErr_Format(PyExc_ValueError, "position must be >= 0, got %lld", (long long)position);
        else if (plan->mode != LAMPE_MODE_LAMPE && position >= plan->length)
            PyErr_Format(PyExc_ValueError, "position %lld is beyond the planned length %lld: SelfExtend and ReRoPE "
                         "plans cover every position below their length (plan the total length)",
                         (long long)position, (long long)plan->length);
        else if ((st = lampe_plan_regions(plan, position, r, &cnt)) == LAMPE_ERR_DECODE_RANGE)
            PyErr_Format(PyExc_ValueError,
                         "position %lld is decode step %lld after a prompt of %lld tokens, but decode='authors' (the "
                         "authors' rule kpos = m[j]) is defined only for steps <= window = %lld; use decode='shifted'",
                         (long long)position, (long long)(position - plan->length + 1), (long long)plan->length,
                         (long long)plan->window);
        else if (st)
            raise_status(st, "position");
        if (PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
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

/* ------------------------------------------------------------------ kernel arguments */

/* The rotary arguments both kernels share: rotary_dim even in [0, D], inv_freq a contiguous
 * float32 array of rotary_dim / 2 entries, a known layout. */
static int check_rotary(PyObject *fo, long long rotary_dim, int layout, int64_t D, PyArrayObject **freq)
{
    if (!check_array(fo, "inv_freq", NPY_FLOAT32, 1, freq)) return 0;
    if (rotary_dim < 0 || rotary_dim > D || rotary_dim % 2) {
        PyErr_Format(PyExc_ValueError, "rotary_dim must be even and in [0, %lld], got %lld", (long long)D, rotary_dim);
        return 0;
    }
    if (PyArray_DIM(*freq, 0) != rotary_dim / 2 || !PyArray_IS_C_CONTIGUOUS(*freq)) {
        PyErr_Format(PyExc_ValueError, "inv_freq must be a contiguous float32 array of rotary_dim/2 = %lld entries, "
                     "got %lld", rotary_dim / 2, (long long)PyArray_DIM(*freq, 0));
        return 0;
    }
    if (layout != LAMPE_LAYOUT_HALF && layout != LAMPE_LAYOUT_INTERLEAVED) {
        PyErr_SetString(PyExc_ValueError, "layout must be 'half' or 'interleaved'");
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
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOLidpi:rope", kwlist, &so, &dso, &po, &fo, &rotary_dim, &layout,
                                     &amp, &bf16, &nth))
        return NULL;
    PyArrayObject *src, *dst, *pos, *freq;
    if (!check_array(so, "x", -1, 4, &src)) return NULL;
    const int dt = dtype_code(src, bf16, "x");
    if (dt < 0 || !check_array(dso, "out", PyArray_TYPE(src), 4, &dst) || !check_writeable(dst, "out")) return NULL;
    if (!same_shape(src, dst)) return PyErr_Format(PyExc_ValueError, "out must have the shape of x");
    /* dst may be src itself, but not a partial overlap (rows would be read after being written). */
    if (!same_or_disjoint(src, dst)) return PyErr_Format(PyExc_ValueError, "out must be x itself or not overlap it");
    const int64_t B = PyArray_DIM(src, 0), L = PyArray_DIM(src, 2), D = PyArray_DIM(src, 3);
    if (D < 1) return PyErr_Format(PyExc_ValueError, "x: head_dim must be >= 1");
    if (!check_rotary(fo, rotary_dim, layout, D, &freq)) return NULL;
    if (!check_array(po, "positions", NPY_INT64, -1, &pos)) return NULL;
    const int per_row = PyArray_NDIM(pos) == 2;
    if (!PyArray_IS_C_CONTIGUOUS(pos) || PyArray_NDIM(pos) < 1 || PyArray_NDIM(pos) > 2 ||
        PyArray_DIM(pos, PyArray_NDIM(pos) - 1) != L || (per_row && PyArray_DIM(pos, 0) != B))
        return PyErr_Format(PyExc_ValueError, "positions must be a contiguous int64 array [L=%lld] or [B=%lld, L]",
                            (long long)L, (long long)B);
    lampe_rope_params p = {0};
    p.src = PyArray_DATA(src);
    p.dst = PyArray_DATA(dst);
    p.dtype = dt;
    p.batch = B; p.heads = PyArray_DIM(src, 1); p.tokens = L; p.head_dim = D;
    p.src_stride_b = estride(src, 0); p.src_stride_h = estride(src, 1); p.src_stride_t = estride(src, 2);
    p.dst_stride_b = estride(dst, 0); p.dst_stride_h = estride(dst, 1); p.dst_stride_t = estride(dst, 2);
    p.positions = (const int64_t *)PyArray_DATA(pos);
    p.pos_stride_b = per_row ? L : 0;
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

/* The arrays of one attention call, checked. */
typedef struct {
    PyArrayObject *q, *k, *v, *out, *lse, *freq, *cos, *sin;
    int dtype;
} attn_arrays;

static int check_attn_arrays(PyObject *const *o, int bf16, long long rotary_dim, int layout, attn_arrays *a)
{
    /* o: q, k, v, out, lse, inv_freq, rope_cos, rope_sin */
    memset(a, 0, sizeof(*a));
    if (!check_array(o[0], "q", -1, 4, &a->q) || (a->dtype = dtype_code(a->q, bf16, "q")) < 0) return 0;
    const int type = PyArray_TYPE(a->q);
    if (!check_array(o[1], "k", type, 4, &a->k) || !check_array(o[2], "v", type, 4, &a->v) ||
        !check_array(o[3], "out", type, 4, &a->out) || !check_writeable(a->out, "out"))
        return 0;
    if (o[4] != Py_None && (!check_array(o[4], "lse", NPY_FLOAT32, 3, &a->lse) || !check_writeable(a->lse, "lse")))
        return 0;
    PyArrayObject *q = a->q, *k = a->k;
    const int64_t B = PyArray_DIM(q, 0), Hq = PyArray_DIM(q, 1), Lq = PyArray_DIM(q, 2), D = PyArray_DIM(q, 3);
    const int64_t Hkv = PyArray_DIM(k, 1), Lk = PyArray_DIM(k, 2);
    if (PyArray_DIM(k, 0) != B || PyArray_DIM(k, 3) != D || !same_shape(a->v, k) || !same_shape(a->out, q)) {
        PyErr_SetString(PyExc_ValueError, "k and v must have shape [B, Hkv, Lk, D] and out the shape of q");
        return 0;
    }
    if (a->lse && (PyArray_DIM(a->lse, 0) != B || PyArray_DIM(a->lse, 1) != Hq || PyArray_DIM(a->lse, 2) != Lq)) {
        PyErr_SetString(PyExc_ValueError, "lse must have shape [B, Hq, Lq]");
        return 0;
    }
    if (D < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || Hq / Hkv > LAMPE_MAX_GROUP) {
        PyErr_Format(PyExc_ValueError, "q, k: head_dim and head counts must be >= 1 and Hq a multiple of Hkv with at "
                     "most %d query heads per key/value head", LAMPE_MAX_GROUP);
        return 0;
    }
    if (Lq > Lk || Lk > LAMPE_MAX_POSITIONS) {
        PyErr_Format(PyExc_ValueError, "q may not have more positions than k, and k at most 2^25");
        return 0;
    }
    if (!disjoint(q, a->out) || !disjoint(k, a->out) || !disjoint(a->v, a->out)) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap q, k or v");
        return 0;
    }
    if (a->lse && (!disjoint(a->lse, a->out) || !disjoint(a->lse, q) || !disjoint(a->lse, k) || !disjoint(a->lse, a->v))) {
        PyErr_SetString(PyExc_ValueError, "lse must not overlap out, q, k or v");
        return 0;
    }
    if (!check_rotary(o[5], rotary_dim, layout, D, &a->freq)) return 0;
    if (o[6] != Py_None) {
        if (!check_array(o[6], "rope_cos", NPY_FLOAT32, 2, &a->cos) || !check_array(o[7], "rope_sin", NPY_FLOAT32, 2, &a->sin))
            return 0;
        if (!PyArray_IS_C_CONTIGUOUS(a->cos) || !same_shape(a->cos, a->sin) || PyArray_DIM(a->cos, 1) != rotary_dim / 2) {
            PyErr_SetString(PyExc_ValueError, "rope_cos/rope_sin must be contiguous [n, rotary_dim/2] tables");
            return 0;
        }
    }
    return 1;
}

/* Fill the kernel's parameter struct from checked arrays (the one place that does). */
static void set_attn_params(lampe_attn_params *p, const attn_arrays *a, const lampe_attn_seq *seqs, long long rotary_dim,
                            int layout, double amplitude, double scale, double softcap, int num_threads)
{
    memset(p, 0, sizeof(*p));
    p->q = PyArray_DATA(a->q);
    p->k = PyArray_DATA(a->k);
    p->v = PyArray_DATA(a->v);
    p->out = PyArray_DATA(a->out);
    p->lse = a->lse ? (float *)PyArray_DATA(a->lse) : NULL;
    p->dtype = a->dtype;
    p->batch = PyArray_DIM(a->q, 0);
    p->q_heads = PyArray_DIM(a->q, 1);
    p->q_len = PyArray_DIM(a->q, 2);
    p->head_dim = PyArray_DIM(a->q, 3);
    p->kv_heads = PyArray_DIM(a->k, 1);
    p->kv_len = PyArray_DIM(a->k, 2);
    for (int i = 0; i < 3; i++) {
        p->q_stride[i] = estride(a->q, i);
        p->k_stride[i] = estride(a->k, i);
        p->v_stride[i] = estride(a->v, i);
        p->out_stride[i] = estride(a->out, i);
        p->lse_stride[i] = a->lse ? estride(a->lse, i) : 0;
    }
    p->seqs = seqs;
    p->inv_freq = (const float *)PyArray_DATA(a->freq);
    p->rotary_dim = rotary_dim;
    p->layout = layout;
    p->rope_cos = a->cos ? (const float *)PyArray_DATA(a->cos) : NULL;
    p->rope_sin = a->sin ? (const float *)PyArray_DATA(a->sin) : NULL;
    p->rope_table_len = a->cos ? PyArray_DIM(a->cos, 0) : 0;
    p->amplitude = (float)amplitude;
    p->scale = (float)scale;
    p->softcap = (float)softcap;
    p->num_threads = num_threads;
}

/* Per batch row: key_offsets, key_counts, query_starts (int64 [B]) and plans (a list of B plans or
 * None), as lampe_attn_seq. The list keeps the plans alive for the call. */
static int build_seqs(PyObject *const *o, int64_t B, int64_t Lk, lampe_attn_seq *seqs)
{
    const int64_t *off, *cnt, *qst;
    if (!check_rows(o[0], "key_offsets", B, &off) || !check_rows(o[1], "key_counts", B, &cnt) ||
        !check_rows(o[2], "query_starts", B, &qst))
        return 0;
    if (!PyList_Check(o[3]) || PyList_GET_SIZE(o[3]) != B) {
        PyErr_Format(PyExc_TypeError, "plans must be a list of B = %lld entries (None or a plan)", (long long)B);
        return 0;
    }
    for (int64_t b = 0; b < B; b++) {
        PyObject *item = PyList_GET_ITEM(o[3], b);
        if (off[b] < 0 || off[b] > Lk || cnt[b] < 0 || cnt[b] > Lk - off[b]) {
            PyErr_Format(PyExc_ValueError, "row %lld: key_offsets must be in [0, Lk] and key_counts in [0, Lk - "
                         "key_offset]", (long long)b);
            return 0;
        }
        seqs[b] = (lampe_attn_seq){off[b], cnt[b], qst[b], NULL};
        if (item != Py_None && !(seqs[b].plan = plan_of(item, "plans[b]"))) return 0;
        if (seqs[b].plan && seqs[b].plan->decode != LAMPE_DECODE_SHIFTED) {
            PyErr_SetString(PyExc_NotImplementedError, "decode='authors' is supported only by plan.table()");
            return 0;
        }
    }
    return 1;
}

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"q", "k", "v", "out", "lse", "inv_freq", "rope_cos", "rope_sin", "key_offsets",
                             "key_counts", "query_starts", "plans", "rotary_dim", "layout", "amplitude", "scale",
                             "softcap", "bf16", "num_threads", NULL};
    PyObject *o[12];
    long long rotary_dim;
    int layout, bf16, nth;
    double amp, scale, softcap;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "$OOOOOOOOOOOOLidddpi:attention", kwlist, &o[0], &o[1], &o[2], &o[3],
                                     &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &rotary_dim, &layout,
                                     &amp, &scale, &softcap, &bf16, &nth))
        return NULL;
    attn_arrays a;
    if (!check_attn_arrays(o, bf16, rotary_dim, layout, &a)) return NULL;
    if (!(softcap >= 0.0 && softcap < 3.4e38))
        return PyErr_Format(PyExc_ValueError, "softcap must be a finite number >= 0 (0: none)");
    const int64_t B = PyArray_DIM(a.q, 0);
    lampe_attn_seq *seqs = (lampe_attn_seq *)PyMem_Malloc((size_t)(B ? B : 1) * sizeof(*seqs));
    if (!seqs) return PyErr_NoMemory();
    if (!build_seqs(o + 8, B, PyArray_DIM(a.k, 2), seqs)) {
        PyMem_Free(seqs);
        return NULL;
    }
    lampe_attn_params p;
    set_attn_params(&p, &a, seqs, rotary_dim, layout, amp, scale, softcap, nth);
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = lampe_attention(&p);
    Py_END_ALLOW_THREADS
    PyMem_Free(seqs);
    if (st == LAMPE_ERR_OVERFLOW) { /* PyErr_Format has no %g: format the number here */
        char msg[192];
        snprintf(msg, sizeof msg, "scale: a logit overflows float32 with scale=%g (scale * <q, k> is beyond 3.4e38 "
                 "for some finite q, k); use a smaller scale", scale);
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    if (st) return raise_status(st, "attention");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"available_isas", py_available_isas, METH_NOARGS, "ISAs compiled in and supported by this CPU."},
    {"current_isa", py_current_isa, METH_NOARGS, "The ISA kernels use now."},
    {"set_cpu_isa", py_set_cpu_isa, METH_VARARGS, "Cap the ISA (in-process)."},
    {"default_threads", py_default_threads, METH_NOARGS, "LAMPE_NUM_THREADS or the affinity count."},
    {"build_info", py_build_info, METH_NOARGS, "Compiler and flags of this build."},
    {"regions", py_regions, METH_VARARGS, "regions(plan, positions) -> int64 [n, 3, 6]"},
    {"mapping_length", py_mapping_length, METH_VARARGS, "mapping_length(length, preset[, window])"},
    {"sigmoid_params", py_sigmoid_params, METH_VARARGS, "sigmoid_params(preset[, window]) -> dict"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_VARARGS | METH_KEYWORDS, "Rotary application (keywords)."},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_VARARGS | METH_KEYWORDS,
     "Fused multi-grained attention (keywords)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "lampe._C", "lampe's C core.", -1, methods};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    if (PyType_Ready(&PlanType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(m, "Plan", (PyObject *)&PlanType) < 0) {
        Py_DECREF(&PlanType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_LENGTH", (long)LAMPE_MAX_LENGTH);
    PyModule_AddIntConstant(m, "MAX_POSITIONS", (long)LAMPE_MAX_POSITIONS);
    PyModule_AddIntConstant(m, "MAX_GROUP", (long)LAMPE_MAX_GROUP);
    PyModule_AddStringConstant(m, "C_VERSION", LAMPE_VERSION_STRING);
    return m;
}
