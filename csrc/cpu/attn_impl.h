/*
 * Fused multi-grained attention, written once against simd.h and compiled per ISA.
 *
 * One work item = the G query heads sharing a KV head x a tile of query positions (or one key
 * chunk of such a tile, for split-KV decode). Each region kind (local, map, sink; "full" for
 * plain causal and fallback rows) is a "slot" with its own rotated copy of the queries and its
 * own rotation of the keys, packed per key block. All slots feed one running max/sum (online
 * softmax in log2 units), so a row's output is one exact softmax over the multiset of its
 * (region, key) visits. Never materialises more than a [rows x 64] score block.
 *
 * attn_item runs these steps (each a function below):
 *   1 collect_regions   each row's key range per slot, cut to the valid keys
 *   2 reset_rows        empty online-softmax state
 *   3 rotate_queries    queries rotated and scaled per slot (a NaN/inf query poisons its row)
 *   4 list_blocks       the (slot, key block) list a split-KV chunk takes its share of
 *   5 load_block_*      the three key-block loaders: panel (prefill panels packed once per call
 *                       by attn_pack), pack (rotate + transpose per block), direct (one query
 *                       position: scores keys as it reads them); values with load_block_values
 *   6 score_block       S = Q . K^T with the register-blocked micro-kernel
 *   7 softmax_update    soft-cap, mask, online max/sum/rescale, exponentiate; then pv_rows, O += P V
 *   8 write_rows        O / sum and LSE into the outputs, or write_partial for split-KV, whose
 *                       last chunk to finish a tile runs
 *   9 merge_tile        the log-sum-exp merge of the tile's chunks
 * NaN policy (lampe.h): keys and values holding NaN/inf are loaded as zeros and flagged; rows that
 * attend one are poisoned (NaN output, skipped). The per-thread scratch is lampe_attn_scratch
 * (csrc/core/attention.h), laid out by the same function the driver sizes it with.
 */
#ifndef LAMPE_ATTN_IMPL_H
#define LAMPE_ATTN_IMPL_H

#include "../core/attention.h"

#if LAMPE_LEVEL == 0
#define QK_MR 4
#elif LAMPE_LEVEL == 1
#define QK_MR 6
#else
#define QK_MR 8
#endif
#define QK_NR (2 * VW)
#define BK LAMPE_ATTN_BK
#define LDK LAMPE_ATTN_LDK
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* S[r][j] = <Q[r], K[:, j]> for QK_MR rows and nkp keys (a multiple of QK_NR), K packed [d][LDK]. */
static inline void qk_block(const float *Q, int64_t D, const float *Kp, float *S, int64_t nkp)
{
    for (int64_t j = 0; j < nkp; j += QK_NR) {
        vf a0[QK_MR], a1[QK_MR];
#pragma GCC unroll 8
        for (int r = 0; r < QK_MR; r++) a0[r] = a1[r] = v_zero();
        const float *kp = Kp + j;
        for (int64_t d = 0; d < D; d++) {
            const vf k0 = v_load(kp + d * LDK), k1 = v_load(kp + d * LDK + VW);
#pragma GCC unroll 8
            for (int r = 0; r < QK_MR; r++) {
                const vf q = v_set1(Q[r * D + d]);
                a0[r] = v_fma(q, k0, a0[r]);
                a1[r] = v_fma(q, k1, a1[r]);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < QK_MR; r++) {
            v_store(S + r * BK + j, a0[r]);
            v_store(S + r * BK + j + VW, a1[r]);
        }
    }
}

/* O[r][d0:d0+2VW] += P[r] . V[:, d0:d0+2VW] for 4 rows over nk keys (V rows ldv floats apart). */
static inline void pv4_chunk(float *const *P, float *const *O, const float *V, int64_t ldv, int64_t d0, int64_t nk)
{
    vf a[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) a[r][0] = v_load(O[r] + d0), a[r][1] = v_load(O[r] + d0 + VW);
    const float *vr = V + d0;
    for (int64_t j = 0; j < nk; j++, vr += ldv) {
        const vf v0 = v_load(vr), v1 = v_load(vr + VW);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const vf p = v_set1(P[r][j]);
            a[r][0] = v_fma(p, v0, a[r][0]);
            a[r][1] = v_fma(p, v1, a[r][1]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) v_store(O[r] + d0, a[r][0]), v_store(O[r] + d0 + VW, a[r][1]);
}

static inline void pv1(const float *P, float *O, const float *V, int64_t ldv, int64_t D, int64_t nk);

/* O[r] += P[r] . V for the active rows. The d-chunk loop is outermost so each V column slab
 * (nk x 2VW floats) stays in L1 while every row group uses it. */
static inline void pv_rows(const float *S, float *O, const int32_t *active, int64_t nact, const float *V, int64_t ldv,
                           int64_t D, int64_t nk)
{
    const int64_t n4 = nact / 4 * 4, Dv = D / (2 * VW) * (2 * VW);
    for (int64_t d0 = 0; d0 < Dv; d0 += 2 * VW)
        for (int64_t a = 0; a < n4; a += 4) {
            float *Pr[4], *Or[4];
            for (int i = 0; i < 4; i++) Pr[i] = (float *)S + active[a + i] * BK, Or[i] = O + active[a + i] * D;
            pv4_chunk(Pr, Or, V, ldv, d0, nk);
        }
    if (Dv < D) /* head dims that are not a multiple of 2VW: the rest, row by row */
        for (int64_t a = 0; a < n4; a++) {
            const float *Pr = S + active[a] * BK;
            float *Or = O + active[a] * D;
            for (int64_t d = Dv; d < D; d++) {
                float acc = Or[d];
                for (int64_t j = 0; j < nk; j++) acc += Pr[j] * V[j * ldv + d];
                Or[d] = acc;
            }
        }
    for (int64_t a = n4; a < nact; a++) pv1(S + active[a] * BK, O + active[a] * D, V, ldv, D, nk);
}

static inline void pv1(const float *P, float *O, const float *V, int64_t ldv, int64_t D, int64_t nk)
{
    int64_t d = 0;
    for (; d + 4 * VW <= D; d += 4 * VW) {
        vf a0 = v_load(O + d), a1 = v_load(O + d + VW), a2 = v_load(O + d + 2 * VW), a3 = v_load(O + d + 3 * VW);
        const float *vr = V + d;
        for (int64_t j = 0; j < nk; j++, vr += ldv) {
            const vf p = v_set1(P[j]);
            a0 = v_fma(p, v_load(vr), a0); a1 = v_fma(p, v_load(vr + VW), a1);
            a2 = v_fma(p, v_load(vr + 2 * VW), a2); a3 = v_fma(p, v_load(vr + 3 * VW), a3);
        }
        v_store(O + d, a0); v_store(O + d + VW, a1); v_store(O + d + 2 * VW, a2); v_store(O + d + 3 * VW, a3);
    }
    for (; d + VW <= D; d += VW) {
        vf a = v_load(O + d);
        for (int64_t j = 0; j < nk; j++) a = v_fma(v_set1(P[j]), v_load(V + j * ldv + d), a);
        v_store(O + d, a);
    }
    for (; d < D; d++) {
        float a = O[d];
        for (int64_t j = 0; j < nk; j++) a += P[j] * V[j * ldv + d];
        O[d] = a;
    }
}

/* cos/sin for one position: from the cached table when it covers pos, else computed. */
static inline void attn_angles(const lampe_attn_params *p, int64_t pos, float amp, float *c, float *s)
{
    const int64_t n2 = p->rotary_dim / 2;
    if (p->rope_cos && pos >= 0 && pos < p->rope_table_len) {
        const float *tc = p->rope_cos + pos * n2, *ts = p->rope_sin + pos * n2;
        if (amp == 1.0f) {
            memcpy(c, tc, (size_t)n2 * 4);
            memcpy(s, ts, (size_t)n2 * 4);
        } else {
            for (int64_t k = 0; k < n2; k++) {
                c[k] = tc[k] * amp;
                s[k] = ts[k] * amp;
            }
        }
        return;
    }
    rope_angles(pos, p->inv_freq, n2, amp, c, s);
}

/* 1 when every x[i] is finite: x - x is 0 for finite x, NaN for NaN and +-inf. */
static inline int row_finite(const float *x, int64_t n)
{
    vf acc = v_zero();
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        const vf a = v_load(x + i);
        acc = v_add(acc, v_sub(a, a));
    }
    float t = v_hsum(acc);
    for (; i < n; i++) t += x[i] - x[i];
    return t == 0.0f;
}

/* Convert one row to float32; a row holding NaN or inf becomes zeros (so it cannot reach the
 * rows that do not attend it through 0 * NaN) and the function returns 0. float32 rows are
 * copied and checked in one pass. */
static inline int load_row_finite(int dtype, const void *src, float *dst, int64_t n)
{
    if (dtype == LAMPE_F32) {
        const float *x = (const float *)src;
        vf acc = v_zero();
        int64_t i = 0;
        for (; i + VW <= n; i += VW) {
            const vf a = v_load(x + i);
            v_store(dst + i, a);
            acc = v_add(acc, v_sub(a, a));
        }
        float t = v_hsum(acc);
        for (; i < n; i++) {
            dst[i] = x[i];
            t += x[i] - x[i];
        }
        if (t == 0.0f) return 1;
    } else {
        cvt_row_to_f32(dtype, src, dst, n);
        if (row_finite(dst, n)) return 1;
    }
    memset(dst, 0, (size_t)n * 4);
    return 0;
}

/* Rotate one key row by position kpos and store it as column `col` of a [D][LDK] panel; returns
 * 0 (and stores zeros) when the key is not finite. */
static inline int pack_key(const lampe_attn_params *p, const char *src, int64_t kpos, float *col, float *row,
                           float *cs, float *sn)
{
    const int64_t D = p->head_dim;
    const int ok = load_row_finite(p->dtype, src, row, D);
    attn_angles(p, kpos, 1.0f, cs, sn);
    rope_row_f32(row, cs, sn, p->rotary_dim / 2, p->layout);
    for (int64_t d = 0; d < D; d++) col[d * LDK] = row[d];
    return ok;
}

/*
 * Prefill panels of batch row work->panel_b: item = (kind, kv head, block), kind 0 keys at their
 * true positions, 1 keys at mapped positions m[j] (prompt rows), 2 values converted to float32.
 * Keys no prompt row can see in that rotation are zeros.
 */
static void attn_pack(const lampe_attn_work *work, int64_t item, float *scratch)
{
    const lampe_attn_params *p = work->p;
    const int64_t D = p->head_dim, nb = work->nblk;
    const int64_t kind = item / (p->kv_heads * nb), rest = item % (p->kv_heads * nb);
    const int64_t kvh = rest / nb, blk = rest % nb, b = work->panel_b;
    const int64_t off = p->seqs[b].key_offset, count = p->seqs[b].key_count;
    const lampe_plan *plan = p->seqs[b].plan;
    const size_t es = dtype_size(p->dtype);
    const int64_t k0 = blk * BK, k1 = k0 + BK < p->kv_len ? k0 + BK : p->kv_len;
    lampe_attn_scratch sc;
    lampe_attn_scratch_carve(&sc, scratch, work->max_rows + LAMPE_ATTN_ROW_PAD, D, work->ldv);
    float *cs = sc.cos, *sn = sc.sin, *row = sc.row;
    uint8_t *bad = work->key_bad + kvh * p->kv_len;
    if (kind == 2) {
        const char *vbase = (const char *)p->v;
        int any = 0;
        for (int64_t j = k0; j < k1; j++) {
            float *dst = work->vconv + (kvh * p->kv_len + j) * work->ldv;
            if (j - off < 0 || j - off >= count) { /* never attended */
                memset(dst, 0, (size_t)D * 4);
                continue;
            }
            if (!load_row_finite(p->dtype, vbase + (size_t)(b * p->v_stride[0] + kvh * p->v_stride[1] + j * p->v_stride[2]) * es,
                                 dst, D)) {
                bad[j] |= 2;
                any = 1;
            }
        }
        work->block_bad[kvh * nb + blk] |= (uint8_t)any;
        return;
    }
    float *panel = (kind ? work->panel_map : work->panel_id) + (kvh * nb + blk) * D * LDK;
    const char *kbase = (const char *)p->k;
    int any = 0;
    for (int64_t jj = 0; jj < BK; jj++) {
        const int64_t j = k0 + jj, jl = j - off;
        const int visible = j < k1 && jl >= 0 && jl < count && (kind == 0 || jl < plan->length);
        if (j < k1 && kind == 0) bad[j] = 0;
        if (!visible) {
            for (int64_t d = 0; d < D; d++) panel[d * LDK + jj] = 0.0f;
            continue;
        }
        const int ok = pack_key(p, kbase + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es,
                                kind ? plan->mapped_ids[jl] : jl, panel + jj, row, cs, sn);
        if (!ok && kind == 0) {
            bad[j] = 1;
            any = 1;
        }
    }
    if (kind == 0) work->block_bad[kvh * nb + blk] = (uint8_t)any;
}

/* dst = R(b)^T src for one row: undo a rotation whose cos/sin are c/s (pass-through dims copied).
 * <R(a) q, R(b) k> = <R(b)^T R(a) q, k> exactly, with the same table values, so a single
 * decode row can rotate its query once per distinct key position and read keys as stored. */
static inline void rope_row_inv(const float *src, float *dst, const float *c, const float *s, int64_t n2, int64_t D,
                                int layout)
{
    if (layout == LAMPE_LAYOUT_HALF) {
        int64_t k = 0;
        for (; k + VW <= n2; k += VW) {
            const vf x1 = v_load(src + k), x2 = v_load(src + n2 + k), cc = v_load(c + k), ss = v_load(s + k);
            v_store(dst + k, v_add(v_mul(x1, cc), v_mul(x2, ss)));
            v_store(dst + n2 + k, v_sub(v_mul(x2, cc), v_mul(x1, ss)));
        }
        for (; k < n2; k++) {
            const float x1 = src[k], x2 = src[n2 + k];
            dst[k] = x1 * c[k] + x2 * s[k];
            dst[n2 + k] = x2 * c[k] - x1 * s[k];
        }
    } else {
        for (int64_t k = 0; k < n2; k++) {
            const float x1 = src[2 * k], x2 = src[2 * k + 1];
            dst[2 * k] = x1 * c[k] + x2 * s[k];
            dst[2 * k + 1] = x2 * c[k] - x1 * s[k];
        }
    }
    for (int64_t d = 2 * n2; d < D; d++) dst[d] = src[d];
}

/* out[g * BK] = <Q[g], k> for G rows of Q (D floats each). */
static inline void dot_rows(const float *Q, int64_t G, const float *k, int64_t D, float *out)
{
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
        const float *q0 = Q + g * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
        vf a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
        int64_t d = 0;
        for (; d + VW <= D; d += VW) {
            const vf kv = v_load(k + d);
            a0 = v_fma(v_load(q0 + d), kv, a0);
            a1 = v_fma(v_load(q1 + d), kv, a1);
            a2 = v_fma(v_load(q2 + d), kv, a2);
            a3 = v_fma(v_load(q3 + d), kv, a3);
        }
        float s0 = v_hsum(a0), s1 = v_hsum(a1), s2 = v_hsum(a2), s3 = v_hsum(a3);
        for (; d < D; d++) s0 += q0[d] * k[d], s1 += q1[d] * k[d], s2 += q2[d] * k[d], s3 += q3[d] * k[d];
        out[g * BK] = s0, out[(g + 1) * BK] = s1, out[(g + 2) * BK] = s2, out[(g + 3) * BK] = s3;
    }
    for (; g < G; g++) {
        const float *q0 = Q + g * D;
        vf a0 = v_zero();
        int64_t d = 0;
        for (; d + VW <= D; d += VW) a0 = v_fma(v_load(q0 + d), v_load(k + d), a0);
        float s0 = v_hsum(a0);
        for (; d < D; d++) s0 += q0[d] * k[d];
        out[g * BK] = s0;
    }
}

/* S[j] = c2 * tanh(S[j] / c2) for n lanes (a multiple of VW). */
static inline void softcap_row(float *S, int64_t n, float c2)
{
    const vf inv = v_set1(1.0f / c2), c = v_set1(c2);
    for (int64_t j = 0; j < n; j += VW) v_store(S + j, v_mul(v_tanh(v_mul(v_load(S + j), inv)), c));
}

/* ------------------------------------------------------------------ one work item, step by step */

/* Where the rows of a tile look in one slot (local, map, sink; slot 0 also holds "full" rows):
 * key tensor indices lo[pi]..hi[pi] of position pi (lo > hi: none), seen from query position
 * qpos[pi]; keys at mapped positions m[j - shift] when `mapped`. */
typedef struct slot_rows {
    int present, mapped;
    int64_t shift, lo_min, hi_max;
    int64_t lo[LAMPE_ATTN_MAX_BQ], hi[LAMPE_ATTN_MAX_BQ], qpos[LAMPE_ATTN_MAX_BQ];
} slot_rows;

/* One work item: a tile's rows (G heads x npos positions, row r = pi * G + g), their slots, and
 * the per-thread scratch (lampe_attn_scratch, laid out as the driver sized it). */
typedef struct attn_ctx {
    const lampe_attn_work *work;
    const lampe_attn_params *p;
    const lampe_plan *plan;
    lampe_attn_scratch sc;
    slot_rows slots[3];
    int64_t item, b, kvh, t0, npos, M, Mp, D, G, n2, off;
    size_t es;
    float qamp, qscale, cap2; /* query amplitude (s^2 for LaMPE rows), scale * log2(e), softcap * log2(e) */
    int capped, use_panels, direct;
    int64_t cur_kpos; /* direct mode: the key position (and slot) q_direct is rotated back by */
    int cur_slot;
} attn_ctx;

/* One key block of one slot: keys k0..k1-1, rotated and transposed (Kb) or, in direct mode,
 * already scored; values as float32 rows ldv apart (Vr); keys whose key or value row is not
 * finite (bad[0..nbad-1], stored as zeros). */
typedef struct attn_block {
    int64_t k0, k1, nbad;
    const float *Kb, *Vr;
} attn_block;

static const char *k_row(const attn_ctx *c, int64_t j)
{
    const lampe_attn_params *p = c->p;
    return (const char *)p->k + (size_t)(c->b * p->k_stride[0] + c->kvh * p->k_stride[1] + j * p->k_stride[2]) * c->es;
}

static const char *v_row(const attn_ctx *c, int64_t j)
{
    const lampe_attn_params *p = c->p;
    return (const char *)p->v + (size_t)(c->b * p->v_stride[0] + c->kvh * p->v_stride[1] + j * p->v_stride[2]) * c->es;
}

static void begin_item(attn_ctx *c, const lampe_attn_work *work, int64_t item, float *scratch)
{
    const lampe_attn_params *p = work->p;
    const lampe_attn_tile *tile = &work->tiles[item / work->nchunks];
    c->work = work;
    c->p = p;
    c->item = item;
    c->b = tile->b;
    c->kvh = tile->kvh;
    c->t0 = tile->t0;
    c->npos = tile->t1 - tile->t0;
    c->D = p->head_dim;
    c->G = work->group;
    c->n2 = p->rotary_dim / 2;
    c->M = c->npos * c->G;
    c->Mp = (c->M + QK_MR - 1) / QK_MR * QK_MR;
    c->off = p->seqs[c->b].key_offset;
    c->plan = p->seqs[c->b].plan;
    c->es = dtype_size(p->dtype);
    /* Amplitude s on queries and keys = s^2 on the query alone (rotated dims only). */
    c->qamp = c->plan ? p->amplitude * p->amplitude : 1.0f;
    c->qscale = p->scale * LOG2E;
    /* soft-capping in log2 units: log2e * c * tanh(x / c) = c2 * tanh(S / c2) with c2 = c * log2e */
    c->capped = p->softcap > 0.0f;
    c->cap2 = p->softcap * LOG2E;
    c->use_panels = (int)tile->panel;
    c->direct = c->npos == 1 && !c->use_panels;
    c->cur_kpos = INT64_MIN;
    c->cur_slot = -1;
    lampe_attn_scratch_carve(&c->sc, scratch, work->max_rows + LAMPE_ATTN_ROW_PAD, c->D, work->ldv);
}

/* Step 1, regions: each row's key ranges per slot, from its plan (or the full causal range), cut
 * to the valid keys. */
static void collect_regions(attn_ctx *c)
{
    const lampe_attn_seq *seq = &c->p->seqs[c->b];
    for (int s = 0; s < 3; s++) {
        slot_rows *sr = &c->slots[s];
        sr->present = sr->mapped = 0;
        sr->shift = 0;
        sr->lo_min = INT64_MAX;
        sr->hi_max = INT64_MIN;
        for (int64_t pi = 0; pi < c->npos; pi++) {
            sr->lo[pi] = 1;
            sr->hi[pi] = 0;
        }
    }
    const int64_t last_key = seq->key_count - 1; /* own position of the last valid key */
    for (int64_t pi = 0; pi < c->npos; pi++) {
        const int64_t pos = seq->query_start + c->t0 + pi;
        if (pos < 0) continue; /* a padded query: no valid key, output zeros */
        lampe_region regs[LAMPE_MAX_REGIONS];
        int n = 0;
        if (c->plan) {
            if (lampe_plan_regions(c->plan, pos, regs, &n) != LAMPE_OK) n = 0; /* driver pre-checks */
        } else {
            regs[0] = (lampe_region){LAMPE_REGION_FULL, 0, 0, pos, pos, 0};
            n = 1;
        }
        for (int r = 0; r < n; r++) {
            const int64_t hi = regs[r].key_hi < last_key ? regs[r].key_hi : last_key;
            if (regs[r].key_lo > hi) continue; /* only keys past the valid ones */
            slot_rows *sr = &c->slots[regs[r].kind == LAMPE_REGION_FULL ? 0 : regs[r].kind];
            sr->present = 1;
            sr->mapped = regs[r].mapped;
            sr->shift = regs[r].shift; /* uniform in a tile: the driver gives later rows tiles of one */
            sr->lo[pi] = regs[r].key_lo + c->off;
            sr->hi[pi] = hi + c->off;
            sr->qpos[pi] = regs[r].qpos;
            if (sr->lo[pi] < sr->lo_min) sr->lo_min = sr->lo[pi];
            if (sr->hi[pi] > sr->hi_max) sr->hi_max = sr->hi[pi];
        }
    }
}

/* Step 2, the online softmax starts empty: O = 0, max = -inf, sum = 0, no row poisoned. */
static void reset_rows(attn_ctx *c)
{
    memset(c->sc.o, 0, (size_t)(c->Mp * c->D) * 4);
    for (int64_t r = 0; r < c->Mp; r++) {
        c->sc.m[r] = -INFINITY;
        c->sc.l[r] = 0.0f;
        c->sc.poisoned[r] = 0;
    }
}

/* Step 3, query rotation per slot: every query once per slot it has keys in, times scale * log2e
 * (and s^2); trigonometry once per (position, slot) for all G heads. A query holding NaN or inf
 * poisons its row and stays zero. */
static void rotate_queries(attn_ctx *c)
{
    const lampe_attn_params *p = c->p;
    const int64_t D = c->D, G = c->G;
    for (int s = 0; s < 3; s++) {
        const slot_rows *sr = &c->slots[s];
        if (!sr->present) continue;
        float *Q = c->sc.q_slot[s];
        memset(Q, 0, (size_t)(c->Mp * D) * 4);
        for (int64_t pi = 0; pi < c->npos; pi++) {
            if (sr->lo[pi] > sr->hi[pi]) continue;
            attn_angles(p, sr->qpos[pi], c->qamp, c->sc.cos, c->sc.sin);
            for (int64_t g = 0; g < G; g++) {
                float *qr = Q + (pi * G + g) * D;
                const char *src = (const char *)p->q + (size_t)(c->b * p->q_stride[0] + (c->kvh * G + g) * p->q_stride[1] +
                                                                (c->t0 + pi) * p->q_stride[2]) * c->es;
                if (!load_row_finite(p->dtype, src, qr, D)) { /* the row attends a NaN/inf query */
                    c->sc.poisoned[pi * G + g] = 1;
                    continue;
                }
                rope_row_f32(qr, c->sc.cos, c->sc.sin, c->n2, p->layout);
                for (int64_t d = 0; d < D; d++) qr[d] *= c->qscale;
            }
        }
    }
}

/* Step 4, the tile's (slot, key block) list, as first block and count per slot; returns the total
 * (a split-KV chunk takes a contiguous share). With panels, blocks are the panels' fixed
 * BK-aligned blocks; otherwise they start at the slot's range. */
static int64_t list_blocks(const attn_ctx *c, int64_t first[3], int64_t nblk[3])
{
    int64_t total = 0;
    for (int s = 0; s < 3; s++) {
        const slot_rows *sr = &c->slots[s];
        first[s] = nblk[s] = 0;
        if (!sr->present) continue;
        if (c->use_panels) {
            first[s] = sr->lo_min / BK;
            nblk[s] = sr->hi_max / BK - first[s] + 1;
        } else {
            nblk[s] = (sr->hi_max - sr->lo_min + BK) / BK;
        }
        total += nblk[s];
    }
    return total;
}

/* Step 5a, panel loader: prompt rows read the block of the prefill panels (keys rotated once per
 * call) and the values converted with them; flagged keys come from the pack. */
static void load_block_panel(const attn_ctx *c, int s, int64_t pb, attn_block *kb)
{
    const lampe_attn_work *w = c->work;
    const int64_t Lk = c->p->kv_len;
    kb->k0 = pb * BK;
    kb->k1 = kb->k0 + BK < Lk ? kb->k0 + BK : Lk;
    kb->Kb = (c->slots[s].mapped ? w->panel_map : w->panel_id) + (c->kvh * w->nblk + pb) * c->D * LDK;
    kb->Vr = w->vconv + (c->kvh * Lk + kb->k0) * w->ldv;
    kb->nbad = 0;
    if (w->block_bad[c->kvh * w->nblk + pb])
        for (int64_t j = kb->k0; j < kb->k1; j++)
            if (w->key_bad[c->kvh * Lk + j]) c->sc.bad[kb->nbad++] = j;
}

/* The key range of non-panel block `blk` of slot s. */
static void block_range(const attn_ctx *c, int s, int64_t blk, attn_block *kb)
{
    const slot_rows *sr = &c->slots[s];
    kb->k0 = sr->lo_min + blk * BK;
    kb->k1 = kb->k0 + BK <= sr->hi_max + 1 ? kb->k0 + BK : sr->hi_max + 1;
    kb->nbad = 0;
}

/* Values into a padded float32 block: sequential reads from memory, and P.V's column slabs then
 * stay in L1 without set conflicts. A value row holding NaN or inf is stored as zeros, flagged. */
static void load_block_values(const attn_ctx *c, attn_block *kb)
{
    const int64_t ldv = c->work->ldv;
    for (int64_t j = kb->k0; j < kb->k1; j++)
        if (!load_row_finite(c->p->dtype, v_row(c, j), c->sc.v_block + (j - kb->k0) * ldv, c->D)) c->sc.bad[kb->nbad++] = j;
    kb->Vr = c->sc.v_block;
}

/* Step 5b, pack loader: rotate each key by this slot's key position and store it transposed
 * (the Q.K^T micro-kernel's panel), zero columns past the block's keys. */
static void load_block_pack(attn_ctx *c, int s, int64_t blk, attn_block *kb)
{
    const slot_rows *sr = &c->slots[s];
    const int64_t D = c->D;
    float *Kp = c->sc.k_block;
    block_range(c, s, blk, kb);
    for (int64_t j = kb->k0; j < kb->k1; j++) {
        const int64_t kpos = sr->mapped ? c->plan->mapped_ids[j - c->off - sr->shift] : j - c->off;
        if (!pack_key(c->p, k_row(c, j), kpos, Kp + (j - kb->k0), c->sc.row, c->sc.cos, c->sc.sin)) c->sc.bad[kb->nbad++] = j;
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t jj = kb->k1 - kb->k0; jj < BK; jj++) Kp[d * LDK + jj] = 0.0f;
    kb->Kb = Kp;
    load_block_values(c, kb);
}

/* Direct mode scores keys unchecked: a key holding NaN or inf gives a non-finite score in every
 * row (queries are finite: a bad query's row is zero and poisoned), so only a block with a
 * non-finite score has its raw keys checked. Returns the new count of flagged keys; non-finite
 * scores of finite keys are logits that overflowed. */
static int64_t direct_bad_keys(const attn_ctx *c, const attn_block *kb)
{
    int finite = 1;
    for (int64_t g = 0; g < c->G && finite; g++) finite = row_finite(c->sc.scores + g * BK, kb->k1 - kb->k0);
    if (finite) return kb->nbad;
    int64_t nbad = kb->nbad;
    for (int64_t j = kb->k0; j < kb->k1; j++) {
        const char *src = k_row(c, j);
        int ok = 1;
        for (int64_t d = 0; d < c->D && ok; d++) {
            const float x = c->p->dtype == LAMPE_F32 ? ((const float *)src)[d]
                            : c->p->dtype == LAMPE_BF16 ? lampe_bf16_to_f32(((const uint16_t *)src)[d])
                                                        : lampe_f16_to_f32(((const uint16_t *)src)[d]);
            ok = x - x == 0.0f;
        }
        if (!ok) c->sc.bad[nbad++] = j;
    }
    if (nbad == kb->nbad) atomic_store(c->work->overflow, 1);
    return nbad;
}

/* Step 5c, direct loader (one query position): scores the block's keys against the G query rows
 * as they are read. Keys at true positions are rotated one by one; keys at mapped positions come
 * in runs sharing a position, so the G queries are rotated back once per run and the keys read as
 * stored (<R(a) q, R(b) k> = <R(b)^T R(a) q, k>). Keys are not checked on the way: a block with a
 * non-finite score has its raw keys checked afterwards (direct_bad_keys). */
static void load_block_direct(attn_ctx *c, int s, int64_t blk, attn_block *kb)
{
    const lampe_attn_params *p = c->p;
    const slot_rows *sr = &c->slots[s];
    const int64_t D = c->D, G = c->G;
    const float *Q = c->sc.q_slot[s];
    float *Qd = c->sc.q_direct, *row = c->sc.row, *S = c->sc.scores;
    block_range(c, s, blk, kb);
    for (int64_t j = kb->k0; j < kb->k1; j++) {
        const int64_t jj = j - kb->k0;
        const char *src = k_row(c, j);
        /* P.V walks this block's V rows column slab by column slab; start pulling each row from
         * memory now, while the scores are computed. */
        const char *vpre = v_row(c, j);
        for (size_t by = 0; by < (size_t)D * c->es; by += 64) __builtin_prefetch(vpre + by, 0, 1);
        /* keys are read one row at a time: ask for rows well ahead of use */
        if (j + 8 < kb->k1) {
            const char *kpre = src + (size_t)(8 * p->k_stride[2]) * c->es;
            for (size_t by = 0; by < (size_t)D * c->es; by += 64) __builtin_prefetch(kpre + by, 0, 0);
        }
        if (!sr->mapped) { /* true positions: every key has its own, so rotate the key once */
            cvt_row_to_f32(p->dtype, src, row, D);
            attn_angles(p, j - c->off, 1.0f, c->sc.cos, c->sc.sin);
            rope_row_f32(row, c->sc.cos, c->sc.sin, c->n2, p->layout);
            dot_rows(Q, G, row, D, S + jj);
            continue;
        }
        const int64_t kpos = c->plan->mapped_ids[j - c->off - sr->shift];
        if (kpos != c->cur_kpos || s != c->cur_slot) {
            attn_angles(p, kpos, 1.0f, c->sc.cos, c->sc.sin);
            for (int64_t g = 0; g < G; g++) rope_row_inv(Q + g * D, Qd + g * D, c->sc.cos, c->sc.sin, c->n2, D, p->layout);
            c->cur_kpos = kpos;
            c->cur_slot = s;
        }
        const float *kr = (const float *)src;
        if (p->dtype != LAMPE_F32) {
            cvt_row_to_f32(p->dtype, src, row, D);
            kr = row;
        }
        dot_rows(Qd, G, kr, D, S + jj);
    }
    load_block_values(c, kb);
    kb->nbad = direct_bad_keys(c, kb);
}

/* Rows whose range in slot s holds a flagged key attend a NaN or inf input: they are poisoned
 * (NaN output) and skipped from now on. */
static void poison_rows(attn_ctx *c, int s, const attn_block *kb)
{
    const slot_rows *sr = &c->slots[s];
    for (int64_t r = 0; r < c->M; r++)
        for (int64_t e = 0; e < kb->nbad && !c->sc.poisoned[r]; e++)
            if (c->sc.bad[e] >= sr->lo[r / c->G] && c->sc.bad[e] <= sr->hi[r / c->G]) c->sc.poisoned[r] = 1;
}

/* Step 6, scores: S = Q . K^T for every row block that meets this key block. */
static void score_block(attn_ctx *c, int s, const attn_block *kb, int64_t nkp)
{
    const slot_rows *sr = &c->slots[s];
    const float *Q = c->sc.q_slot[s];
    for (int64_t r0 = 0; r0 < c->M; r0 += QK_MR) {
        int meets = 0;
        for (int64_t r = r0; r < r0 + QK_MR && r < c->M && !meets; r++) {
            const int64_t pi = r / c->G;
            meets = sr->lo[pi] < kb->k1 && sr->hi[pi] >= kb->k0 && !c->sc.poisoned[r];
        }
        if (meets) qk_block(Q + r0 * c->D, c->D, kb->Kb, c->sc.scores + r0 * BK, nkp);
    }
}

/* Step 7, online softmax update (log2 units): soft-cap, mask keys outside each row's range with
 * -inf, raise the running max, rescale the sum and O, exponentiate. Returns the rows the block
 * updates (listed in sc.active) for P.V. Finite inputs whose logits are all -inf overflowed. */
static int64_t softmax_update(attn_ctx *c, int s, const attn_block *kb, int64_t nkp)
{
    const slot_rows *sr = &c->slots[s];
    const int64_t nk = kb->k1 - kb->k0, D = c->D;
    float *mrow = c->sc.m, *lrow = c->sc.l;
    int64_t nact = 0;
    for (int64_t r = 0; r < c->M; r++) {
        const int64_t pi = r / c->G;
        const int64_t lo = sr->lo[pi] > kb->k0 ? sr->lo[pi] - kb->k0 : 0;
        const int64_t hi = sr->hi[pi] < kb->k1 - 1 ? sr->hi[pi] - kb->k0 : nk - 1;
        if (lo > hi || c->sc.poisoned[r]) continue;
        float *Sr = c->sc.scores + r * BK;
        if (c->capped) softcap_row(Sr, nkp, c->cap2);
        for (int64_t jj = 0; jj < lo; jj++) Sr[jj] = -INFINITY;
        for (int64_t jj = hi + 1; jj < nkp; jj++) Sr[jj] = -INFINITY;
        vf vm = v_set1(-INFINITY);
        for (int64_t jj = 0; jj < nkp; jj += VW) vm = v_max(vm, v_load(Sr + jj));
        const float mx = v_hmax(vm);
        const float mnew = mx > mrow[r] ? mx : mrow[r];
        if (mnew == -INFINITY) { /* every logit -inf: finite inputs overflowed */
            atomic_store(c->work->overflow, 1);
            continue;
        }
        const float alpha = mrow[r] == -INFINITY ? 0.0f : exp2f(mrow[r] - mnew);
        const vf vmn = v_set1(mnew);
        vf vs = v_zero();
        for (int64_t jj = 0; jj < nkp; jj += VW) {
            const vf e = v_exp2(v_sub(v_load(Sr + jj), vmn));
            v_store(Sr + jj, e);
            vs = v_add(vs, e);
        }
        lrow[r] = lrow[r] * alpha + v_hsum(vs);
        if (alpha != 1.0f) {
            float *Or = c->sc.o + r * D;
            const vf va = v_set1(alpha);
            int64_t d = 0;
            for (; d + VW <= D; d += VW) v_store(Or + d, v_mul(v_load(Or + d), va));
            for (; d < D; d++) Or[d] *= alpha;
        }
        mrow[r] = mnew;
        c->sc.active[nact++] = (int32_t)r;
    }
    return nact;
}

/* Store one output row (float32 O, normalised) and its LSE (natural log). */
static void store_row(const lampe_attn_params *p, int64_t b, int64_t h, int64_t t, const float *o, float lse)
{
    const size_t es = dtype_size(p->dtype);
    cvt_row_from_f32(p->dtype, o, (char *)p->out + (size_t)(b * p->out_stride[0] + h * p->out_stride[1] + t * p->out_stride[2]) * es,
                     p->head_dim);
    if (p->lse) p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] + t * p->lse_stride[2]] = lse;
}

/* Step 8a, write-out: O / sum into the output rows (NaN for poisoned rows), LSE = (max + log2 sum)
 * ln 2, or zeros and -inf for a row that saw no key. */
static void write_rows(attn_ctx *c)
{
    for (int64_t r = 0; r < c->M; r++) {
        const int64_t pi = r / c->G, h = c->kvh * c->G + r % c->G;
        float *Or = c->sc.o + r * c->D;
        const int poisoned = c->sc.poisoned[r];
        const float l = c->sc.l[r];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < c->D; d++) Or[d] = poisoned ? NAN : Or[d] * inv;
        store_row(c->p, c->b, h, c->t0 + pi, Or, poisoned ? NAN : l > 0.0f ? (c->sc.m[r] + log2f(l)) * LN2 : -INFINITY);
    }
}

/* Step 9, split-KV merge of tile ti once all its chunks are in: out = sum_c 2^(m_c - m) O_c /
 * sum_c 2^(m_c - m) l_c over the chunks that saw keys (m = the largest of their maxima); a row
 * poisoned in any chunk (max NaN) is NaN. acc: D floats. */
static void merge_tile(const lampe_attn_work *work, int64_t ti, float *acc)
{
    const lampe_attn_params *p = work->p;
    const lampe_attn_tile *tile = &work->tiles[ti];
    const int64_t D = p->head_dim, G = work->group, C = work->nchunks, M = (tile->t1 - tile->t0) * G;
    for (int64_t r = 0; r < M; r++) {
        float m = -INFINITY;
        int poisoned = 0;
        for (int64_t ch = 0; ch < C; ch++) {
            const float *ml = work->part_ml + ((ti * C + ch) * work->max_rows + r) * 2;
            poisoned |= isnan(ml[0]);
            if (ml[1] > 0.0f && ml[0] > m) m = ml[0];
        }
        float l = 0.0f;
        memset(acc, 0, (size_t)D * 4);
        if (poisoned) { /* the row attends a NaN or inf input */
            for (int64_t d = 0; d < D; d++) acc[d] = NAN;
            m = NAN;
            l = 1.0f;
        } else if (m != -INFINITY) {
            for (int64_t ch = 0; ch < C; ch++) {
                const float *ml = work->part_ml + ((ti * C + ch) * work->max_rows + r) * 2;
                if (!(ml[1] > 0.0f)) continue;
                const float w = exp2f(ml[0] - m);
                const float *o = work->part_o + ((ti * C + ch) * work->max_rows + r) * D;
                l += w * ml[1];
                for (int64_t d = 0; d < D; d++) acc[d] += w * o[d];
            }
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) acc[d] *= inv; /* NaN stays NaN */
        store_row(p, tile->b, tile->kvh * G + r % G, tile->t0 + r / G, acc,
                  l > 0.0f ? (m + log2f(l)) * LN2 : -INFINITY);
    }
}

/* Step 8b, partial write: this chunk's (O, max, sum) for the merge, max = NaN for a poisoned row.
 * The chunk that completes its tile merges it (the counter's acquire-release orders every
 * chunk's partial before the merge reads it). */
static void write_partial(attn_ctx *c)
{
    const lampe_attn_work *w = c->work;
    float *po = w->part_o + c->item * w->max_rows * c->D;
    float *pml = w->part_ml + c->item * w->max_rows * 2;
    memcpy(po, c->sc.o, (size_t)(c->M * c->D) * 4);
    for (int64_t r = 0; r < c->M; r++) {
        pml[2 * r] = c->sc.poisoned[r] ? NAN : c->sc.m[r];
        pml[2 * r + 1] = c->sc.l[r];
    }
    const int64_t ti = c->item / w->nchunks;
    if (atomic_fetch_add_explicit(&w->tile_done[ti], 1, memory_order_acq_rel) == w->nchunks - 1)
        merge_tile(w, ti, c->sc.row);
}

/* One work item: a query tile, or one key chunk of it (split-KV). */
static void attn_item(const lampe_attn_work *work, int64_t item, float *scratch)
{
    attn_ctx c;
    begin_item(&c, work, item, scratch);
    collect_regions(&c);
    reset_rows(&c);
    rotate_queries(&c);
    int64_t first[3], nblk[3];
    const int64_t total = list_blocks(&c, first, nblk), chunk = item % work->nchunks;
    const int64_t cb0 = total * chunk / work->nchunks, cb1 = total * (chunk + 1) / work->nchunks;
    int64_t idx = 0;
    for (int s = 0; s < 3; s++) {
        for (int64_t blk = 0; blk < nblk[s]; blk++, idx++) {
            if (idx < cb0 || idx >= cb1) continue;
            attn_block kb;
            if (c.use_panels)
                load_block_panel(&c, s, first[s] + blk, &kb);
            else if (c.direct)
                load_block_direct(&c, s, blk, &kb);
            else
                load_block_pack(&c, s, blk, &kb);
            if (kb.nbad) poison_rows(&c, s, &kb);
            const int64_t nk = kb.k1 - kb.k0, nkp = (nk + QK_NR - 1) / QK_NR * QK_NR;
            if (!c.direct) score_block(&c, s, &kb, nkp); /* direct mode scored while loading */
            const int64_t nact = softmax_update(&c, s, &kb, nkp);
            pv_rows(c.sc.scores, c.sc.o, c.sc.active, nact, kb.Vr, work->ldv, c.D, nk); /* step 7': O += P . V */
        }
    }
    /* A sum that is not finite means a logit of finite inputs overflowed (NaN or inf inputs poison
     * their rows instead and never reach the sums). */
    for (int64_t r = 0; r < c.M; r++)
        if (!c.sc.poisoned[r] && !(c.sc.l[r] < INFINITY)) atomic_store(work->overflow, 1);
    if (work->nchunks > 1)
        write_partial(&c);
    else
        write_rows(&c);
}

#endif
