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
 *                       by attn_pack), pack (rotate into the tile layout per block), direct (one
 *                       query position: scores keys as it reads them); values with load_block_values
 *   6-7 run_block       one key block through the tile (attn_tiles.h): S = Q . K^T with the
 *                       register-blocked (or VDPBF16PS / AMX) micro-kernels, soft-cap, mask, the
 *                       lazy online softmax, O += P . V
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

#define BK LAMPE_ATTN_BK
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

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

/* One key row converted to float32 and rotated by position kpos into `row`; returns 0 (and
 * leaves zeros) when the key is not finite. */
static inline int rotated_key(const lampe_attn_params *p, const char *src, int64_t kpos, float *row, float *cs,
                              float *sn)
{
    const int ok = load_row_finite(p->dtype, src, row, p->head_dim);
    attn_angles(p, kpos, 1.0f, cs, sn);
    rope_row_f32(row, cs, sn, p->rotary_dim / 2, p->layout);
    return ok;
}

/* bf16 inputs run the bf16 tiles (VDPBF16PS or AMX) on the bf16 levels; everything else float32. */
static inline int use_bf16_tiles(const lampe_attn_params *p)
{
#ifdef TILE_BF16
    return p->dtype == LAMPE_BF16;
#else
    (void)p;
    return 0;
#endif
}

/* Key / value jj of a block in the tile layout of the path (row NULL: zeros). */
static inline void pack_key_tile(void *kblk, int bf, int64_t jj, const float *row, int64_t D)
{
#ifdef TILE_BF16
    if (bf) {
        tiles_pack_key_bf16((uint16_t *)kblk, jj, row, D);
        return;
    }
#endif
    (void)bf;
    tiles_pack_key_f32((float *)kblk, jj, row, D);
}

static inline void pack_value_tile(void *vblk, int bf, int64_t jj, const float *row, int64_t D)
{
#ifdef TILE_BF16
    if (bf) {
        tiles_pack_value_bf16((uint16_t *)vblk, jj, row, D);
        return;
    }
#endif
    (void)bf;
    tiles_pack_value_f32((float *)vblk, jj, row, D);
}

/* Block `blk` of KV head kvh in the prefill panels (see lampe_attn_work). */
static inline float *panel_keys(const lampe_attn_work *w, int mapped, int64_t kvh, int64_t blk)
{
    return (mapped ? w->panel_map : w->panel_id) + (kvh * w->nblk + blk) * lampe_attn_kblock_floats(w->p->head_dim);
}
static inline float *panel_values(const lampe_attn_work *w, int64_t kvh, int64_t blk)
{
    return w->vconv + (kvh * w->nblk + blk) * BK * w->ldv;
}

/*
 * Prefill panels of batch row work->panel_b: item = (kind, kv head, block), kind 0 keys at their
 * true positions, 1 keys at mapped positions m[j] (prompt rows), 2 values; in the tile layout of
 * the path (attn_tiles.h). Keys no prompt row can see in that rotation, and slots past the last
 * key, are zeros.
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
    const int bf = use_bf16_tiles(p);
    lampe_attn_scratch sc;
    lampe_attn_scratch_carve(&sc, scratch, lampe_attn_scratch_rows(work->max_rows), D, work->ldv);
    float *cs = sc.cos, *sn = sc.sin, *row = sc.row;
    uint8_t *bad = work->key_bad + kvh * p->kv_len;
    if (kind == 2) {
        const char *vbase = (const char *)p->v;
        float *vb = panel_values(work, kvh, blk);
        int any = 0;
        for (int64_t jj = 0; jj < BK; jj++) {
            const int64_t j = k0 + jj;
            const int attended = j < k1 && j - off >= 0 && j - off < count;
            if (attended &&
                !load_row_finite(p->dtype, vbase + (size_t)(b * p->v_stride[0] + kvh * p->v_stride[1] + j * p->v_stride[2]) * es,
                                 row, D)) {
                bad[j] |= 2;
                any = 1;
            }
            pack_value_tile(vb, bf, jj, attended ? row : NULL, D);
        }
        work->block_bad[kvh * nb + blk] |= (uint8_t)any;
        return;
    }
    float *kb = panel_keys(work, (int)kind, kvh, blk);
    const char *kbase = (const char *)p->k;
    int any = 0;
    for (int64_t jj = 0; jj < BK; jj++) {
        const int64_t j = k0 + jj, jl = j - off;
        const int visible = j < k1 && jl >= 0 && jl < count && (kind == 0 || jl < plan->length);
        if (j < k1 && kind == 0) bad[j] = 0;
        if (visible) {
            const int ok = rotated_key(p, kbase + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es,
                                       kind ? plan->mapped_ids[jl] : jl, row, cs, sn);
            if (!ok && kind == 0) {
                bad[j] = 1;
                any = 1;
            }
        }
        pack_key_tile(kb, bf, jj, visible ? row : NULL, D);
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
    tile_state ts; /* the online softmax of the tile's rows (attn_tiles.h) */
    slot_rows slots[3];
    int64_t item, b, kvh, t0, npos, M, Mp, D, Dk, G, n2, off;
    size_t es;
    float qamp, qscale, cap2; /* query amplitude (s^2 for LaMPE rows), scale * log2(e), softcap * log2(e) */
    int capped, use_panels, direct;
    int bf; /* bf16 tiles: bf16 inputs on a bf16 level, prompt rows (decode rows read keys as stored) */
    int64_t cur_kpos; /* direct mode: the key position (and slot) q_direct is rotated back by */
    int cur_slot;
} attn_ctx;

/* One key block of one slot: keys k0..k1-1, rotated, in the tile layout of the path (Kb) or, in
 * direct mode, already scored; values in the tile layout (Vb); keys whose key or value row is not
 * finite (bad[0..nbad-1], stored as zeros). */
typedef struct attn_block {
    int64_t k0, k1, nbad;
    const void *Kb, *Vb;
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
    c->Mp = tiles_rows(c->M); /* rows padded to every micro-kernel height */
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
    c->bf = use_bf16_tiles(p) && !c->direct;
    c->Dk = (c->D + 31) / 32 * 32;
    c->cur_kpos = INT64_MIN;
    c->cur_slot = -1;
    lampe_attn_scratch_carve(&c->sc, scratch, lampe_attn_scratch_rows(work->max_rows), c->D, work->ldv);
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
    tiles_bind(&c->ts, c->M, c->G, c->D, c->bf, c->sc.scores, c->sc.o, c->sc.m, c->sc.l, c->sc.p_bf16, c->sc.act);
    for (int64_t r = 0; r < c->Mp; r++) c->sc.poisoned[r] = 0;
    c->ts.skip = c->sc.poisoned; /* poisoned rows are left alone */
    c->ts.cap2 = c->capped ? c->cap2 : 0.0f;
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
#ifdef TILE_BF16
        if (c->bf) { /* the bf16 tiles read them rounded once, head dim padded to 32 with zeros */
            uint16_t *Qb = c->sc.q_bf16[s];
            for (int64_t r = 0; r < c->Mp; r++) {
                cvt_row_f32_to_bf16(Q + r * D, Qb + r * c->Dk, D);
                for (int64_t d = D; d < c->Dk; d++) Qb[r * c->Dk + d] = 0;
            }
        }
#endif
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
    kb->Kb = panel_keys(w, c->slots[s].mapped, c->kvh, pb);
    kb->Vb = panel_values(w, c->kvh, pb);
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

/* Values of the block in the tile layout (zeros past its keys). A value row holding NaN or inf is
 * stored as zeros, flagged. */
static void load_block_values(attn_ctx *c, attn_block *kb)
{
    for (int64_t jj = 0; jj < BK; jj++) {
        const int64_t j = kb->k0 + jj;
        if (j < kb->k1 && !load_row_finite(c->p->dtype, v_row(c, j), c->sc.row, c->D)) c->sc.bad[kb->nbad++] = j;
        pack_value_tile(c->sc.v_block, c->bf, jj, j < kb->k1 ? c->sc.row : NULL, c->D);
    }
    kb->Vb = c->sc.v_block;
}

/* Step 5b, pack loader: rotate each key by this slot's key position into the tile layout, zeros
 * past the block's keys. */
static void load_block_pack(attn_ctx *c, int s, int64_t blk, attn_block *kb)
{
    const slot_rows *sr = &c->slots[s];
    block_range(c, s, blk, kb);
    for (int64_t jj = 0; jj < BK; jj++) {
        const int64_t j = kb->k0 + jj;
        if (j < kb->k1) {
            const int64_t kpos = sr->mapped ? c->plan->mapped_ids[j - c->off - sr->shift] : j - c->off;
            if (!rotated_key(c->p, k_row(c, j), kpos, c->sc.row, c->sc.cos, c->sc.sin)) c->sc.bad[kb->nbad++] = j;
        }
        pack_key_tile(c->sc.k_block, c->bf, jj, j < kb->k1 ? c->sc.row : NULL, c->D);
    }
    kb->Kb = c->sc.k_block;
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

/* Steps 6-7, one key block through the tile (attn_tiles.h): S = Q . K^T for the row groups that
 * meet it (direct mode scored it while loading), soft-cap, mask each row to its range, the lazy
 * online softmax, O += P . V; poisoned rows are left alone. */
static void run_block(attn_ctx *c, int s, const attn_block *kb)
{
    const slot_rows *sr = &c->slots[s];
    if (c->direct)
        tiles_block_scored(&c->ts, kb->Vb, kb->k0, kb->k1 - kb->k0, sr->lo, sr->hi);
    else
        tiles_block(&c->ts, c->sc.q_slot[s], c->sc.q_bf16[s], kb->Kb, kb->Vb, kb->k0, kb->k1 - kb->k0, sr->lo, sr->hi);
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
        float *Or = c->ts.O + r * c->ts.ldo;
        const int poisoned = c->sc.poisoned[r];
        const float l = tiles_row_sum(&c->ts, r);
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
    for (int64_t r = 0; r < c->M; r++) {
        memcpy(po + r * c->D, c->ts.O + r * c->ts.ldo, (size_t)c->D * 4);
        pml[2 * r] = c->sc.poisoned[r] ? NAN : c->ts.m[r];
        pml[2 * r + 1] = tiles_row_sum(&c->ts, r);
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
#ifdef TILE_AMX
    if (c.bf) tiles_amx_begin(); /* the tile configuration is per thread */
#endif
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
            run_block(&c, s, &kb);
        }
    }
#ifdef TILE_AMX
    if (c.bf) tiles_amx_end();
#endif
    /* All logits -inf in a row, or a sum that is not finite, means a logit of finite inputs
     * overflowed (NaN or inf inputs poison their rows instead and never reach the sums). */
    if (c.ts.overflow) atomic_store(work->overflow, 1);
    for (int64_t r = 0; r < c.M; r++)
        if (!c.sc.poisoned[r] && !(tiles_row_sum(&c.ts, r) < INFINITY)) atomic_store(work->overflow, 1);
    if (work->nchunks > 1)
        write_partial(&c);
    else
        write_rows(&c);
}

#endif
