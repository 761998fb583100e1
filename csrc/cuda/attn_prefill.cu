/*
 * attn_prefill.cu - the tiled tensor-core kernel for prompt rows (FlashAttention-2 style).
 *
 * One CTA = BQ query rows of one query head; each of its NWARPS warps owns MT row tiles of 16
 * (rows mt * 16 * NWARPS + warp * 16 + 0..15), so every K or V fragment a warp loads from
 * shared memory feeds MT tensor-core products (lcu_prefill_shape). Each region kind is a "slot"
 * (plan.cuh): slot 0 keys at true positions (local, or the whole causal range), slot 1 keys at
 * mapped positions, slot 2 the sink (true positions, shifted query). The CTA walks the key
 * blocks of every slot's key range in one sequence, slot by slot - keys come pre-rotated from
 * k_true / k_map (rope.cu, once per call) - with a double-buffered cp.async pipeline; when the
 * slot changes it rotates its query rows for the new slot into its one query tile in shared
 * memory (amplitude s^2 on the rotated dims; at most three times per CTA). Every block feeds one
 * online softmax per row (log2 units), so the row's result is one exact softmax over the multiset
 * of its (region, key) visits; a key in two regions is visited twice.
 *
 * Masks: a block is "full" when every row of the tile sees every key of it in that slot (no mask,
 * no checks); otherwise each score outside the row's [lo, hi] becomes -inf by selection (a NaN
 * in a key the row does not attend cannot leak), and V rows holding NaN/inf are zeroed in shared
 * memory with a per-key flag that turns an attended score into NaN - so P.V never computes
 * 0 * NaN for a masked key, and an attended non-finite value still makes the row NaN.
 */
#include <float.h>
#include <limits.h>

#include "internal.cuh"
#include "mma.cuh"

/* Tile shapes per head dim: BQ query rows = MT x NWARPS x 16, BK keys per block (key/value
 * blocks are double-buffered). One query tile, two row tiles per warp and 4 warps leave room for two CTAs (8 warps)
 * per SM with half the shared-memory reads per product of 16-row warps. Measured on an H200 at
 * L = 32K, D = 128 (bench/attention_cuda.py, docs/cuda.md): 64 rows x 4 warps with the three
 * slots' query tiles resident (1 CTA, 4 warps per SM) 90 TFLOP/s; 128 rows x 8 warps 140; this
 * shape 139 - halving the shared-memory reads did not help, so they are not what limits it. */
template <int D> struct lcu_prefill_shape;
template <> struct lcu_prefill_shape<64> { static constexpr int BQ = 128, NWARPS = 4, BK = 64; };
template <> struct lcu_prefill_shape<128> { static constexpr int BQ = 128, NWARPS = 4, BK = 32; };
template <> struct lcu_prefill_shape<256> { static constexpr int BQ = 64, NWARPS = 4, BK = 32; };

template <int D> __host__ __device__ constexpr int lcu_lds() { return D + 8; } /* padded rows: ldmatrix without bank conflicts */

template <typename T, int D> constexpr size_t lcu_prefill_smem()
{
    using S = lcu_prefill_shape<D>;
    return sizeof(T) * (size_t)lcu_lds<D>() * (S::BQ + 2 * 2 * S::BK); /* Q, then K and V x 2 stages */
}

template <int BQ> struct lcu_tile_info {
    int lo[LCU_SLOTS][BQ], hi[LCU_SLOTS][BQ]; /* own key range per slot and row (lo > hi: none) */
    long long qpos[LCU_SLOTS][BQ];
    int flags[BQ];                            /* 1: the row is this kernel's; 2: its plan failed */
    int klo[LCU_SLOTS], khi[LCU_SLOTS];       /* union of the rows' ranges                     */
    int lo_max[LCU_SLOTS], hi_min[LCU_SLOTS]; /* a block inside [lo_max, hi_min] needs no mask  */
    int nblk[LCU_SLOTS], first_blk[LCU_SLOTS];
};

template <typename T, int D>
__global__ void __launch_bounds__(lcu_prefill_shape<D>::NWARPS * 32, 2)
    lcu_prefill_kernel(const lampe_cuda_attn_params p, const T *__restrict__ k_true, const T *__restrict__ k_map)
{
    constexpr int BQ = lcu_prefill_shape<D>::BQ, NWARPS = lcu_prefill_shape<D>::NWARPS;
    constexpr int BK = lcu_prefill_shape<D>::BK, LDS = lcu_lds<D>();
    constexpr int MT = BQ / (16 * NWARPS); /* row tiles per warp */
    constexpr int NT = BK / 8;             /* score tiles of 8 keys per row tile */
    constexpr int DT = D / 8;              /* output tiles of 8 dims             */
    static_assert(MT * 16 * NWARPS == BQ, "BQ must be a multiple of 16 x NWARPS");
    extern __shared__ __align__(16) unsigned char lcu_smem[];
    T *Qs = reinterpret_cast<T *>(lcu_smem); /* [BQ][LDS]: the query rows rotated for one slot */
    T *Ks = Qs + BQ * LDS;
    T *Vs = Ks + 2 * BK * LDS;
    __shared__ lcu_tile_info<BQ> ti;
    __shared__ int vbad[BK];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t b = blockIdx.z, h = blockIdx.y;
    const int64_t G = p.q_heads / p.kv_heads, kvh = h / G;
    const int64_t t0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BQ; /* later (costlier) tiles first */
    const lampe_cuda_seq seq = p.seqs[b];
    const int64_t off = seq.key_offset;

    /* 1. the rows' regions, per slot */
    for (int row = tid; row < BQ; row += NWARPS * 32) {
        const int64_t t = t0 + row;
        for (int s = 0; s < LCU_SLOTS; s++) {
            ti.lo[s][row] = 1;
            ti.hi[s][row] = 0;
            ti.qpos[s][row] = 0;
        }
        int flags = 0;
        if (t < p.prefill_rows && t < p.q_len) {
            const int64_t pos = lcu_row_pos(&seq, t);
            if (!lcu_row_is_decode(&seq, pos, p.all_decode)) {
                flags = 1 | (seq.status ? 2 : 0);
                lcu_region regs[LCU_SLOTS];
                const int n = lcu_row_regions(&seq, pos, regs);
                for (int r = 0; r < n; r++) {
                    ti.lo[regs[r].slot][row] = (int)regs[r].lo;
                    ti.hi[regs[r].slot][row] = (int)regs[r].hi;
                    ti.qpos[regs[r].slot][row] = regs[r].qpos;
                }
            }
        }
        ti.flags[row] = flags;
    }
    __syncthreads();
    if (tid < LCU_SLOTS) {
        const int s = tid;
        int klo = INT_MAX, khi = -1, lo_max = INT_MIN, hi_min = INT_MAX;
        for (int r = 0; r < BQ; r++) {
            const int lo = ti.lo[s][r], hi = ti.hi[s][r];
            if (lo <= hi) {
                klo = min(klo, lo);
                khi = max(khi, hi);
            }
            lo_max = max(lo_max, lo);
            hi_min = min(hi_min, hi);
        }
        ti.klo[s] = klo;
        ti.khi[s] = khi;
        ti.lo_max[s] = lo_max;
        ti.hi_min[s] = hi_min;
        ti.first_blk[s] = khi >= 0 ? klo / BK : 0;
        ti.nblk[s] = khi >= 0 ? khi / BK - klo / BK + 1 : 0;
    }
    __syncthreads();
    const int total = ti.nblk[0] + ti.nblk[1] + ti.nblk[2];
    bool any_row = false;
    for (int r = 0; r < BQ; r++) any_row |= ti.flags[r] != 0;
    if (!any_row) return; /* every row belongs to the row kernel (or lies past Lq) */

    /* 2. the query rows rotated for slot s (s^2 on rotated dims), zeros where the row has no
     * region of that slot; called by every thread, between barriers */
    const float qamp = p.kind != LAMPE_CUDA_CAUSAL ? p.amplitude * p.amplitude : 1.0f;
    const int n2 = (int)(p.rotary_dim / 2), per_row = n2 + D - (int)p.rotary_dim;
    const T zero = lcu_elem<T>::from_float(0.0f);
    auto rotate_queries = [&](int s) {
        for (int idx = tid; idx < BQ * per_row; idx += NWARPS * 32) {
            const int r = idx / per_row, e = idx % per_row;
            const int64_t t = t0 + r;
            const bool live = ti.lo[s][r] <= ti.hi[s][r];
            const T *src = static_cast<const T *>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + t * p.q_stride[2];
            if (e >= n2) {
                const int d = (int)p.rotary_dim + (e - n2);
                Qs[r * LDS + d] = live ? src[d] : zero;
                continue;
            }
            int d1, d2;
            lcu_pair_dims(e, (int)p.rotary_dim, p.interleaved, &d1, &d2);
            if (!live) {
                Qs[r * LDS + d1] = Qs[r * LDS + d2] = zero;
                continue;
            }
            float c, sn;
            lcu_cossin(ti.qpos[s][r], p.inv_freq[e], qamp, &c, &sn);
            const float x1 = lcu_elem<T>::to_float(src[d1]), x2 = lcu_elem<T>::to_float(src[d2]);
            Qs[r * LDS + d1] = lcu_elem<T>::from_float(x1 * c - x2 * sn);
            Qs[r * LDS + d2] = lcu_elem<T>::from_float(x2 * c + x1 * sn);
        }
    };

    /* 3. the block sequence: slot by slot, key blocks of BK own positions */
    const int64_t kv_base = (b * p.kv_heads + kvh) * p.kv_len * D;
    auto block_at = [&](int idx, int *slot, int *k0) {
        int s = 0;
        while (idx >= ti.nblk[s]) idx -= ti.nblk[s++];
        *slot = s;
        *k0 = (ti.first_blk[s] + idx) * BK;
    };
    auto load_block = [&](int idx, int stage) {
        int s, k0;
        block_at(idx, &s, &k0);
        const T *ksrc = (s == LCU_SLOT_MAP ? k_map : k_true) + kv_base;
        T *kd = Ks + stage * BK * LDS, *vd = Vs + stage * BK * LDS;
        for (int c = tid; c < BK * (D / 8); c += NWARPS * 32) {
            const int r = c / (D / 8), col = (c % (D / 8)) * 8;
            const int64_t own = k0 + r, j = off + own;
            const bool ok = own < seq.key_count && j < p.kv_len;
            const int64_t jj = ok ? j : 0;
            lcu_cp_async16(kd + r * LDS + col, ksrc + jj * D + col, ok ? 16 : 0);
            const T *vsrc = static_cast<const T *>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1] + jj * p.v_stride[2];
            lcu_cp_async16(vd + r * LDS + col, vsrc + col, ok ? 16 : 0);
        }
        lcu_cp_async_commit();
    };

    float O[MT][DT][4];
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < DT; i++) O[mt][i][0] = O[mt][i][1] = O[mt][i][2] = O[mt][i][3] = 0.0f;
        m_run[mt][0] = m_run[mt][1] = -INFINITY;
        l_run[mt][0] = l_run[mt][1] = 0.0f;
    }
    const int g = lane >> 2, c4 = lane & 3;
    const float sl2 = p.softcap > 0.0f ? p.scale : p.scale * LCU_LOG2E;
    int qslot = -1; /* the slot Qs holds */

    if (total > 0) load_block(0, 0);
    for (int it = 0; it < total; it++) {
        const int stage = it & 1;
        if (it + 1 < total) { /* prefetch the next block into the other buffer */
            load_block(it + 1, (it + 1) & 1);
            lcu_cp_async_wait<1>();
        } else {
            lcu_cp_async_wait<0>();
        }
        int s, k0;
        block_at(it, &s, &k0);
        if (s != qslot) { /* CTA-uniform; every warp finished with the old tile at the last barrier */
            rotate_queries(s);
            qslot = s;
        }
        __syncthreads();
        const int k1 = k0 + BK - 1;
        const bool full = ti.lo_max[s] <= k0 && ti.hi_min[s] >= k1;
        T *Kst = Ks + stage * BK * LDS, *Vst = Vs + stage * BK * LDS;
        if (!full) { /* zero non-finite values, remember which keys had them */
            if (tid < BK) vbad[tid] = 0;
            __syncthreads();
            for (int i = tid; i < BK * D; i += NWARPS * 32) {
                const int r = i / D, d = i % D;
                const float x = lcu_elem<T>::to_float(Vst[r * LDS + d]);
                if (!isfinite(x)) {
                    Vst[r * LDS + d] = zero;
                    vbad[r] = 1;
                }
            }
            __syncthreads();
        }
        int lo[MT][2], hi[MT][2];
        bool mine = false;
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                const int row = mt * 16 * NWARPS + warp * 16 + g + 8 * rr;
                lo[mt][rr] = ti.lo[s][row];
                hi[mt][rr] = ti.hi[s][row];
                mine |= lo[mt][rr] <= hi[mt][rr] && lo[mt][rr] <= k1 && hi[mt][rr] >= k0;
            }
        if (__any_sync(0xffffffffu, mine)) {
            float S[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int i = 0; i < NT; i++) S[mt][i][0] = S[mt][i][1] = S[mt][i][2] = S[mt][i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    lcu_ldmatrix_x4(a[mt], Qs + (mt * 16 * NWARPS + warp * 16 + (lane & 15)) * LDS + kk * 16 +
                                               (lane >> 4) * 8);
#pragma unroll
                for (int np = 0; np < BK / 16; np++) {
                    uint32_t bf[4];
                    lcu_ldmatrix_x4(bf, Kst + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                                            ((lane >> 3) & 1) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        lcu_mma<T>::run(S[mt][2 * np], a[mt], bf[0], bf[1]);
                        lcu_mma<T>::run(S[mt][2 * np + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
            /* scale (and soft-cap) into log2 units; mask by selection */
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float x = S[mt][nt][e] * sl2;
                        if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap) * LCU_LOG2E;
                        if (!full) {
                            const int kl = nt * 8 + 2 * c4 + (e & 1), key = k0 + kl;
                            const int l = lo[mt][e >> 1], u = hi[mt][e >> 1];
                            x = (key >= l && key <= u) ? (vbad[kl] ? __int_as_float(0x7fc00000) : x) : -INFINITY;
                        }
                        S[mt][nt][e] = x;
                    }
            /* online softmax for each row: (mt, rr) holds e = 2 rr, 2 rr + 1 */
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int rr = 0; rr < 2; rr++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
                        mx = lcu_nanmax(mx, lcu_nanmax(S[mt][nt][2 * rr], S[mt][nt][2 * rr + 1]));
                    mx = lcu_nanmax(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = lcu_nanmax(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float mnew = lcu_nanmax(m_run[mt][rr], mx);
                    float alpha = 1.0f, sum = 0.0f;
                    if (mnew == -INFINITY) { /* nothing attended yet: P = 0, no rescale */
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) S[mt][nt][2 * rr] = S[mt][nt][2 * rr + 1] = 0.0f;
                    } else {
                        alpha = exp2f(m_run[mt][rr] - mnew);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            S[mt][nt][2 * rr] = exp2f(S[mt][nt][2 * rr] - mnew);
                            S[mt][nt][2 * rr + 1] = exp2f(S[mt][nt][2 * rr + 1] - mnew);
                            sum += S[mt][nt][2 * rr] + S[mt][nt][2 * rr + 1];
                        }
                    }
                    l_run[mt][rr] = l_run[mt][rr] * alpha + sum;
                    m_run[mt][rr] = mnew;
#pragma unroll
                    for (int dt = 0; dt < DT; dt++) {
                        O[mt][dt][2 * rr] *= alpha;
                        O[mt][dt][2 * rr + 1] *= alpha;
                    }
                }
            /* O += P . V over 16 keys at a time (P's C fragments are V's A fragments) */
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    a[mt][0] = lcu_elem<T>::pack2(S[mt][2 * kk][0], S[mt][2 * kk][1]);
                    a[mt][1] = lcu_elem<T>::pack2(S[mt][2 * kk][2], S[mt][2 * kk][3]);
                    a[mt][2] = lcu_elem<T>::pack2(S[mt][2 * kk + 1][0], S[mt][2 * kk + 1][1]);
                    a[mt][3] = lcu_elem<T>::pack2(S[mt][2 * kk + 1][2], S[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t bf[4];
                    lcu_ldmatrix_x4_trans(bf, Vst + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + dp * 16 +
                                                  (lane >> 4) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        lcu_mma<T>::run(O[mt][2 * dp], a[mt], bf[0], bf[1]);
                        lcu_mma<T>::run(O[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads(); /* this stage is refilled, and Qs may be rewritten, from here on */
    }

    /* 4. finish: O / l, NaN policy, write rows this kernel owns */
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            float l = l_run[mt][rr];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int r = mt * 16 * NWARPS + warp * 16 + g + 8 * rr;
            const int flags = ti.flags[r];
            const int64_t t = t0 + r;
            const float m = m_run[mt][rr];
            const bool nan_row = (flags & 2) || l != l || m != m;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            bool finite = true;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                O[mt][dt][2 * rr] *= inv;
                O[mt][dt][2 * rr + 1] *= inv;
                finite &= isfinite(O[mt][dt][2 * rr]) && isfinite(O[mt][dt][2 * rr + 1]);
            }
            finite &= __shfl_xor_sync(0xffffffffu, (int)finite, 1) != 0;
            finite &= __shfl_xor_sync(0xffffffffu, (int)finite, 2) != 0;
            if (!(flags & 1)) continue;
            const float qnan = __int_as_float(0x7fc00000);
            T *dst = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2];
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const int d = dt * 8 + 2 * c4;
                const float x0 = nan_row || !finite ? qnan : O[mt][dt][2 * rr];
                const float x1 = nan_row || !finite ? qnan : O[mt][dt][2 * rr + 1];
                *reinterpret_cast<uint32_t *>(dst + d) = lcu_elem<T>::pack2(x0, x1);
            }
            if (c4 == 0 && p.lse) {
                const float lse = nan_row ? qnan : (l > 0.0f ? (m + log2f(l)) * LCU_LN2 : -INFINITY);
                p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + t * p.lse_stride[2]] = lse;
            }
        }
}

template <typename T, int D> static int lcu_prefill_launch(const lampe_cuda_attn_params *p, const lcu_workspace *ws,
                                                           cudaStream_t stream)
{
    constexpr size_t smem = lcu_prefill_smem<T, D>();
    static bool configured = false; /* the attribute is per function and process */
    if (!configured) {
        if (cudaFuncSetAttribute(lcu_prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
            cudaSuccess)
            return lcu_check_launch();
        configured = true;
    }
    using S = lcu_prefill_shape<D>;
    const dim3 grid((unsigned)((p->prefill_rows + S::BQ - 1) / S::BQ), (unsigned)p->q_heads, (unsigned)p->batch);
    lcu_prefill_kernel<T, D><<<grid, S::NWARPS * 32, smem, stream>>>(*p, static_cast<const T *>(ws->k_true),
                                                                   static_cast<const T *>(ws->k_map));
    return lcu_check_launch();
}

template <typename T> static int lcu_prefill_dtype(const lampe_cuda_attn_params *p, const lcu_workspace *ws,
                                                   cudaStream_t stream)
{
    switch (p->head_dim) {
    case 64: return lcu_prefill_launch<T, 64>(p, ws, stream);
    case 128: return lcu_prefill_launch<T, 128>(p, ws, stream);
    case 256: return lcu_prefill_launch<T, 256>(p, ws, stream);
    default: return LAMPE_CUDA_ERR_UNSUPPORTED;
    }
}

int lcu_prefill(const lampe_cuda_attn_params *p, const lcu_workspace *ws, cudaStream_t stream)
{
    if (p->prefill_rows <= 0 || p->all_decode) return LAMPE_CUDA_OK;
    if (p->q_heads > 65535 || p->batch > 65535) return LAMPE_CUDA_ERR_UNSUPPORTED;
    return p->dtype == LAMPE_CUDA_BF16 ? lcu_prefill_dtype<__nv_bfloat16>(p, ws, stream)
                                       : lcu_prefill_dtype<__half>(p, ws, stream);
}
