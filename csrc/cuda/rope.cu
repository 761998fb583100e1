/*
 * rope.cu - rotary embedding on the GPU: lampe_cuda_rope (lampe.rope on CUDA tensors) and the
 * once-per-call key rotation of the tiled attention kernel (k_true, k_map).
 *
 * One thread per (row, rotary pair) plus the pass-through dims; angles are f32(f32(pos) * f)
 * exactly as on the CPU (plan.cuh lcu_angle), cos/sin by the accurate sincosf.
 */
#include "internal.cuh"

template <typename T> __device__ __forceinline__ float lcu_ld(const void *base, int64_t i)
{
    return lcu_elem<T>::to_float(static_cast<const T *>(base)[i]);
}
template <> __device__ __forceinline__ float lcu_ld<float>(const void *base, int64_t i)
{
    return static_cast<const float *>(base)[i];
}
template <typename T> __device__ __forceinline__ void lcu_st(void *base, int64_t i, float x)
{
    static_cast<T *>(base)[i] = lcu_elem<T>::from_float(x);
}
template <> __device__ __forceinline__ void lcu_st<float>(void *base, int64_t i, float x)
{
    static_cast<float *>(base)[i] = x;
}

/* grid-stride over rows x (pairs + pass-through dims) */
template <typename T> __global__ void lcu_rope_kernel(const lampe_cuda_rope_params p)
{
    const int64_t n2 = p.rotary_dim / 2, rest = p.head_dim - p.rotary_dim, per_row = n2 + rest;
    const int64_t rows = p.batch * p.heads * p.tokens;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < rows * per_row;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = idx / per_row, e = idx % per_row;
        const int64_t t = row % p.tokens, bh = row / p.tokens, h = bh % p.heads, b = bh / p.heads;
        const int64_t so = b * p.src_stride[0] + h * p.src_stride[1] + t * p.src_stride[2];
        const int64_t dof = b * p.dst_stride[0] + h * p.dst_stride[1] + t * p.dst_stride[2];
        if (e >= n2) { /* pass-through dim */
            const int64_t d = p.rotary_dim + (e - n2);
            lcu_st<T>(p.dst, dof + d, lcu_ld<T>(p.src, so + d));
            continue;
        }
        int d1, d2;
        lcu_pair_dims((int)e, (int)p.rotary_dim, p.interleaved, &d1, &d2);
        const int64_t pos = p.positions[b * p.pos_stride_b + t];
        float c, s;
        lcu_cossin(pos, p.inv_freq[e], p.amplitude, &c, &s);
        const float x1 = lcu_ld<T>(p.src, so + d1), x2 = lcu_ld<T>(p.src, so + d2);
        lcu_st<T>(p.dst, dof + d1, x1 * c - x2 * s);
        lcu_st<T>(p.dst, dof + d2, x2 * c + x1 * s);
    }
}

static unsigned lcu_blocks(int64_t work, int threads)
{
    int64_t b = (work + threads - 1) / threads;
    if (b > 65535LL * 8) b = 65535LL * 8;
    return (unsigned)(b < 1 ? 1 : b);
}

extern "C" int lampe_cuda_rope(const lampe_cuda_rope_params *p, cudaStream_t stream)
{
    if (!p || !p->src || !p->dst || !p->positions) return LAMPE_CUDA_ERR_ARG;
    if (p->head_dim < 1 || p->rotary_dim < 0 || p->rotary_dim > p->head_dim || p->rotary_dim % 2) return LAMPE_CUDA_ERR_ARG;
    if (p->rotary_dim > 0 && !p->inv_freq) return LAMPE_CUDA_ERR_ARG;
    const int64_t work = p->batch * p->heads * p->tokens * (p->rotary_dim / 2 + p->head_dim - p->rotary_dim);
    if (work == 0) return LAMPE_CUDA_OK;
    const unsigned blocks = lcu_blocks(work, 256);
    switch (p->dtype) {
    case LAMPE_CUDA_BF16: lcu_rope_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(*p); break;
    case LAMPE_CUDA_F16: lcu_rope_kernel<__half><<<blocks, 256, 0, stream>>>(*p); break;
    case 0: lcu_rope_kernel<float><<<blocks, 256, 0, stream>>>(*p); break;
    default: return LAMPE_CUDA_ERR_ARG;
    }
    return lcu_check_launch();
}

/*
 * Keys of the tiled attention kernel, rotated once per call (amplitude 1: the kernel puts s^2 on
 * the query): k_true[j] by the key's own position, k_map[j] by m(own) for keys inside the plan.
 * Keys no prompt row can see in a rotation are written as zeros (never read unmasked).
 * Output rows are contiguous [B, Hkv, Lk, D].
 */
template <typename T> __global__ void lcu_rotate_keys_kernel(const lampe_cuda_attn_params p, T *k_true, T *k_map)
{
    const int64_t D = p.head_dim, n2 = p.rotary_dim / 2, per_row = n2 + (D - p.rotary_dim);
    const int64_t rows = p.batch * p.kv_heads * p.kv_len;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < rows * per_row;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = idx / per_row, e = idx % per_row;
        const int64_t j = row % p.kv_len, bh = row / p.kv_len, h = bh % p.kv_heads, b = bh / p.kv_heads;
        const lampe_cuda_seq s = p.seqs[b];
        const T *src = static_cast<const T *>(p.k) + b * p.k_stride[0] + h * p.k_stride[1] + j * p.k_stride[2];
        T *dt = k_true + row * D;
        T *dm = k_map ? k_map + row * D : nullptr;
        const int64_t own = j - s.key_offset;
        const bool valid = own >= 0 && own < s.key_count;
        const bool in_map = valid && dm && s.kind != LAMPE_CUDA_CAUSAL && own < s.length;
        const T zero = lcu_elem<T>::from_float(0.0f);
        if (e >= n2) {
            const int64_t d = p.rotary_dim + (e - n2);
            dt[d] = valid ? src[d] : zero;
            if (dm) dm[d] = in_map ? src[d] : zero;
            continue;
        }
        int d1, d2;
        lcu_pair_dims((int)e, (int)p.rotary_dim, p.interleaved, &d1, &d2);
        const float x1 = lcu_elem<T>::to_float(src[d1]), x2 = lcu_elem<T>::to_float(src[d2]);
        float c, sn;
        if (valid) {
            lcu_cossin(own, p.inv_freq[e], 1.0f, &c, &sn);
            dt[d1] = lcu_elem<T>::from_float(x1 * c - x2 * sn);
            dt[d2] = lcu_elem<T>::from_float(x2 * c + x1 * sn);
        } else {
            dt[d1] = dt[d2] = zero;
        }
        if (!dm) continue;
        if (in_map) {
            lcu_cossin(lcu_mapped_id(&s, own), p.inv_freq[e], 1.0f, &c, &sn);
            dm[d1] = lcu_elem<T>::from_float(x1 * c - x2 * sn);
            dm[d2] = lcu_elem<T>::from_float(x2 * c + x1 * sn);
        } else {
            dm[d1] = dm[d2] = zero;
        }
    }
}

int lcu_rotate_keys(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream)
{
    const int64_t work = p->batch * p->kv_heads * p->kv_len * (p->rotary_dim / 2 + p->head_dim - p->rotary_dim);
    if (work == 0) return LAMPE_CUDA_OK;
    const unsigned blocks = lcu_blocks(work, 256);
    if (p->dtype == LAMPE_CUDA_BF16)
        lcu_rotate_keys_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
            *p, static_cast<__nv_bfloat16 *>(ws->k_true), static_cast<__nv_bfloat16 *>(ws->k_map));
    else
        lcu_rotate_keys_kernel<__half><<<blocks, 256, 0, stream>>>(*p, static_cast<__half *>(ws->k_true),
                                                                 static_cast<__half *>(ws->k_map));
    return lcu_check_launch();
}
