/*
 * internal.cuh - what the .cu files share: 16-bit element access, the workspace layout of an
 * attention call, the internal launchers, and launch-error bookkeeping. Device code only sees
 * lampe_cuda.h structs; nothing here is visible outside csrc/cuda.
 */
#ifndef LAMPE_CUDA_INTERNAL_CUH
#define LAMPE_CUDA_INTERNAL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lampe_cuda.h"
#include "plan.cuh"

#define LCU_LOG2E 1.4426950408889634f
#define LCU_LN2 0.6931471805599453f

/* Record the launch status of the kernels just enqueued; returns a lampe_cuda status. */
int lcu_check_launch(void);

/* float <-> the call's 16-bit element type (T = __nv_bfloat16 or __half). */
template <typename T> struct lcu_elem;
template <> struct lcu_elem<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    /* two floats -> one 32-bit register of two elements (low = a), for mma operands */
    static __device__ __forceinline__ uint32_t pack2(float a, float b)
    {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <> struct lcu_elem<__half> {
    static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ uint32_t pack2(float a, float b)
    {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

/* max that keeps NaN (fmaxf drops it): a NaN logit must reach the row's output (NaN policy). */
__device__ __forceinline__ float lcu_nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

/* cos/sin of the f32 angle of pair k at position pos, times amp; sincosf is the accurate
 * (not the intrinsic) routine: nothing here is built with --use_fast_math. */
__device__ __forceinline__ void lcu_cossin(int64_t pos, float inv_freq, float amp, float *c, float *s)
{
    float sn, cs;
    sincosf(lcu_angle(pos, inv_freq), &sn, &cs);
    *c = cs * amp;
    *s = sn * amp;
}

/* The same f32 angle, its cos/sin by a two-constant reduction to [-pi, pi] (fused multiply-adds:
 * about 1e-6 absolute for positions up to 2^17 x inv_freq) and the hardware sine/cosine units
 * (about 4e-7 absolute there). The row kernel rotates every key it reads with this - an accurate
 * sincosf per key and dim pair was most of its time, and beyond 105615 radians (inv_freq = 1 at
 * 128K) sincosf takes its slow exact path. Within bf16 scores, not bit-equal to the CPU kernel. */
__device__ __forceinline__ void lcu_cossin_fast(int64_t pos, float inv_freq, float *c, float *s)
{
    const float a = lcu_angle(pos, inv_freq);
    const float k = rintf(a * 0.15915493667125702f);
    float r = fmaf(-k, 6.2831854820251465f, a);
    r = fmaf(-k, -1.7484555314695172e-07f, r);
    __sincosf(r, s, c);
}

/* Workspace of one attention call, carved from p->workspace in this order. */
typedef struct lcu_workspace {
    void *k_true;     /* [B, Hkv, Lk, D] keys rotated by their own positions (prefill)      */
    void *k_map;      /* [B, Hkv, Lk, D] keys rotated by m(j) (prefill of mapped plans)      */
    float *part_o;    /* [B, rows, Hq, splits, D] split-KV partial outputs (unnormalised)    */
    float *part_ml;   /* [B, rows, Hq, splits, 2] their (max, sum) in log2 units             */
    size_t bytes;
} lcu_workspace;

lcu_workspace lcu_workspace_layout(const lampe_cuda_attn_params *p);

/* Internal launchers (attn_prefill.cu, attn_decode.cu, rope.cu). */
int lcu_rotate_keys(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream);
int lcu_prefill(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream);
int lcu_decode(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream);

/* Does any row need keys at mapped positions in the tiled kernel (LaMPE or a baseline)? */
static inline int lcu_needs_map(const lampe_cuda_attn_params *p) { return p->kind != LAMPE_CUDA_CAUSAL; }

#endif
