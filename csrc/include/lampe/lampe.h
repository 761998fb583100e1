/*
 * lampe.h - the C contract of lampe (Length-aware Multi-grained Positional Encoding).
 *
 * Plain C11: pointers, element strides, sizes and dtype codes. Nothing here knows about
 * Python, NumPy or torch; the CPython binding (csrc/python/module.c) and the C tests are
 * both clients of this header. Section numbers (§) refer to docs/spec.md.
 */
#ifndef LAMPE_H
#define LAMPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LAMPE_VERSION_STRING "0.1.0"

/* Longest supported prompt: the float32 mapping recipe (§1.1) is exact only up to 2^24. */
#define LAMPE_MAX_LENGTH ((int64_t)1 << 24)
/* Positions any query or key may have (and keys a call may hold): a prompt of up to 2^24 tokens
 * plus as many tokens after it. */
#define LAMPE_MAX_POSITIONS ((int64_t)1 << 25)

typedef enum {
    LAMPE_OK = 0,
    LAMPE_ERR_ARG = 1,          /* a size or enum is out of range; message names it      */
    LAMPE_ERR_SINK = 2,         /* the extended sink R violates 1 <= R <= L - H          */
    LAMPE_ERR_LENGTH = 3,       /* a plan above LAMPE_MAX_LENGTH, a position above LAMPE_MAX_POSITIONS */
    LAMPE_ERR_DECODE_RANGE = 4, /* decode "authors" asked for a step D > H               */
    LAMPE_ERR_NOMEM = 5,
    LAMPE_ERR_UNSUPPORTED = 6,  /* e.g. an ISA this CPU or build does not have           */
    LAMPE_ERR_OVERFLOW = 7      /* a logit of finite inputs overflows float32 (the scale) */
} lampe_status;

const char *lampe_status_string(int status);

/* ------------------------------------------------------------------ dtypes and ISAs */

typedef enum { LAMPE_F32 = 0, LAMPE_BF16 = 1, LAMPE_F16 = 2 } lampe_dtype;

/*
 * CPU kernel levels, in the order of lampe_set_isa's cap (each level's CPU features include the
 * lower ones' on every CPU that has it). The levels above avx512 differ only for bfloat16
 * inputs: float32 and float16 inputs run the avx512 float32 kernels there (AVX512-FP16 would
 * accumulate in fp16, which the reference tolerance does not allow).
 */
typedef enum {
    LAMPE_ISA_SCALAR = 0,
    LAMPE_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C                                            */
    LAMPE_ISA_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ                                           */
    LAMPE_ISA_AVX512BF16 = 3, /* + AVX512_BF16: bf16 products with VDPBF16PS (Zen 4, Cooper Lake+) */
    LAMPE_ISA_AMX = 4,        /* + AMX-TILE/AMX-BF16 and the OS's permission: bf16 products on
                                 AMX tiles (Sapphire Rapids+)                                  */
    LAMPE_ISA_COUNT = 5,
    /* Test levels, never chosen by the cap and never listed as available: the avx512bf16 and
     * amx kernels with VDPBF16PS and the AMX tile unit emulated exactly in plain AVX-512, so
     * their layouts and loops are tested on any AVX-512 CPU. Selected by name (lampe_set_isa,
     * LAMPE_CPU_ISA) where avx512 is available; several times slower than avx512. */
    LAMPE_ISA_AVX512BF16_EMU = 5,
    LAMPE_ISA_AMX_EMU = 6,
    LAMPE_ISA_ALL = 7
} lampe_isa;

/* Bit i set when level i < LAMPE_ISA_COUNT is both compiled in and supported by this CPU and OS
 * (CPUID + XGETBV, and for amx the Linux permission to use the tile data state). */
uint32_t lampe_isa_available_mask(void);
/* The level kernels run with now: the best available one not above the cap (LAMPE_CPU_ISA at
 * start, then lampe_set_isa), or the test level selected by name. */
lampe_isa lampe_isa_current(void);
/* Cap the choice at `isa` (in-process, for tests and benchmarks): LAMPE_ERR_UNSUPPORTED if that
 * level itself is unavailable (a test level: if avx512 is), LAMPE_ERR_ARG if it is no level. */
int lampe_set_isa(lampe_isa isa);
const char *lampe_isa_name(lampe_isa isa);
/* Parse "scalar", "avx2", "avx512", "avx512bf16", "amx", "avx512bf16-emu", "amx-emu"
 * (case-insensitive); -1 when unknown. */
int lampe_isa_from_name(const char *name);

/* ------------------------------------------------------------------ threads */

/* Default worker count: LAMPE_NUM_THREADS, else the process affinity count. */
int lampe_default_threads(void);

/* ------------------------------------------------------------------ position planner (§1-§2, §0) */

/*
 * LAMPE_MODE_LAMPE is LaMPE (§1-§2). The two baselines are position policies over the same
 * kernels, for like-for-like evaluation (every row is a "prompt row": plan the total length):
 *   LAMPE_MODE_SELFEXTEND (Jin et al. 2024, "LLM Maybe LongLM"): keys within `window` of the query
 *     keep true positions; farther keys get floor(j / G) with G = mapping_length ("group size"),
 *     the query floor(i / G) + window - floor(window / G).
 *   LAMPE_MODE_REROPE (Su 2023, "ReRoPE"): true positions within `window`; every farther key is
 *     seen at relative position `window` (query at `window`, key at 0).
 */
typedef enum { LAMPE_MODE_LAMPE = 0, LAMPE_MODE_SELFEXTEND = 1, LAMPE_MODE_REROPE = 2 } lampe_mode;
typedef enum { LAMPE_DECODE_SHIFTED = 0, LAMPE_DECODE_AUTHORS = 1 } lampe_decode;

typedef struct lampe_plan {
    int64_t length;         /* L: prompt length                               */
    int64_t window;         /* H                                              */
    int64_t sink;           /* T: requested sink ("tail")                     */
    int64_t mapping_length; /* U                                              */
    int32_t mode;           /* lampe_mode                                     */
    int32_t decode;         /* lampe_decode                                   */
    int64_t sink_size;      /* R: the sink extended to the end of its chunk   */
    int64_t bias_map;       /* b1                                             */
    int64_t bias_sink;      /* b2                                             */
    int32_t fallback;       /* L < 2H: plain causal with true positions       */
    const int64_t *mapped_ids; /* m[0..L-1]; storage owned by the caller      */
} lampe_plan;

/*
 * Fill `plan` for a prompt of `length` tokens, writing the mapped ids into `mapped_ids`
 * (caller storage of `length` int64). Errors: LAMPE_ERR_ARG (length, window, sink,
 * mapping_length < 1, unknown mode/decode), LAMPE_ERR_LENGTH (length or mapping_length above
 * LAMPE_MAX_LENGTH), LAMPE_ERR_SINK (L >= 2H and R outside [1, L - H]).
 */
int lampe_plan_make(lampe_plan *plan, int64_t length, int64_t window, int64_t sink,
                    int64_t mapping_length, int mode, int decode, int64_t *mapped_ids);

/* Just the float32 recipe of §1.1: m[p] = floor(f32(f32(f32(1/(L-1)) * U) * p)). */
int lampe_mapped_ids(int64_t length, int64_t mapping_length, int64_t *mapped_ids);

typedef enum {
    LAMPE_REGION_LOCAL = 0,
    LAMPE_REGION_MAP = 1,
    LAMPE_REGION_SINK = 2,
    LAMPE_REGION_FULL = 3
} lampe_region_kind;

/*
 * One region of one query row: keys key_lo..key_hi (inclusive, in the row's own positions)
 * seen from query position qpos; key j gets position kpos(j) = mapped ? m[j - shift] : j.
 */
typedef struct lampe_region {
    int32_t kind;
    int32_t mapped;
    int64_t key_lo;
    int64_t key_hi;
    int64_t qpos;
    int64_t shift;
} lampe_region;

#define LAMPE_MAX_REGIONS 3

/*
 * Regions of the query at `position` (>= 0): a prompt row when position < L, a row after the
 * prompt otherwise (§0; LAMPE_DECODE_AUTHORS follows the authors and refuses D > H with
 * LAMPE_ERR_DECODE_RANGE). Empty regions are omitted; order is local, map, sink (or full).
 */
int lampe_plan_regions(const lampe_plan *plan, int64_t position, lampe_region *out, int *count);

/* ------------------------------------------------------------------ mapping length (§4) */

typedef struct lampe_sigmoid {
    double a, b, lmax;
    int64_t threshold; /* lengths below it use `below` (0: none) */
    int64_t below;
} lampe_sigmoid;

/* Named presets "llama2", "llama3", "mistral", "llama3.1" with the authors' constants. */
int lampe_sigmoid_preset(const char *name, lampe_sigmoid *out);
/* U(L) = int(lmax / (1 + exp(-(a L + b)))) in float64, truncating (§4). */
int64_t lampe_sigmoid_eval(const lampe_sigmoid *s, int64_t length);
/* The generic rule for a model with pretrained window W (see docs/mapping_length.md). */
int lampe_sigmoid_generic(int64_t pretrained_window, lampe_sigmoid *out);

/* ------------------------------------------------------------------ rotary application */

typedef enum { LAMPE_LAYOUT_HALF = 0, LAMPE_LAYOUT_INTERLEAVED = 1 } lampe_layout;

/*
 * Rotate x[b, h, t, :] by position pos[b * pos_stride_b + t] (any sign) with angles
 * f32(f32(pos) * inv_freq[k]) and amplitude `amplitude` on the first rotary_dim dims; the
 * rest are copied. Rows are contiguous (stride 1 over the last dim); every other stride is in
 * elements and free. dst may equal src (in place) but must not partially overlap it.
 */
typedef struct lampe_rope_params {
    const void *src;
    void *dst;
    int32_t dtype; /* lampe_dtype of src and dst */
    int64_t batch, heads, tokens, head_dim;
    int64_t src_stride_b, src_stride_h, src_stride_t;
    int64_t dst_stride_b, dst_stride_h, dst_stride_t;
    const int64_t *positions;
    int64_t pos_stride_b; /* 0: one position row shared by the batch */
    const float *inv_freq; /* rotary_dim / 2 entries */
    int64_t rotary_dim;
    int32_t layout;
    float amplitude;
    int32_t num_threads; /* <= 0: lampe_default_threads() */
} lampe_rope_params;

int lampe_rope(const lampe_rope_params *p);

/* ------------------------------------------------------------------ multi-grained attention */

/*
 * Per batch row b. Keys have tensor indices 0..kv_len-1; the row's own positions count from its
 * first valid key: key tensor index j has own position j - key_offset.
 *   key_offset   first valid key (the number of left pads);
 *   key_count    valid keys from there: keys at tensor index >= key_offset + key_count (right
 *                padding, the unused tail of a static cache) are never attended;
 *   query_start  own position of query row t = 0; row t has position query_start + t and attends
 *                the valid keys whose own position is <= its position (restricted further by the
 *                plan's regions). A row whose position is < 0, or that sees no valid key, outputs
 *                zeros and lse = -inf;
 *   plan         the row's LaMPE plan, or NULL for plain causal attention with true positions and
 *                amplitude 1 (config=None). A SelfExtend or ReRoPE plan must cover every query
 *                row: plan->length >= query_start + q_len.
 * What callers pass when they have no reason to differ (and what lampe.attention fills in):
 * key_count = kv_len - key_offset, query_start = kv_len - q_len - key_offset (queries are the
 * last q_len positions).
 */
typedef struct lampe_attn_seq {
    int64_t key_offset;
    int64_t key_count;
    int64_t query_start;
    const lampe_plan *plan;
} lampe_attn_seq;

/* Most query heads per key/value head (G = q_heads / kv_heads) one work item holds. */
#define LAMPE_MAX_GROUP 4096

typedef struct lampe_attn_params {
    const void *q, *k, *v; /* q [B, Hq, Lq, Dh]; k, v [B, Hkv, Lk, Dh]; rows contiguous */
    void *out;             /* [B, Hq, Lq, Dh], same dtype as q                           */
    float *lse;            /* [B, Hq, Lq] natural-log LSE, or NULL                        */
    int32_t dtype;
    int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3]; /* b, h, t (elements) */
    int64_t lse_stride[3];
    const lampe_attn_seq *seqs; /* [batch] */
    const float *inv_freq;      /* rotary_dim / 2 entries */
    int64_t rotary_dim;
    int32_t layout;
    /* Optional cache of cos/sin(f32(pos * inv_freq[k])) for pos in [0, rope_table_len), rows of
     * rotary_dim / 2; positions outside it are computed on the fly. Saves the trigonometry that
     * would otherwise dominate decode steps. */
    const float *rope_cos, *rope_sin;
    int64_t rope_table_len;
    float amplitude; /* temperature s for LaMPE rows; ignored when seqs[b].plan == NULL        */
    float scale;     /* softmax scale, e.g. 1/sqrt(Dh)                                         */
    /* Logit soft-capping (Gemma 2), 0 = none: every logit x = scale * <q, k> (after rotation and
     * the amplitude) becomes softcap * tanh(x / softcap) before the softmax, in every row. */
    float softcap;
    int32_t num_threads;
} lampe_attn_params;

/*
 * NaN policy: a row that attends a NaN or +-inf element (its query row, or the key or value row
 * of a key in its regions) outputs NaN in every component and lse = NaN, on every ISA; elements
 * of keys a row does not attend never affect it. Finite inputs whose logit overflows float32
 * (scale * <q, k> beyond 3.4e38) make the call return LAMPE_ERR_OVERFLOW.
 */
int lampe_attention(const lampe_attn_params *p);

#ifdef __cplusplus
}
#endif
#endif /* LAMPE_H */
