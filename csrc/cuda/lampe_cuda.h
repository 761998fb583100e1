/*
 * lampe_cuda.h - the C contract of lampe's CUDA kernels (the optional module lampe._cuda).
 *
 * Same style as csrc/include/lampe/lampe.h: plain structs of device pointers, element strides,
 * sizes and dtype codes, a cudaStream_t, status codes. No torch and no CUDA header is needed to
 * include it: csrc/cuda/binding.cpp (the only file that knows torch) fills these structs, and the
 * .cu files implement them. Every launcher only enqueues work on `stream`: none allocates, copies
 * from the host or synchronises, so calls are safe inside CUDA-graph capture.
 */
#ifndef LAMPE_CUDA_H
#define LAMPE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The runtime's own definition (driver_types.h); repeating an identical typedef is allowed. */
typedef struct CUstream_st *cudaStream_t;

#define LAMPE_CUDA_MAX_LENGTH ((int64_t)1 << 24) /* = LAMPE_MAX_LENGTH (§1.1 is exact to 2^24) */

/* Status codes: the values of lampe_status (lampe.h) plus CUDA launch failures. */
enum {
    LAMPE_CUDA_OK = 0,
    LAMPE_CUDA_ERR_ARG = 1,
    LAMPE_CUDA_ERR_SINK = 2,
    LAMPE_CUDA_ERR_LENGTH = 3,
    LAMPE_CUDA_ERR_UNSUPPORTED = 6,
    LAMPE_CUDA_ERR_LAUNCH = 100 /* cudaGetLastError() after a launch; see lampe_cuda_last_error() */
};

/* dtype codes, as lampe_dtype: only the two 16-bit types have kernels. */
enum { LAMPE_CUDA_BF16 = 1, LAMPE_CUDA_F16 = 2 };

/* Position policy of a call (the op's `mode`). */
enum { LAMPE_CUDA_CAUSAL = 0, LAMPE_CUDA_LAMPE = 1, LAMPE_CUDA_SELFEXTEND = 2, LAMPE_CUDA_REROPE = 3 };

/* The call's configuration: the same for every batch row. */
typedef struct lampe_cuda_cfg {
    int32_t kind;           /* LAMPE_CUDA_CAUSAL / _LAMPE / _SELFEXTEND / _REROPE            */
    int64_t window, sink;   /* H, T                                                          */
    int64_t mapping_length; /* U > 0 fixed (SelfExtend: the group size); 0: the sigmoid below */
    double sig_a, sig_b, sig_lmax;
    int64_t sig_threshold, sig_below;
} lampe_cuda_cfg;

/* One batch row as the kernels see it: made on the device by lampe_cuda_plan_rows. */
typedef struct lampe_cuda_seq {
    int64_t key_offset;  /* left pads: tensor index of the first valid key                 */
    int64_t key_count;   /* valid keys from there                                          */
    int64_t query_start; /* own position of query row t = 0                                */
    int64_t length;      /* L, the plan's prompt length (0: no plan)                       */
    int64_t window, mapping_length, sink_size, bias_map, bias_sink; /* H, U, R, b1, b2     */
    float ratio;         /* r = f32(f32(1 / (L - 1)) * U): m(p) = floor(f32(r * p))         */
    int32_t kind, fallback;
    int32_t status;      /* lampe status: != 0 means the row cannot be planned (outputs NaN) */
} lampe_cuda_seq;

/* ------------------------------------------------------------------ planning */

#define LAMPE_CUDA_PLAN_ROWS 64 /* batch rows per lampe_cuda_plan_rows launch (host values by value) */

typedef struct lampe_cuda_plan_params {
    lampe_cuda_cfg cfg;
    int64_t batch, q_len, kv_len;
    const uint8_t *mask;        /* key_padding_mask [B, Lk] (bool, True = valid) or NULL */
    int64_t mask_stride[2];
    /* Host values per batch row (index b - first_row of each launch), given by value so a
     * captured graph needs no host memory: prompt_length in tensor-index units (< 0: default,
     * the valid keys) and query_start in own positions (INT64_MIN: default Lk - Lq - off). */
    int64_t prompt_length[LAMPE_CUDA_PLAN_ROWS];
    int64_t query_start[LAMPE_CUDA_PLAN_ROWS];
    int64_t first_row, rows;
    lampe_cuda_seq *seqs;       /* device output [batch]                                 */
} lampe_cuda_plan_params;

int lampe_cuda_plan_rows(const lampe_cuda_plan_params *p, cudaStream_t stream);

/* ------------------------------------------------------------------ rotary */

/*
 * dst[b, h, t, :] = x rotated by positions[b * pos_stride_b + t] (int64, device) with angles
 * f32(f32(pos) * inv_freq[k]) on the first rotary_dim dims (amplitude on cos and sin); other dims
 * are copied. Rows are contiguous; every other stride is in elements. dst may equal src.
 */
typedef struct lampe_cuda_rope_params {
    const void *src;
    void *dst;
    int32_t dtype; /* LAMPE_CUDA_BF16 / _F16, or 0 for float32 */
    int64_t batch, heads, tokens, head_dim;
    int64_t src_stride[3], dst_stride[3];
    const int64_t *positions;
    int64_t pos_stride_b;
    const float *inv_freq; /* device, rotary_dim / 2 entries */
    int64_t rotary_dim;
    int32_t interleaved;
    float amplitude;
} lampe_cuda_rope_params;

int lampe_cuda_rope(const lampe_cuda_rope_params *p, cudaStream_t stream);

/* ------------------------------------------------------------------ attention */

/*
 * Fused multi-grained attention (spec §0-§2, the contract extension of docs/kernels.md):
 * q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] un-rotated, rows contiguous and 16-byte aligned;
 * out [B, Hq, Lq, D] (q's dtype), lse [B, Hq, Lq] float32 (natural log). One exact softmax per
 * row over the multiset of its (region, key) visits, float32 accumulation.
 *
 * Work is split between two kernels by lcu_row_is_decode (plan.cuh): a tiled tensor-core kernel
 * for prompt rows (mma.sync, keys rotated once per call into k_true / k_map) and a split-KV row
 * kernel (G query heads per KV head, log-sum-exp merge) for rows after the prompt and for calls
 * with few query rows. `workspace` is scratch of lampe_cuda_attention_workspace() bytes.
 */
typedef struct lampe_cuda_attn_params {
    const void *q, *k, *v;
    void *out;
    float *lse;
    int32_t dtype;
    int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], lse_stride[3];
    const lampe_cuda_seq *seqs; /* device [batch], from lampe_cuda_plan_rows */
    int32_t kind;               /* the cfg's kind (rows agree)              */
    const float *inv_freq;      /* device, rotary_dim / 2 entries            */
    int64_t rotary_dim;
    int32_t interleaved;
    float amplitude; /* temperature s of LaMPE/baseline rows (1 for causal)     */
    float scale;     /* softmax scale                                           */
    float softcap;   /* 0: none; else logits x -> softcap * tanh(x / softcap)   */
    /* Row ranges each kernel is launched over (host bounds; the device decides per row). */
    int64_t prefill_rows; /* rows [0, prefill_rows) go to the tiled kernel's grid   */
    int64_t decode_first; /* rows [decode_first, q_len) go to the row kernel's grid */
    int32_t all_decode;   /* 1: the row kernel owns every row                       */
    int32_t splits;       /* key splits of the row kernel (1: no merge)              */
    void *workspace;
} lampe_cuda_attn_params;

/* Bytes of workspace a call needs (rotated key copies and split-KV partials), 256-aligned. */
size_t lampe_cuda_attention_workspace(const lampe_cuda_attn_params *p);
/* Key splits for the row kernel's rows [decode_first, q_len): enough CTAs to fill the device
 * (its SM count is queried once per device), at least 256 keys per split, at most 64 splits. */
int32_t lampe_cuda_decode_splits(const lampe_cuda_attn_params *p);
/* 1 when the kernels support this head dim / group size / rotary dim (else: torch fallback). */
int lampe_cuda_attention_supported(int64_t head_dim, int64_t group, int64_t rotary_dim, int interleaved);
int lampe_cuda_attention(const lampe_cuda_attn_params *p, cudaStream_t stream);

/* Message of the last CUDA error a launcher saw on this thread (after LAMPE_CUDA_ERR_LAUNCH). */
const char *lampe_cuda_last_error(void);
/* Architectures this module was compiled for, e.g. "sm_80 sm_90". */
const char *lampe_cuda_arch_list(void);

#ifdef __cplusplus
}
#endif
#endif /* LAMPE_CUDA_H */
