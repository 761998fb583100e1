/*
 * attn_decode.cu - the split-KV row kernel (flash-decoding) and its log-sum-exp merge.
 *
 * It owns rows after the prompt of an active LaMPE plan (each has its own map shift m(j - D))
 * and, for calls with few query rows, every row (lcu_row_is_decode). One CTA = one query row x
 * up to GMAX query heads of one KV head (K and V are read once for the whole group, never
 * repeated per query head) x one contiguous share ("split") of the row's key range [0, kend].
 * Each of the 4 warps walks tiles of 32 keys, staged by cp.async into its own shared-memory area
 * (all rows of the tile in flight at once; V lands while the scores are computed).
 *
 * Scores: lane i owns key kb + i. For every region that contains the key it rotates the key by
 * the region's key position (own, or mapped m(j - shift)) with lcu_cossin_fast and dots it with
 * that region's rotated, scaled queries (float32, shared memory, read as broadcasts); a key in
 * two regions (prompt rows at d = H and d = L - R) is visited twice, as in the reference. Then one
 * online-softmax step per tile and head, and P.V with lane l holding dims [l * DPL, (l + 1) * DPL),
 * DPL = D / 32, the probabilities arriving by shuffle. Warps merge in shared memory; splits merge
 * in lcu_merge_kernel.
 */
#include "internal.cuh"
#include "mma.cuh"

#define DEC_WARPS 4
#define DEC_TILE 32 /* keys per warp tile: lane i keeps key i's scores */

template <int D> struct lcu_dec_shape {
    static constexpr int DPL = D / 32;
    static constexpr int GMAX = D == 256 ? 4 : 16; /* query heads per CTA (registers: GMAX x DPL) */
};

template <typename T, int DPL> __device__ __forceinline__ void lcu_load_words(const T *src, uint32_t w[DPL / 2])
{
    if constexpr (DPL == 2) {
        w[0] = *reinterpret_cast<const uint32_t *>(src);
    } else if constexpr (DPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2 *>(src);
        w[0] = u.x;
        w[1] = u.y;
    } else {
        const uint4 u = *reinterpret_cast<const uint4 *>(src);
        w[0] = u.x;
        w[1] = u.y;
        w[2] = u.z;
        w[3] = u.w;
    }
}

template <typename T> __device__ __forceinline__ void lcu_unpack(uint32_t w, float *lo, float *hi)
{
    const T *e = reinterpret_cast<const T *>(&w);
    *lo = lcu_elem<T>::to_float(e[0]);
    *hi = lcu_elem<T>::to_float(e[1]);
}

/* 8 consecutive 16-bit elements (16-byte aligned shared memory) as floats. */
template <typename T> __device__ __forceinline__ void lcu_load8(const T *src, float x[8])
{
    const uint4 u = *reinterpret_cast<const uint4 *>(src);
    lcu_unpack<T>(u.x, &x[0], &x[1]);
    lcu_unpack<T>(u.y, &x[2], &x[3]);
    lcu_unpack<T>(u.z, &x[4], &x[5]);
    lcu_unpack<T>(u.w, &x[6], &x[7]);
}

/* q[0..7] . y[0..7], q 16-byte aligned (the same address in every lane: a broadcast). */
__device__ __forceinline__ float lcu_dot8(const float *q, const float y[8])
{
    const float4 a = *reinterpret_cast<const float4 *>(q), b = *reinterpret_cast<const float4 *>(q + 4);
    return a.x * y[0] + a.y * y[1] + a.z * y[2] + a.w * y[3] + b.x * y[4] + b.y * y[5] + b.z * y[6] + b.w * y[7];
}

template <int N> __device__ __forceinline__ float lcu_warp_sum(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float lcu_warp_nanmax(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = lcu_nanmax(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* log2(2^a + 2^b), exact for -inf operands, NaN-propagating. */
__device__ __forceinline__ float lcu_log2_add(float a, float b)
{
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    const float m = lcu_nanmax(a, b);
    return m + log2f(1.0f + exp2f(-fabsf(a - b)));
}

/* [floats] rotated queries [3][GMAX][D], reused as the warps' merge area at the end */
template <int D> constexpr size_t lcu_decode_qfloats()
{
    constexpr int G = lcu_dec_shape<D>::GMAX;
    constexpr size_t q = (size_t)LCU_SLOTS * G * D, comb = (size_t)DEC_WARPS * G * (D + 2);
    return q > comb ? q : comb;
}
/* bytes: that area, then each warp's staged K tile [DEC_TILE][D + 8] and V tile [DEC_TILE][D]
 * (16-bit elements) */
template <int D> constexpr size_t lcu_decode_smem()
{
    return 4 * lcu_decode_qfloats<D>() + (size_t)DEC_WARPS * DEC_TILE * (2 * D + 8) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(DEC_WARPS * 32, 1) lcu_decode_kernel(const lampe_cuda_attn_params p, float *part_o,
                                                                  float *part_ml, int64_t t_first, int64_t head_chunks)
{
    constexpr int DPL = lcu_dec_shape<D>::DPL, GMAX = lcu_dec_shape<D>::GMAX;
    extern __shared__ __align__(16) float lcu_dsmem[];
    float *Qs = lcu_dsmem; /* [3][GMAX][D]; reused as the warps' merge area at the end */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, nsplit = gridDim.x;
    const int64_t yb = blockIdx.y, hc = yb % head_chunks, kvh = (yb / head_chunks) % p.kv_heads;
    const int64_t b = yb / head_chunks / p.kv_heads;
    const int64_t t = t_first + blockIdx.z;
    const int64_t G = p.q_heads / p.kv_heads, g0 = hc * GMAX;
    const int GC = (int)(G - g0 < GMAX ? G - g0 : GMAX);
    const lampe_cuda_seq seq = p.seqs[b];
    const int64_t pos = lcu_row_pos(&seq, t);
    if (!lcu_row_is_decode(&seq, pos, p.all_decode)) return; /* a prompt row: the tiled kernel's */

    lcu_region regs[LCU_SLOTS];
    const int nreg = lcu_row_regions(&seq, pos, regs);
    int64_t kend = -1;
    for (int r = 0; r < nreg; r++) kend = regs[r].hi > kend ? regs[r].hi : kend;
    const int64_t c0 = (kend + 1) * split / nsplit, c1 = (kend + 1) * (split + 1) / nsplit;

    /* rotated, scaled queries per region: amplitude s^2 on rotated dims, scale (x log2 e) */
    const float qamp = p.kind != LAMPE_CUDA_CAUSAL ? p.amplitude * p.amplitude : 1.0f;
    const float qscale = p.softcap > 0.0f ? p.scale : p.scale * LCU_LOG2E;
    const int rd = (int)p.rotary_dim, n2 = rd / 2;
    for (int r = 0; r < nreg; r++) {
        float *Q = Qs + regs[r].slot * GMAX * D;
        for (int i = tid; i < GC * D; i += DEC_WARPS * 32) {
            const int g = i / D, d = i % D;
            const T *src = static_cast<const T *>(p.q) + b * p.q_stride[0] + (kvh * G + g0 + g) * p.q_stride[1] +
                           t * p.q_stride[2];
            float y;
            if (d >= rd) {
                y = lcu_elem<T>::to_float(src[d]);
            } else {
                int k, d1, d2;
                if (p.interleaved)
                    k = d / 2;
                else
                    k = d < n2 ? d : d - n2;
                lcu_pair_dims(k, rd, p.interleaved, &d1, &d2);
                float c, sn;
                lcu_cossin(regs[r].qpos, p.inv_freq[k], qamp, &c, &sn);
                const float x1 = lcu_elem<T>::to_float(src[d1]), x2 = lcu_elem<T>::to_float(src[d2]);
                y = d == d1 ? x1 * c - x2 * sn : x2 * c + x1 * sn;
            }
            Q[g * D + d] = y * qscale;
        }
    }
    __syncthreads();

    const int d0 = lane * DPL; /* this lane's dims of V and of the output */
    /* rotary dims in groups of 8 (16-byte rows of K): the vector path of the scores */
    const bool vec8 = p.interleaved ? rd % 8 == 0 : n2 % 8 == 0;

    float O[GMAX][DPL], m_run[GMAX], l_lane[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        m_run[g] = -INFINITY;
        l_lane[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < DPL; e++) O[g][e] = 0.0f;
    }
    const T *kbase = static_cast<const T *>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
    const T *vbase = static_cast<const T *>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
    const int64_t off = seq.key_offset;
    /* 16-byte copies: the binding passes unit last strides, other strides in multiples of 8
     * elements and 16-byte aligned bases (kernel_ready) */
    constexpr int LDK = D + 8; /* K rows padded: lanes reading 16 bytes of 8 rows hit 8 distinct bank groups */
    T *Kt = reinterpret_cast<T *>(lcu_dsmem + lcu_decode_qfloats<D>()) + (size_t)warp * DEC_TILE * (LDK + D);
    T *Vt = Kt + DEC_TILE * LDK;

    for (int64_t kb = c0 + DEC_TILE * warp; kb < c1; kb += DEC_TILE * DEC_WARPS) {
        const int nk = (int)(c1 - kb < DEC_TILE ? c1 - kb : DEC_TILE);
        /* K and V of the tile in two copy groups: the scores need only K, so V keeps arriving
         * while they are computed */
        for (int c = lane; c < DEC_TILE * (D / 8); c += 32) {
            const int r = c / (D / 8), col = (c % (D / 8)) * 8;
            const int64_t jr = off + kb + (r < nk ? r : 0);
            lcu_cp_async16(Kt + r * LDK + col, kbase + jr * p.k_stride[2] + col, r < nk ? 16 : 0);
        }
        lcu_cp_async_commit();
        for (int c = lane; c < DEC_TILE * (D / 8); c += 32) {
            const int r = c / (D / 8), col = (c % (D / 8)) * 8;
            const int64_t jr = off + kb + (r < nk ? r : 0);
            lcu_cp_async16(Vt + r * D + col, vbase + jr * p.v_stride[2] + col, r < nk ? 16 : 0);
        }
        lcu_cp_async_commit();
        lcu_cp_async_wait<1>(); /* this lane's K copies have landed */
        __syncwarp();           /* ... and every lane's */
        /* scores, one key per lane: lane i rotates key kb + i by the position of each region that
         * holds it and dots it with that region's rotated queries; se[g] = log2-sum-exp of its
         * visits (a key in two regions counts twice). Independent lanes: no shuffle chains. */
        float se[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; g++) se[g] = -INFINITY;
        const int64_t j = kb + lane;
        const T *Krow = Kt + lane * LDK;
        for (int r = 0; r < nreg; r++) {
            const bool in = lane < nk && j >= regs[r].lo && j <= regs[r].hi;
            if (!__any_sync(0xffffffffu, in)) continue;
            if (!in) continue; /* divergent from here on: nothing below is a warp collective */
            const int64_t kpos = regs[r].mapped ? lcu_mapped_id(&seq, j - regs[r].shift) : j;
            const float *Q = Qs + regs[r].slot * GMAX * D;
            float acc[GMAX];
#pragma unroll
            for (int g = 0; g < GMAX; g++) acc[g] = 0.0f;
            if (vec8 && !p.interleaved) { /* pairs (k, k + n2), 8 at a time */
                for (int k0 = 0; k0 < n2; k0 += 8) {
                    float x1[8], x2[8], y1[8], y2[8];
                    lcu_load8<T>(Krow + k0, x1);
                    lcu_load8<T>(Krow + k0 + n2, x2);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        float c, sn;
                        lcu_cossin_fast(kpos, p.inv_freq[k0 + e], &c, &sn);
                        y1[e] = x1[e] * c - x2[e] * sn;
                        y2[e] = x2[e] * c + x1[e] * sn;
                    }
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g >= GC) break;
                        acc[g] += lcu_dot8(Q + g * D + k0, y1) + lcu_dot8(Q + g * D + k0 + n2, y2);
                    }
                }
            } else if (vec8) { /* interleaved pairs (2k, 2k + 1), 4 per 8 dims */
                for (int d = 0; d < rd; d += 8) {
                    float x[8], y[8];
                    lcu_load8<T>(Krow + d, x);
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float c, sn;
                        lcu_cossin_fast(kpos, p.inv_freq[d / 2 + e], &c, &sn);
                        y[2 * e] = x[2 * e] * c - x[2 * e + 1] * sn;
                        y[2 * e + 1] = x[2 * e + 1] * c + x[2 * e] * sn;
                    }
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g >= GC) break;
                        acc[g] += lcu_dot8(Q + g * D + d, y);
                    }
                }
            } else { /* rotary dims that do not come in groups of 8: one pair at a time */
                for (int k = 0; k < n2; k++) {
                    int d1, d2;
                    lcu_pair_dims(k, rd, p.interleaved, &d1, &d2);
                    float c, sn;
                    lcu_cossin_fast(kpos, p.inv_freq[k], &c, &sn);
                    const float x1 = lcu_elem<T>::to_float(Krow[d1]), x2 = lcu_elem<T>::to_float(Krow[d2]);
                    const float y1 = x1 * c - x2 * sn, y2 = x2 * c + x1 * sn;
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g >= GC) break;
                        acc[g] += Q[g * D + d1] * y1 + Q[g * D + d2] * y2;
                    }
                }
                for (int d = rd; d < D; d++) {
                    const float x = lcu_elem<T>::to_float(Krow[d]);
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g >= GC) break;
                        acc[g] += Q[g * D + d] * x;
                    }
                }
            }
            if (vec8) /* dims past the rotary ones, unrotated */
                for (int d = rd; d < D; d += 8) {
                    float x[8];
                    lcu_load8<T>(Krow + d, x);
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g >= GC) break;
                        acc[g] += lcu_dot8(Q + g * D + d, x);
                    }
                }
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g >= GC) break;
                float sc = acc[g];
                if (p.softcap > 0.0f) sc = p.softcap * tanhf(sc / p.softcap) * LCU_LOG2E;
                se[g] = lcu_log2_add(se[g], sc);
            }
        }
        /* one online-softmax step for the tile, then P.V */
        float pg[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            pg[g] = 0.0f;
            if (g >= GC) continue;
            const float mnew = lcu_nanmax(m_run[g], lcu_warp_nanmax(se[g]));
            if (mnew == -INFINITY) continue;
            const float alpha = exp2f(m_run[g] - mnew);
            pg[g] = exp2f(se[g] - mnew);
            l_lane[g] = l_lane[g] * alpha + pg[g];
            m_run[g] = mnew;
#pragma unroll
            for (int e = 0; e < DPL; e++) O[g][e] *= alpha;
        }
        lcu_cp_async_wait<0>(); /* V of the tile */
        __syncwarp();
        for (int i = 0; i < nk; i++) {
            uint32_t w[DPL / 2];
            lcu_load_words<T, DPL>(Vt + i * D + d0, w);
            float v[DPL];
#pragma unroll
            for (int e = 0; e < DPL / 2; e++) lcu_unpack<T>(w[e], &v[2 * e], &v[2 * e + 1]);
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g >= GC) break;
                const float pw = __shfl_sync(0xffffffffu, pg[g], i);
#pragma unroll
                for (int e = 0; e < DPL; e++) O[g][e] += pw * v[e];
            }
        }
        __syncwarp(); /* every lane is done with this tile before the next one lands */
    }

    /* merge the 4 warps (area reused from Qs): [warp][g][D + 2] = O, m, l */
    __syncthreads();
    float *W = lcu_dsmem;
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g >= GC) break;
        const float l = lcu_warp_sum<32>(l_lane[g]);
        float *slot = W + (warp * GMAX + g) * (D + 2);
#pragma unroll
        for (int e = 0; e < DPL; e++) slot[d0 + e] = O[g][e];
        if (lane == 0) {
            slot[D] = m_run[g];
            slot[D + 1] = l;
        }
    }
    __syncthreads();
    const float qnan = __int_as_float(0x7fc00000);
    for (int i = tid; i < GC * D; i += DEC_WARPS * 32) {
        const int g = i / D, d = i % D;
        float M = -INFINITY;
        for (int w = 0; w < DEC_WARPS; w++) M = lcu_nanmax(M, W[(w * GMAX + g) * (D + 2) + D]);
        float L = 0.0f, acc = 0.0f;
        if (M != -INFINITY) {
            for (int w = 0; w < DEC_WARPS; w++) {
                const float *slot = W + (w * GMAX + g) * (D + 2);
                if (slot[D] == -INFINITY) continue;
                const float sc = exp2f(slot[D] - M);
                L += sc * slot[D + 1];
                acc += sc * slot[d];
            }
        }
        const int64_t h = kvh * G + g0 + g;
        if (nsplit > 1) {
            const int64_t prow = ((b * (p.q_len - p.decode_first) + (t - p.decode_first)) * p.q_heads + h) * nsplit + split;
            part_o[prow * D + d] = acc;
            if (d == 0) {
                part_ml[prow * 2] = M;
                part_ml[prow * 2 + 1] = L;
            }
            continue;
        }
        const bool nan_row = seq.status != 0 || M != M || L != L;
        const float o = nan_row ? qnan : (L > 0.0f ? acc / L : 0.0f);
        T *dst = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2];
        dst[d] = lcu_elem<T>::from_float(isfinite(o) ? o : qnan);
        if (d == 0 && p.lse)
            p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + t * p.lse_stride[2]] =
                nan_row ? qnan : (L > 0.0f ? (M + log2f(L)) * LCU_LN2 : -INFINITY);
    }
}

/* One warp per (row, head): out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s. */
template <typename T>
__global__ void lcu_merge_kernel(const lampe_cuda_attn_params p, const float *part_o, const float *part_ml, int nsplit)
{
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.q_len - p.decode_first;
    const int64_t item = blockIdx.x * (int64_t)(blockDim.x / 32) + (threadIdx.x >> 5);
    if (item >= p.batch * rows * p.q_heads) return;
    const int64_t h = item % p.q_heads, tr = (item / p.q_heads) % rows, b = item / p.q_heads / rows;
    const int64_t t = p.decode_first + tr;
    const lampe_cuda_seq seq = p.seqs[b];
    if (!lcu_row_is_decode(&seq, lcu_row_pos(&seq, t), p.all_decode)) return;
    const int64_t D = p.head_dim, base = item * nsplit;
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++) M = lcu_nanmax(M, part_ml[(base + s) * 2]);
    float L = 0.0f;
    if (M != -INFINITY)
        for (int s = 0; s < nsplit; s++)
            if (part_ml[(base + s) * 2] != -INFINITY) L += exp2f(part_ml[(base + s) * 2] - M) * part_ml[(base + s) * 2 + 1];
    const float qnan = __int_as_float(0x7fc00000);
    const bool nan_row = seq.status != 0 || M != M || L != L;
    bool finite = true;
    float acc[8]; /* D <= 256: at most 8 dims per lane */
    T *dst = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2];
    int idx = 0;
    for (int64_t d = lane; d < D; d += 32, idx++) {
        float a = 0.0f;
        if (M != -INFINITY)
            for (int s = 0; s < nsplit; s++) {
                const float ms = part_ml[(base + s) * 2];
                if (ms != -INFINITY) a += exp2f(ms - M) * part_o[(base + s) * D + d];
            }
        a = L > 0.0f ? a / L : 0.0f;
        acc[idx] = a;
        finite &= isfinite(a);
    }
    finite = __all_sync(0xffffffffu, finite);
    idx = 0;
    for (int64_t d = lane; d < D; d += 32, idx++)
        dst[d] = lcu_elem<T>::from_float(nan_row || !finite ? qnan : acc[idx]);
    if (lane == 0 && p.lse)
        p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + t * p.lse_stride[2]] =
            nan_row ? qnan : (L > 0.0f ? (M + log2f(L)) * LCU_LN2 : -INFINITY);
}

template <typename T, int D>
static int lcu_decode_launch(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream)
{
    constexpr size_t smem = lcu_decode_smem<D>();
    constexpr int GMAX = lcu_dec_shape<D>::GMAX;
    static bool configured = false;
    if (!configured) {
        if (cudaFuncSetAttribute(lcu_decode_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
            cudaSuccess)
            return lcu_check_launch();
        configured = true;
    }
    const int64_t G = p->q_heads / p->kv_heads, chunks = (G + GMAX - 1) / GMAX;
    const int64_t rows = p->q_len - p->decode_first;
    const int64_t ygrid = p->batch * p->kv_heads * chunks;
    if (ygrid > 65535) return LAMPE_CUDA_ERR_UNSUPPORTED;
    for (int64_t r0 = 0; r0 < rows; r0 += 65535) { /* gridDim.z limit */
        const int64_t nr = rows - r0 < 65535 ? rows - r0 : 65535;
        const dim3 grid((unsigned)p->splits, (unsigned)ygrid, (unsigned)nr);
        lcu_decode_kernel<T, D><<<grid, DEC_WARPS * 32, smem, stream>>>(*p, ws->part_o, ws->part_ml,
                                                                         p->decode_first + r0, chunks);
    }
    if (p->splits > 1) {
        const int64_t items = p->batch * rows * p->q_heads;
        lcu_merge_kernel<T><<<(unsigned)((items + 7) / 8), 256, 0, stream>>>(*p, ws->part_o, ws->part_ml, p->splits);
    }
    return lcu_check_launch();
}

template <typename T> static int lcu_decode_dtype(const lampe_cuda_attn_params *p, const lcu_workspace *ws,
                                                  cudaStream_t stream)
{
    switch (p->head_dim) {
    case 64: return lcu_decode_launch<T, 64>(p, ws, stream);
    case 128: return lcu_decode_launch<T, 128>(p, ws, stream);
    case 256: return lcu_decode_launch<T, 256>(p, ws, stream);
    default: return LAMPE_CUDA_ERR_UNSUPPORTED;
    }
}

int lcu_decode(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream)
{
    if (p->decode_first >= p->q_len) return LAMPE_CUDA_OK;
    return p->dtype == LAMPE_CUDA_BF16 ? lcu_decode_dtype<__nv_bfloat16>(p, ws, stream)
                                       : lcu_decode_dtype<__half>(p, ws, stream);
}
