/*
 * attention.cu - lampe_cuda_attention: validation, workspace layout and the launch order
 * (plan rows are made beforehand by lampe_cuda_plan_rows):
 *   1. keys rotated once per call into k_true / k_map (rope.cu) - only when the tiled kernel runs;
 *   2. the tiled tensor-core kernel over prompt rows (attn_prefill.cu);
 *   3. the split-KV row kernel and its merge over the remaining rows (attn_decode.cu).
 * All on one stream, no host synchronisation, no allocation.
 */
#include "internal.cuh"

static size_t lcu_align(size_t n) { return (n + 255) / 256 * 256; }

static int lcu_uses_prefill(const lampe_cuda_attn_params *p) { return !p->all_decode && p->prefill_rows > 0; }

lcu_workspace lcu_workspace_layout(const lampe_cuda_attn_params *p)
{
    lcu_workspace ws = {nullptr, nullptr, nullptr, nullptr, 0};
    char *base = static_cast<char *>(p->workspace);
    size_t at = 0;
    const size_t kbytes = lcu_align((size_t)(p->batch * p->kv_heads * p->kv_len * p->head_dim) * 2);
    if (lcu_uses_prefill(p)) {
        ws.k_true = base ? base + at : nullptr;
        at += kbytes;
        if (lcu_needs_map(p)) {
            ws.k_map = base ? base + at : nullptr;
            at += kbytes;
        }
    }
    if (p->splits > 1 && p->decode_first < p->q_len) {
        const size_t items = (size_t)(p->batch * (p->q_len - p->decode_first) * p->q_heads) * (size_t)p->splits;
        ws.part_o = base ? reinterpret_cast<float *>(base + at) : nullptr;
        at += lcu_align(items * (size_t)p->head_dim * 4);
        ws.part_ml = base ? reinterpret_cast<float *>(base + at) : nullptr;
        at += lcu_align(items * 2 * 4);
    }
    ws.bytes = at;
    return ws;
}

extern "C" size_t lampe_cuda_attention_workspace(const lampe_cuda_attn_params *p)
{
    return p ? lcu_workspace_layout(p).bytes : 0;
}

extern "C" int lampe_cuda_attention_supported(int64_t head_dim, int64_t group, int64_t rotary_dim, int interleaved)
{
    if (head_dim != 64 && head_dim != 128 && head_dim != 256) return 0;
    (void)interleaved; /* both layouts, any even rotary dim: the kernels pair dims per element */
    if (group < 1 || rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2) return 0;
    return 1;
}

extern "C" int32_t lampe_cuda_decode_splits(const lampe_cuda_attn_params *p)
{
    static int sms[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
    if (!sms[dev] && cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        sms[dev] = 0;
        return 1;
    }
    const int64_t rows = p->q_len - p->decode_first;
    if (rows <= 0) return 1;
    const int64_t gmax = p->head_dim == 256 ? 4 : 16, G = p->q_heads / p->kv_heads;
    const int64_t ctas = p->batch * rows * p->kv_heads * ((G + gmax - 1) / gmax);
    int64_t s = (2 * (int64_t)sms[dev] + ctas - 1) / ctas;
    const int64_t by_keys = p->kv_len / 256;
    if (s > by_keys) s = by_keys;
    if (s > 64) s = 64;
    return (int32_t)(s < 1 ? 1 : s);
}

extern "C" int lampe_cuda_attention(const lampe_cuda_attn_params *p, cudaStream_t stream)
{
    if (!p || !p->q || !p->k || !p->v || !p->out || !p->seqs) return LAMPE_CUDA_ERR_ARG;
    if (p->dtype != LAMPE_CUDA_BF16 && p->dtype != LAMPE_CUDA_F16) return LAMPE_CUDA_ERR_ARG;
    if (p->batch < 0 || p->q_len < 0 || p->kv_len < 0 || p->q_heads < 1 || p->kv_heads < 1) return LAMPE_CUDA_ERR_ARG;
    if (p->q_heads % p->kv_heads || p->q_len > p->kv_len) return LAMPE_CUDA_ERR_ARG;
    if (p->rotary_dim > 0 && !p->inv_freq) return LAMPE_CUDA_ERR_ARG;
    if (!lampe_cuda_attention_supported(p->head_dim, p->q_heads / p->kv_heads, p->rotary_dim, p->interleaved))
        return LAMPE_CUDA_ERR_UNSUPPORTED;
    if (p->kv_len > 2 * LAMPE_CUDA_MAX_LENGTH) return LAMPE_CUDA_ERR_LENGTH;
    if (p->splits < 1 || p->decode_first < 0 || p->prefill_rows < 0 || p->prefill_rows > p->q_len)
        return LAMPE_CUDA_ERR_ARG;
    if (p->batch == 0 || p->q_len == 0) return LAMPE_CUDA_OK;
    const lcu_workspace ws = lcu_workspace_layout(p);
    if (ws.bytes && !p->workspace) return LAMPE_CUDA_ERR_ARG;
    int st = LAMPE_CUDA_OK;
    if (lcu_uses_prefill(p)) {
        st = lcu_rotate_keys(p, &ws, stream);
        if (st == LAMPE_CUDA_OK) st = lcu_prefill(p, &ws, stream);
    }
    if (st == LAMPE_CUDA_OK) st = lcu_decode(p, &ws, stream);
    return st;
}
