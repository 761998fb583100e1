/*
 * plan.cuh - the per-row LaMPE plan and the regions of one query row, as small functions that
 * compile both for the GPU (nvcc, __host__ __device__) and for the host (g++, plain C++).
 *
 * This is the only place the CUDA kernels learn positions from. It re-states the C planner
 * (csrc/core/positions.c) for one row, so that a kernel can plan on the device from lengths it
 * only knows there (a key_padding_mask on the GPU) without a host synchronisation:
 *   - mapped ids m[p] are never stored: m(p) = floor(f32(r * f32(p))) with
 *     r = f32(f32(1 / (L - 1)) * U), the same IEEE binary32 operations as lampe_mapped_ids, so
 *     every id is bit-identical (tests/test_cuda_host.py checks it against lampe.plan);
 *   - the extended sink R (§1.2) is found by binary search over the monotone m instead of the
 *     planner's linear walk (same answer, O(log L) on one GPU thread);
 *   - the regions of a row (§2.1 prompt rows, §0 rows after the prompt, the baselines) follow
 *     lampe_plan_regions, then are clipped to the row's valid keys (key_count).
 * Section numbers (§) refer to docs/spec.md.
 */
#ifndef LAMPE_CUDA_PLAN_CUH
#define LAMPE_CUDA_PLAN_CUH

#include <math.h>
#include <stdint.h>

#include "lampe_cuda.h"

#if defined(__CUDACC__)
#define LCU_HD __host__ __device__ __forceinline__
#else
#define LCU_HD static inline
#endif

/* Slots of the fused kernels: the key-position rule a region uses. LOCAL and FULL never meet in
 * one row, so they share slot 0 (keys at true positions). */
#define LCU_SLOT_TRUE 0
#define LCU_SLOT_MAP 1
#define LCU_SLOT_SINK 2
#define LCU_SLOTS 3

typedef struct lcu_region {
    int32_t slot;   /* LCU_SLOT_*                                             */
    int32_t mapped; /* 1: key j sits at m(j - shift), 0: at j                 */
    int64_t lo, hi; /* keys lo..hi inclusive, in the row's own positions       */
    int64_t qpos;   /* query position of this region                          */
    int64_t shift;
} lcu_region;

/* binary32 helpers that no compiler may fuse or widen (the §1.1 recipe is exact IEEE). */
LCU_HD float lcu_mul_rn(float a, float b)
{
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    volatile float r = a * b;
    return r;
#endif
}

LCU_HD float lcu_div_rn(float a, float b)
{
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    volatile float r = a / b;
    return r;
#endif
}

LCU_HD float lcu_i2f(int64_t p)
{
#if defined(__CUDA_ARCH__)
    return __ll2float_rn((long long)p);
#else
    return (float)p;
#endif
}

/* m(p) of the row's plan (§1.1 for LaMPE, floor(p / U) for SelfExtend, 0 for ReRoPE). */
LCU_HD int64_t lcu_mapped_id(const lampe_cuda_seq *s, int64_t p)
{
    if (s->kind == LAMPE_CUDA_SELFEXTEND) return p / s->mapping_length;
    if (s->kind != LAMPE_CUDA_LAMPE || s->length <= 1) return 0;
    return (int64_t)floorf(lcu_mul_rn(s->ratio, lcu_i2f(p)));
}

/* U(L) of the scaled sigmoid (§4), as lampe_sigmoid_eval computes it (float64). */
LCU_HD int64_t lcu_sigmoid_eval(const lampe_cuda_cfg *c, int64_t L)
{
    if (c->sig_threshold > 0 && L < c->sig_threshold) return c->sig_below;
    const double u = c->sig_lmax / (1.0 + exp(-(c->sig_a * (double)L + c->sig_b)));
    if (!(u >= 1.0)) return 1;
    if (u > (double)LAMPE_CUDA_MAX_LENGTH) return LAMPE_CUDA_MAX_LENGTH;
    return (int64_t)u;
}

/*
 * Fill the plan fields of `s` (key_offset, key_count and query_start already set) from the
 * call's configuration and the row's prompt length `prompt_own` (in the row's own positions;
 * <= 0 means "all valid keys": key_count). Sets s->status to a lampe_status code when the
 * configuration cannot be planned for this row (the row then outputs NaN on the device; the
 * host raises before launching where it knows the lengths).
 */
LCU_HD void lcu_plan_row(const lampe_cuda_cfg *c, int64_t prompt_own, lampe_cuda_seq *s)
{
    s->kind = c->kind;
    s->window = c->window;
    s->length = 0;
    s->mapping_length = 1;
    s->sink_size = 0;
    s->bias_map = 0;
    s->bias_sink = 0;
    s->ratio = 0.0f;
    s->fallback = 0;
    s->status = 0;
    if (c->kind == LAMPE_CUDA_CAUSAL || s->key_count <= 0) return; /* no plan / no key to see */
    int64_t L = c->kind == LAMPE_CUDA_LAMPE && prompt_own > 0 ? prompt_own : s->key_count;
    if (prompt_own > 0 && c->kind != LAMPE_CUDA_LAMPE && prompt_own < s->key_count) {
        s->status = LAMPE_CUDA_ERR_ARG; /* the baselines have no rows after their plan */
        return;
    }
    if (L > LAMPE_CUDA_MAX_LENGTH) {
        s->status = LAMPE_CUDA_ERR_LENGTH;
        return;
    }
    const int64_t H = c->window, T = c->sink;
    const int64_t U = c->mapping_length > 0 ? c->mapping_length : lcu_sigmoid_eval(c, L);
    if (U < 1 || U > LAMPE_CUDA_MAX_LENGTH) {
        s->status = U < 1 ? LAMPE_CUDA_ERR_ARG : LAMPE_CUDA_ERR_LENGTH;
        return;
    }
    s->length = L;
    s->mapping_length = U;
    if (c->kind != LAMPE_CUDA_LAMPE) return;
    if (L > 1) s->ratio = lcu_mul_rn(lcu_div_rn(1.0f, lcu_i2f(L - 1)), lcu_i2f(U));
    s->fallback = L < 2 * H;
    /* §1.2: R is the last index of the chunk holding index T (R = T when T + 1 >= L). m is
     * non-decreasing, so that chunk is [T, first p with m(p) > m(T)) within [T, L - 1]. */
    int64_t R = T;
    if (T + 1 < L) {
        const int64_t mt = lcu_mapped_id(s, T);
        int64_t lo = T, hi = L - 1; /* m(lo) == mt; find the largest such index in [lo, hi] */
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo + 1) / 2;
            if (lcu_mapped_id(s, mid) == mt)
                lo = mid;
            else
                hi = mid - 1;
        }
        R = lo;
    }
    s->sink_size = R;
    if (L > H) { /* §1.3 */
        s->bias_map = H - (lcu_mapped_id(s, H) + 1);
        const int64_t idx = L - 1 - R;
        s->bias_sink = idx >= 0 ? idx - lcu_mapped_id(s, idx) - s->bias_map : 0;
    }
    if (!s->fallback && (R < 1 || R > L - H)) s->status = LAMPE_CUDA_ERR_SINK;
}

LCU_HD void lcu_put(lcu_region *out, int *n, int slot, int mapped, int64_t lo, int64_t hi, int64_t qpos,
                    int64_t shift, int64_t last_key)
{
    if (lo < 0) lo = 0;
    if (hi > last_key) hi = last_key; /* keys at own position >= key_count are never attended */
    if (lo > hi) return;
    lcu_region *r = &out[(*n)++];
    r->slot = slot;
    r->mapped = mapped;
    r->lo = lo;
    r->hi = hi;
    r->qpos = qpos;
    r->shift = shift;
}

/*
 * Regions of the query at own position `pos` (any value; < 0 gives none), in the order local,
 * map, sink (or one full region). Returns the count (0..3). Mirrors lampe_plan_regions.
 */
LCU_HD int lcu_row_regions(const lampe_cuda_seq *s, int64_t pos, lcu_region *out)
{
    int n = 0;
    const int64_t last = s->key_count - 1;
    if (pos < 0 || s->status != 0 || last < 0) return 0;
    if (s->kind == LAMPE_CUDA_CAUSAL || (s->kind == LAMPE_CUDA_LAMPE && s->fallback)) {
        lcu_put(out, &n, LCU_SLOT_TRUE, 0, 0, pos, pos, 0, last); /* §2.2 / §2.4 */
        return n;
    }
    const int64_t H = s->window, L = s->length, R = s->sink_size, b1 = s->bias_map, b2 = s->bias_sink;
    if (s->kind != LAMPE_CUDA_LAMPE) { /* SelfExtend / ReRoPE: every row planned as a prompt row */
        lcu_put(out, &n, LCU_SLOT_TRUE, 0, pos - H + 1, pos, pos, 0, last);
        const int64_t U = s->mapping_length;
        const int64_t q = s->kind == LAMPE_CUDA_SELFEXTEND ? pos / U + H - H / U : H;
        lcu_put(out, &n, LCU_SLOT_MAP, 1, 0, pos - H, q, 0, last);
        return n;
    }
    if (pos < L) { /* §2.1: the keys at d = H and d = L - R are visited twice, deliberately */
        lcu_put(out, &n, LCU_SLOT_TRUE, 0, pos - H, pos, pos, 0, last);
        if (pos >= H) lcu_put(out, &n, LCU_SLOT_MAP, 1, pos - (L - R), pos - H, lcu_mapped_id(s, pos) + b1, 0, last);
        if (pos >= L - R) lcu_put(out, &n, LCU_SLOT_SINK, 0, 0, pos - (L - R), pos - b2, 0, last);
        return n;
    }
    /* §0: a row after the prompt, step D; an exact partition of 0..pos ("shifted" rule). */
    const int64_t D = pos - L + 1;
    lcu_put(out, &n, LCU_SLOT_TRUE, 0, pos - H + 1, pos, pos, 0, last);
    lcu_put(out, &n, LCU_SLOT_MAP, 1, R + D, pos - H, lcu_mapped_id(s, L - 1) + b1, D, last);
    lcu_put(out, &n, LCU_SLOT_SINK, 0, 0, R + D - 1, pos - b2, 0, last);
    return n;
}

/* Own position of tensor query row t. */
LCU_HD int64_t lcu_row_pos(const lampe_cuda_seq *s, int64_t t) { return s->query_start + t; }

/*
 * Which kernel owns a row: the split-KV row kernel takes rows after the prompt of an active
 * LaMPE plan (each has its own map shift, so a tile of them would need one key rotation per row)
 * and every row when the call asked for it (few query rows: decode and speculative steps); the
 * tiled prefill kernel takes the rest. Every row is owned by exactly one of the two.
 */
LCU_HD int lcu_row_is_decode(const lampe_cuda_seq *s, int64_t pos, int all_decode)
{
    if (all_decode) return 1;
    return s->kind == LAMPE_CUDA_LAMPE && !s->fallback && s->status == 0 && s->key_count > 0 && pos >= s->length;
}

/* Angle of rotary pair k at position pos: f32(f32(pos) * inv_freq[k]) (spec §0). */
LCU_HD float lcu_angle(int64_t pos, float inv_freq) { return lcu_mul_rn(lcu_i2f(pos), inv_freq); }

/* Element indices of rotary pair k: (first, second) for the half / interleaved layouts. */
LCU_HD void lcu_pair_dims(int k, int rotary_dim, int interleaved, int *d1, int *d2)
{
    if (interleaved) {
        *d1 = 2 * k;
        *d2 = 2 * k + 1;
    } else {
        *d1 = k;
        *d2 = k + rotary_dim / 2;
    }
}

#endif
