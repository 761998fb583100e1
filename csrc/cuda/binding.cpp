/*
 * binding.cpp - lampe._cuda: the torch side of the CUDA kernels, and the only file of csrc/cuda
 * that includes torch. It turns tensors into the plain structs of lampe_cuda.h (validation, host
 * metadata, workspace from torch's caching allocator, the current stream) and calls the C
 * launchers; no algorithm lives here.
 *
 * Ops:
 *   lampe_cuda::attention  - the schema of lampe::attention (docs/cuda.md), CUDA kernel;
 *   lampe_cuda::rope       - rotary embedding of a [B, H, L, D] tensor by int64 positions;
 *   lampe::attention, key CUDA - registered by register_attention(), which lampe/cuda.py calls
 *     after checking that lampe::attention has the schema this file implements. A static
 *     TORCH_LIBRARY_IMPL would run at load time, and a schema mismatch there (an older
 *     lampe/torch_ops.py) would abort the process instead of letting lampe fall back.
 * Shapes or dtypes the kernels do not cover go to lampe_cuda::attention_torch, the pure-torch
 * backend that lampe/cuda.py registers, so every call through the op gets an answer.
 *
 * Only headers of the CPU wheel are used (no c10/cuda, no ATen/cuda): the stream comes from the
 * device-generic VirtualGuardImpl, so CI can syntax-check this file without a CUDA torch.
 */
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <climits>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "lampe_cuda.h"
#include "plan.cuh"

#ifndef LAMPE_TORCH_VERSION
#define LAMPE_TORCH_VERSION "unknown"
#endif

namespace {

using AttnResult = std::tuple<at::Tensor, at::Tensor>;
using AttnSig = AttnResult(const at::Tensor &, const at::Tensor &, const at::Tensor &, const at::Tensor &,
                           const std::optional<at::Tensor> &, const std::optional<at::Tensor> &,
                           const std::optional<at::Tensor> &, c10::string_view, int64_t, int64_t, int64_t,
                           c10::ArrayRef<double>, double, double, int64_t, bool, double, int64_t);

#define LCU_ATTENTION_ARGS                                                                                 \
    "(Tensor q, Tensor k, Tensor v, Tensor inv_freq, Tensor? prompt_length, Tensor? key_padding_mask, "      \
    "Tensor? query_start, str mode, int window, int sink, int mapping_length, float[] sigmoid, "          \
    "float temperature, float softcap, int rotary_dim, bool interleaved, float scale, int num_threads) "  \
    "-> (Tensor, Tensor)"

/* Rows with fewer query rows than this go entirely to the split-KV row kernel. */
constexpr int64_t kAllDecodeMaxRows = 8;

cudaStream_t current_stream(const at::Device &device)
{
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

std::string status_text(int st)
{
    switch (st) {
    case LAMPE_CUDA_ERR_ARG: return "invalid argument";
    case LAMPE_CUDA_ERR_SINK: return "sink: the extended sink R must satisfy 1 <= R <= L - window";
    case LAMPE_CUDA_ERR_LENGTH: return "length above 2^24 tokens";
    case LAMPE_CUDA_ERR_UNSUPPORTED: return "shape not supported by the CUDA kernels";
    case LAMPE_CUDA_ERR_LAUNCH: return std::string("CUDA launch failed: ") + lampe_cuda_last_error();
    default: return "unknown error " + std::to_string(st);
    }
}

int kind_of(c10::string_view mode)
{
    if (mode == "causal") return LAMPE_CUDA_CAUSAL;
    if (mode == "lampe" || mode == "reference") return LAMPE_CUDA_LAMPE; /* "reference": old spelling */
    if (mode == "selfextend") return LAMPE_CUDA_SELFEXTEND;
    if (mode == "rerope") return LAMPE_CUDA_REROPE;
    TORCH_CHECK_VALUE(false, "mode must be 'causal', 'lampe', 'selfextend' or 'rerope', got '", std::string(mode), "'");
    return -1;
}

/* Kernels read rows with 16-byte vector loads: unit last stride, other strides in multiples of
 * 8 elements, a 16-byte aligned base. Anything else is copied once. */
at::Tensor kernel_ready(const at::Tensor &x)
{
    bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    for (int d = 0; d < x.dim() - 1 && ok; d++) ok = x.size(d) == 1 || x.stride(d) % 8 == 0;
    return ok ? x : x.contiguous();
}

std::vector<int64_t> host_rows(const std::optional<at::Tensor> &t, int64_t B, const char *name, int64_t dflt)
{
    std::vector<int64_t> out(B, dflt);
    if (!t.has_value()) return out;
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be an int64 tensor [B], got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, name, " must have shape [B] = [", B, "], got ", t->sizes());
    /* host metadata by contract (CPU tensors); a device tensor costs one synchronisation here */
    const at::Tensor h = t->device().is_cpu() ? t->contiguous() : t->to(at::kCPU).contiguous();
    const int64_t *p = h.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++) out[b] = p[b];
    return out;
}

AttnResult attention_fallback(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &f,
                              const std::optional<at::Tensor> &pl, const std::optional<at::Tensor> &mask,
                              const std::optional<at::Tensor> &qs, c10::string_view mode, int64_t window, int64_t sink,
                              int64_t mapping_length, c10::ArrayRef<double> sigmoid, double temperature,
                              double softcap, int64_t rotary_dim, bool interleaved, double scale, int64_t num_threads)
{
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lampe_cuda::attention_torch", "").typed<AttnSig>();
    return op.call(q, k, v, f, pl, mask, qs, mode, window, sink, mapping_length, sigmoid, temperature, softcap,
                   rotary_dim, interleaved, scale, num_threads);
}

AttnResult attention_cuda(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                          const at::Tensor &inv_freq, const std::optional<at::Tensor> &prompt_length,
                          const std::optional<at::Tensor> &key_padding_mask, const std::optional<at::Tensor> &query_start,
                          c10::string_view mode, int64_t window, int64_t sink, int64_t mapping_length,
                          c10::ArrayRef<double> sigmoid, double temperature, double softcap, int64_t rotary_dim,
                          bool interleaved, double scale, int64_t num_threads)
{
    TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
                      "q, k and v must be 4-D: [B, H, L, head_dim]");
    TORCH_CHECK_VALUE(q_in.is_cuda() && k_in.device() == q_in.device() && v_in.device() == q_in.device(),
                      "q, k and v must be on one CUDA device");
    TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                     "q, k and v must share one dtype");
    const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
    const int64_t Hkv = k_in.size(1), Lk = k_in.size(2);
    TORCH_CHECK_VALUE(k_in.size(0) == B && k_in.size(3) == D && v_in.sizes() == k_in.sizes(),
                      "k and v must have shape [B, Hkv, Lk, D] and match each other");
    TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "the number of query heads (", Hq,
                      ") must be a multiple of the key/value heads (", Hkv, ")");
    TORCH_CHECK_VALUE(Lq <= Lk, "q has more positions (", Lq, ") than k (", Lk, ")");
    const int kind = kind_of(mode);
    const int64_t rd = rotary_dim ? rotary_dim : D;
    const auto st = q_in.scalar_type();
    const bool dtype_ok = st == at::kBFloat16 || st == at::kHalf;
    if (!dtype_ok || !lampe_cuda_attention_supported(D, Hq / Hkv, rd, interleaved) || Hq > 65535 || B > 65535)
        return attention_fallback(q_in, k_in, v_in, inv_freq, prompt_length, key_padding_mask, query_start, mode,
                                  window, sink, mapping_length, sigmoid, temperature, softcap, rotary_dim, interleaved,
                                  scale, num_threads);
    TORCH_CHECK_VALUE(rd >= 0 && rd <= D && rd % 2 == 0, "rotary_dim must be even and in [0, head_dim]");
    TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0.0,
                      "scale and softcap must be finite (softcap >= 0)");
    c10::DeviceGuard guard(q_in.device());
    const at::Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
    at::Tensor freq = inv_freq.to(q.device(), at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK_VALUE(freq.numel() == rd / 2, "inv_freq must have rotary_dim / 2 = ", rd / 2, " entries, got ",
                      freq.numel());

    lampe_cuda_cfg cfg{};
    cfg.kind = kind;
    cfg.window = window;
    cfg.sink = sink;
    cfg.mapping_length = mapping_length;
    if (kind != LAMPE_CUDA_CAUSAL) {
        TORCH_CHECK_VALUE(window >= 1 && sink >= 1, "window and sink must be >= 1");
        TORCH_CHECK_VALUE(mapping_length > 0 || sigmoid.size() == 5,
                          "mapping_length must be > 0, or sigmoid must hold [a, b, lmax, threshold, below]");
        if (mapping_length <= 0) {
            cfg.sig_a = sigmoid[0];
            cfg.sig_b = sigmoid[1];
            cfg.sig_lmax = sigmoid[2];
            cfg.sig_threshold = (int64_t)sigmoid[3];
            cfg.sig_below = (int64_t)sigmoid[4];
        }
    }
    const std::vector<int64_t> pl = host_rows(prompt_length, B, "prompt_length", -1);
    const std::vector<int64_t> qs = host_rows(query_start, B, "query_start", INT64_MIN);
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK_VALUE(pl[b] == -1 || (pl[b] >= 1 && pl[b] <= Lk), "prompt_length[", b, "] = ", pl[b],
                          " must be in [1, Lk = ", Lk, "]");
    const bool has_mask = key_padding_mask.has_value();
    at::Tensor mask;
    if (has_mask) {
        mask = key_padding_mask->to(q.device());
        TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "key_padding_mask must be boolean (True = valid key)");
        TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == Lk,
                          "key_padding_mask must have shape [B, Lk] = [", B, ", ", Lk, "]");
    }

    /* Without a mask every length is known here: plan each row on the host too, so a bad
     * configuration raises (naming the argument) instead of giving NaN rows, and the row ranges
     * of the two kernels are exact. */
    const bool all_decode = Lq <= kAllDecodeMaxRows;
    int64_t decode_first = all_decode ? 0 : Lq, prefill_rows = all_decode ? 0 : Lq;
    if (!all_decode && kind == LAMPE_CUDA_LAMPE) {
        int64_t lo = Lq, hi = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t first; /* first tensor row after the prompt, if known */
            if (!has_mask && qs[b] == INT64_MIN)
                first = (pl[b] < 0 ? Lk : pl[b]) - Lk + Lq;
            else if (!has_mask)
                first = (pl[b] < 0 ? Lk : pl[b]) - qs[b];
            else if (qs[b] == INT64_MIN && pl[b] >= 0)
                first = pl[b] - Lk + Lq; /* the pads cancel out */
            else {
                lo = 0;
                hi = Lq;
                continue;
            }
            first = std::max<int64_t>(0, std::min(first, Lq));
            lo = std::min(lo, first);
            hi = std::max(hi, first);
        }
        decode_first = lo;
        prefill_rows = hi;
    }
    if (!has_mask && kind != LAMPE_CUDA_CAUSAL) {
        for (int64_t b = 0; b < B; b++) {
            lampe_cuda_seq s{};
            s.key_offset = 0;
            s.key_count = Lk;
            s.query_start = qs[b] == INT64_MIN ? Lk - Lq : qs[b];
            lcu_plan_row(&cfg, pl[b] < 0 ? 0 : pl[b], &s);
            TORCH_CHECK_VALUE(s.status != LAMPE_CUDA_ERR_SINK, "sink: the extended sink R = ", s.sink_size,
                              " must satisfy 1 <= R <= L - window (L = ", s.length, ", window = ", window, ")");
            TORCH_CHECK_VALUE(s.status != LAMPE_CUDA_ERR_ARG, "prompt_length: mode='", std::string(mode),
                              "' has no rows after the prompt; leave prompt_length at its default (Lk)");
            TORCH_CHECK_VALUE(s.status == 0, "row ", b, ": ", status_text(s.status));
        }
    }

    auto out = at::empty({B, Hq, Lq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
    auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
    if (B == 0 || Lq == 0) return {out, lse};
    auto seqs = at::empty({(int64_t)(B * sizeof(lampe_cuda_seq))}, q.options().dtype(at::kByte));
    const cudaStream_t stream = current_stream(q.device());

    lampe_cuda_plan_params pp{};
    pp.cfg = cfg;
    pp.batch = B;
    pp.q_len = Lq;
    pp.kv_len = Lk;
    pp.mask = has_mask ? reinterpret_cast<const uint8_t *>(mask.data_ptr<bool>()) : nullptr;
    pp.mask_stride[0] = has_mask ? mask.stride(0) : 0;
    pp.mask_stride[1] = has_mask ? mask.stride(1) : 0;
    pp.seqs = reinterpret_cast<lampe_cuda_seq *>(seqs.data_ptr());
    for (int64_t b0 = 0; b0 < B; b0 += LAMPE_CUDA_PLAN_ROWS) {
        pp.first_row = b0;
        pp.rows = std::min<int64_t>(LAMPE_CUDA_PLAN_ROWS, B - b0);
        for (int64_t i = 0; i < pp.rows; i++) {
            pp.prompt_length[i] = pl[b0 + i];
            pp.query_start[i] = qs[b0 + i];
        }
        const int rc = lampe_cuda_plan_rows(&pp, stream);
        TORCH_CHECK(rc == LAMPE_CUDA_OK, "lampe CUDA planning: ", status_text(rc));
    }

    lampe_cuda_attn_params p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.dtype = st == at::kBFloat16 ? LAMPE_CUDA_BF16 : LAMPE_CUDA_F16;
    p.batch = B;
    p.q_heads = Hq;
    p.kv_heads = Hkv;
    p.q_len = Lq;
    p.kv_len = Lk;
    p.head_dim = D;
    for (int i = 0; i < 3; i++) {
        p.q_stride[i] = q.stride(i);
        p.k_stride[i] = k.stride(i);
        p.v_stride[i] = v.stride(i);
        p.out_stride[i] = out.stride(i);
    }
    p.lse_stride[0] = lse.stride(0);
    p.lse_stride[1] = lse.stride(1);
    p.lse_stride[2] = lse.stride(2);
    p.seqs = reinterpret_cast<const lampe_cuda_seq *>(seqs.data_ptr());
    p.kind = kind;
    p.inv_freq = rd ? freq.data_ptr<float>() : nullptr;
    p.rotary_dim = rd;
    p.interleaved = interleaved;
    p.amplitude = kind == LAMPE_CUDA_CAUSAL ? 1.0f : (float)temperature;
    p.scale = scale > 0.0 ? (float)scale : (float)(1.0 / std::sqrt((double)D));
    p.softcap = (float)softcap;
    p.prefill_rows = prefill_rows;
    p.decode_first = decode_first;
    p.all_decode = all_decode;
    p.splits = 1;
    p.splits = lampe_cuda_decode_splits(&p);
    const size_t ws_bytes = lampe_cuda_attention_workspace(&p);
    at::Tensor ws;
    if (ws_bytes) {
        ws = at::empty({(int64_t)ws_bytes}, q.options().dtype(at::kByte));
        p.workspace = ws.data_ptr();
    }
    const int rc = lampe_cuda_attention(&p, stream);
    TORCH_CHECK(rc == LAMPE_CUDA_OK, "lampe CUDA attention: ", status_text(rc));
    return {out, lse};
}

at::Tensor rope_cuda(const at::Tensor &x_in, const at::Tensor &positions, const at::Tensor &inv_freq,
                     int64_t rotary_dim, bool interleaved, double amplitude)
{
    TORCH_CHECK_VALUE(x_in.is_cuda() && x_in.dim() == 4, "x must be a 4-D CUDA tensor [B, H, L, head_dim]");
    const int64_t B = x_in.size(0), L = x_in.size(2), D = x_in.size(3);
    const int64_t rd = rotary_dim ? rotary_dim : D;
    TORCH_CHECK_VALUE(rd >= 0 && rd <= D && rd % 2 == 0, "rotary_dim must be even and in [0, head_dim]");
    const auto st = x_in.scalar_type();
    TORCH_CHECK_TYPE(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
                     "x must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK_VALUE(positions.dim() == 2 && (positions.size(0) == 1 || positions.size(0) == B) &&
                          positions.size(1) == L,
                      "positions must be [1 or B, L]");
    TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "positions must be int64");
    c10::DeviceGuard guard(x_in.device());
    const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
    const at::Tensor pos = positions.to(x.device()).contiguous();
    const at::Tensor freq = inv_freq.to(x.device(), at::kFloat).contiguous().reshape({-1});
    TORCH_CHECK_VALUE(freq.numel() == rd / 2, "inv_freq must have rotary_dim / 2 = ", rd / 2, " entries");
    auto out = at::empty_like(x, x.options().memory_format(at::MemoryFormat::Contiguous));
    lampe_cuda_rope_params p{};
    p.src = x.data_ptr();
    p.dst = out.data_ptr();
    p.dtype = st == at::kBFloat16 ? LAMPE_CUDA_BF16 : st == at::kHalf ? LAMPE_CUDA_F16 : 0;
    p.batch = B;
    p.heads = x.size(1);
    p.tokens = L;
    p.head_dim = D;
    for (int i = 0; i < 3; i++) {
        p.src_stride[i] = x.stride(i);
        p.dst_stride[i] = out.stride(i);
    }
    p.positions = pos.data_ptr<int64_t>();
    p.pos_stride_b = pos.size(0) == 1 ? 0 : pos.stride(0);
    p.inv_freq = rd ? freq.data_ptr<float>() : nullptr;
    p.rotary_dim = rd;
    p.interleaved = interleaved;
    p.amplitude = (float)amplitude;
    const int rc = lampe_cuda_rope(&p, current_stream(x.device()));
    TORCH_CHECK(rc == LAMPE_CUDA_OK, "lampe CUDA rope: ", status_text(rc));
    return out;
}

std::unique_ptr<torch::Library> g_lampe_impl;

/* Register attention_cuda as the CUDA kernel of lampe::attention (once). */
void register_attention()
{
    if (g_lampe_impl) return;
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "lampe", c10::DispatchKey::CUDA, __FILE__,
                                                __LINE__);
    lib->impl("attention", TORCH_FN(attention_cuda));
    g_lampe_impl = std::move(lib);
}

} // namespace

TORCH_LIBRARY(lampe_cuda, m)
{
    m.def("attention" LCU_ATTENTION_ARGS);
    m.def("rope(Tensor x, Tensor positions, Tensor inv_freq, int rotary_dim, bool interleaved, float amplitude) -> Tensor");
}

TORCH_LIBRARY_IMPL(lampe_cuda, CUDA, m)
{
    m.impl("attention", TORCH_FN(attention_cuda));
    m.impl("rope", TORCH_FN(rope_cuda));
}

PYBIND11_MODULE(_cuda, m)
{
    m.doc() = "lampe's CUDA kernels (see docs/cuda.md)";
    m.attr("TORCH_VERSION") = LAMPE_TORCH_VERSION;
    m.attr("ARCHS") = lampe_cuda_arch_list();
    m.attr("ATTENTION_SCHEMA") = "lampe::attention" LCU_ATTENTION_ARGS;
    m.def("register_attention", &register_attention,
          "Register the CUDA kernel for lampe::attention (raises if its schema differs).");
}
