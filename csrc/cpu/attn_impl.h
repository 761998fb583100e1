/*
 * Fused multi-grained attention, written once against simd.h and compiled per ISA.
 *
 * One work item = the G query heads sharing a KV head x a tile of query positions (or one key
 * chunk of such a tile, for split-KV decode). Each region kind (local, map, sink; "full" for
 * plain causal and fallback rows) is a "slot" with its own rotated copy of the queries and its
 * own rotation of the keys, packed per key block. All slots feed one running max/sum (online
 * softmax in log2 units), so a row's output is one exact softmax over the multiset of its
 * (region, key) visits. Never materialises more than a [rows x 64] score block.
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
    float *cs = scratch, *sn = cs + D, *row = sn + D;
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

typedef struct slot_rows {
    int present, mapped;
    int64_t shift, lo_min, hi_max;
    int64_t lo[LAMPE_ATTN_MAX_BQ], hi[LAMPE_ATTN_MAX_BQ], qpos[LAMPE_ATTN_MAX_BQ];
} slot_rows;

/* Rows (M of them, G per position) whose range in this slot holds one of the nbad flagged keys
 * attend a NaN or inf input: they are poisoned (NaN output). */
static void poison_rows(const slot_rows *sr, int64_t M, int64_t G, const int64_t *bad, int64_t nbad, int32_t *poisoned)
{
    for (int64_t r = 0; r < M; r++)
        for (int64_t e = 0; e < nbad && !poisoned[r]; e++)
            if (bad[e] >= sr->lo[r / G] && bad[e] <= sr->hi[r / G]) poisoned[r] = 1;
}

/* Direct mode scores keys as stored, unchecked: a key holding NaN or inf gives a non-finite score
 * in every row (queries are finite: rows with a bad query are zeros and poisoned), so only a
 * block with a non-finite score has its raw keys checked. Appends the bad keys to bad[nbad..];
 * non-finite scores of finite keys are logits that overflowed. */
static int64_t direct_bad_keys(const lampe_attn_params *p, int64_t b, int64_t kvh, int64_t k0, int64_t k1,
                               const float *S, int64_t G, int64_t *bad, int64_t nbad, atomic_int *overflow)
{
    int finite = 1;
    for (int64_t g = 0; g < G && finite; g++) finite = row_finite(S + g * BK, k1 - k0);
    if (finite) return nbad;
    const size_t es = dtype_size(p->dtype);
    const int64_t D = p->head_dim, n0 = nbad;
    for (int64_t j = k0; j < k1; j++) {
        const char *src = (const char *)p->k + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es;
        int ok = 1;
        for (int64_t d = 0; d < D && ok; d++) {
            const float x = p->dtype == LAMPE_F32 ? ((const float *)src)[d]
                            : p->dtype == LAMPE_BF16 ? lampe_bf16_to_f32(((const uint16_t *)src)[d])
                                                     : lampe_f16_to_f32(((const uint16_t *)src)[d]);
            ok = x - x == 0.0f;
        }
        if (!ok) bad[nbad++] = j;
    }
    if (nbad == n0) atomic_store(overflow, 1);
    return nbad;
}

static void attn_item(const lampe_attn_work *work, int64_t item, float *scratch)
{
    const lampe_attn_params *p = work->p;
    const lampe_attn_tile *tile = &work->tiles[item / work->nchunks];
    const int64_t chunk = item % work->nchunks;
    const int64_t D = p->head_dim, G = work->group, n2 = p->rotary_dim / 2;
    const int64_t b = tile->b, kvh = tile->kvh, t0 = tile->t0, npos = tile->t1 - tile->t0;
    const int64_t M = npos * G, Mp = (M + QK_MR - 1) / QK_MR * QK_MR;
    const lampe_attn_seq *seq = &p->seqs[b];
    const int64_t off = seq->key_offset;
    const lampe_plan *plan = seq->plan;
    const size_t es = dtype_size(p->dtype);
    /* Amplitude s on queries and keys = s^2 on the query alone (rotated dims only). */
    const float qamp = plan ? p->amplitude * p->amplitude : 1.0f;
    const float qscale = p->scale * LOG2E;
    /* soft-capping in log2 units: log2e * c * tanh(x / c) = c2 * tanh(S / c2) with c2 = c * log2e */
    const int capped = p->softcap > 0.0f;
    const float cap2 = p->softcap * LOG2E;

    lampe_attn_scratch sc;
    lampe_attn_scratch_carve(&sc, scratch, work->max_rows + LAMPE_ATTN_ROW_PAD, D, work->ldv);
    const int64_t ldv = work->ldv;    /* padded row strides: no power-of-two cache-set aliasing */
    float *Kp = sc.k_block, *Vb = sc.v_block, *S = sc.scores, *O = sc.o, *mrow = sc.m, *lrow = sc.l;
    float *cs = sc.cos, *sn = sc.sin, *row = sc.row;
    int32_t *active = sc.active, *poisoned = sc.poisoned;
    int64_t *bad = sc.bad;

    slot_rows slots[3];
    for (int s = 0; s < 3; s++) {
        slots[s].present = 0;
        slots[s].mapped = 0;
        slots[s].shift = 0;
        slots[s].lo_min = INT64_MAX;
        slots[s].hi_max = INT64_MIN;
        for (int64_t pi = 0; pi < npos; pi++) {
            slots[s].lo[pi] = 1;
            slots[s].hi[pi] = 0;
        }
    }
    const int64_t last_key = seq->key_count - 1; /* own position of the last valid key */
    for (int64_t pi = 0; pi < npos; pi++) {
        const int64_t pos = seq->query_start + t0 + pi;
        if (pos < 0) continue; /* a padded query: no valid key, output zeros */
        lampe_region regs[LAMPE_MAX_REGIONS];
        int n = 0;
        if (plan) {
            if (lampe_plan_regions(plan, pos, regs, &n) != LAMPE_OK) n = 0; /* driver pre-checks */
        } else {
            regs[0] = (lampe_region){LAMPE_REGION_FULL, 0, 0, pos, pos, 0};
            n = 1;
        }
        for (int r = 0; r < n; r++) {
            const int64_t hi = regs[r].key_hi < last_key ? regs[r].key_hi : last_key;
            if (regs[r].key_lo > hi) continue; /* only keys past the valid ones */
            const int s = regs[r].kind == LAMPE_REGION_FULL ? 0 : regs[r].kind;
            slot_rows *sr = &slots[s];
            sr->present = 1;
            sr->mapped = regs[r].mapped;
            sr->shift = regs[r].shift; /* uniform in a tile: the driver gives later rows tiles of one */
            sr->lo[pi] = regs[r].key_lo + off;
            sr->hi[pi] = hi + off;
            sr->qpos[pi] = regs[r].qpos;
            if (sr->lo[pi] < sr->lo_min) sr->lo_min = sr->lo[pi];
            if (sr->hi[pi] > sr->hi_max) sr->hi_max = sr->hi[pi];
        }
    }

    memset(O, 0, (size_t)(Mp * D) * 4);
    for (int64_t r = 0; r < Mp; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
        poisoned[r] = 0;
    }

    /* Rotate every query once per slot; trigonometry once per (position, slot) for all G heads. */
    const char *qbase = (const char *)p->q;
    for (int s = 0; s < 3; s++) {
        if (!slots[s].present) continue;
        float *Q = sc.q_slot[s];
        memset(Q, 0, (size_t)(Mp * D) * 4);
        for (int64_t pi = 0; pi < npos; pi++) {
            if (slots[s].lo[pi] > slots[s].hi[pi]) continue;
            attn_angles(p, slots[s].qpos[pi], qamp, cs, sn);
            for (int64_t g = 0; g < G; g++) {
                float *qr = Q + (pi * G + g) * D;
                const char *src = qbase + (size_t)(b * p->q_stride[0] + (kvh * G + g) * p->q_stride[1] +
                                                   (t0 + pi) * p->q_stride[2]) * es;
                if (!load_row_finite(p->dtype, src, qr, D)) { /* the row attends a NaN/inf query */
                    poisoned[pi * G + g] = 1;
                    continue;
                }
                rope_row_f32(qr, cs, sn, n2, p->layout);
                for (int64_t d = 0; d < D; d++) qr[d] *= qscale;
            }
        }
    }

    /* The tile's (slot, key block) list; a chunk takes a contiguous share of it. With panels,
     * blocks are the panels' fixed BK-aligned blocks; otherwise they start at the slot's range. */
    const int use_panels = tile->panel;
    int64_t first[3], nblk[3], total = 0;
    for (int s = 0; s < 3; s++) {
        first[s] = 0;
        nblk[s] = 0;
        if (!slots[s].present) continue;
        if (use_panels) {
            first[s] = slots[s].lo_min / BK;
            nblk[s] = slots[s].hi_max / BK - first[s] + 1;
        } else {
            nblk[s] = (slots[s].hi_max - slots[s].lo_min + BK) / BK;
        }
        total += nblk[s];
    }
    const int64_t cb0 = total * chunk / work->nchunks, cb1 = total * (chunk + 1) / work->nchunks;
    const char *kbase = (const char *)p->k, *vbase = (const char *)p->v;
    const int64_t *mids = plan ? plan->mapped_ids : NULL;
    const int f32 = p->dtype == LAMPE_F32;
    const int direct = npos == 1 && !use_panels;
    float *Qd = sc.q_direct; /* [G][D] back-rotated queries of direct mode */
    int64_t cur_kpos = INT64_MIN;
    int cur_slot = -1;
    int64_t idx = 0;
    for (int s = 0; s < 3; s++) {
        const slot_rows *sr = &slots[s];
        const float *Q = sc.q_slot[s];
        for (int64_t blk = 0; blk < nblk[s]; blk++, idx++) {
            if (idx < cb0 || idx >= cb1) continue;
            int64_t k0, k1, nbad = 0;
            const float *Kb, *Vr;
            if (use_panels) {
                const int64_t pb = first[s] + blk;
                k0 = pb * BK;
                k1 = k0 + BK < p->kv_len ? k0 + BK : p->kv_len;
                Kb = (sr->mapped ? work->panel_map : work->panel_id) + (kvh * work->nblk + pb) * D * LDK;
                Vr = work->vconv + (kvh * p->kv_len + k0) * ldv;
                if (work->block_bad[kvh * work->nblk + pb])
                    for (int64_t j = k0; j < k1; j++)
                        if (work->key_bad[kvh * p->kv_len + j]) bad[nbad++] = j;
            } else {
                k0 = sr->lo_min + blk * BK;
                k1 = k0 + BK <= sr->hi_max + 1 ? k0 + BK : sr->hi_max + 1;
                Kb = Kp;
                if (direct) {
                    /* One query position: rotate its G query rows back by each distinct key
                     * position and read the keys as stored (no per-key rotation or packing). */
                    for (int64_t jj = 0; jj < k1 - k0; jj++) {
                        const int64_t j = k0 + jj;
                        const char *src = kbase + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es;
                        /* P.V below walks this block's V rows column slab by column slab; start
                         * pulling each row from memory now, while the scores are computed. */
                        const char *vpre = vbase + (size_t)(b * p->v_stride[0] + kvh * p->v_stride[1] + j * p->v_stride[2]) * es;
                        for (size_t by = 0; by < (size_t)D * es; by += 64) __builtin_prefetch(vpre + by, 0, 1);
                        /* keys are read one row at a time: ask for rows well ahead of use */
                        if (j + 8 < k1) {
                            const char *kpre = src + (size_t)(8 * p->k_stride[2]) * es;
                            for (size_t by = 0; by < (size_t)D * es; by += 64) __builtin_prefetch(kpre + by, 0, 0);
                        }
                        if (!sr->mapped) {
                            /* true positions: every key has its own, so rotate the key once */
                            cvt_row_to_f32(p->dtype, src, row, D);
                            attn_angles(p, j - off, 1.0f, cs, sn);
                            rope_row_f32(row, cs, sn, n2, p->layout);
                            dot_rows(Q, G, row, D, S + jj);
                            continue;
                        }
                        /* mapped positions come in runs: rotate the G queries back once per run
                         * and read the keys as stored */
                        const int64_t kpos = mids[j - off - sr->shift];
                        if (kpos != cur_kpos || s != cur_slot) {
                            attn_angles(p, kpos, 1.0f, cs, sn);
                            for (int64_t g = 0; g < G; g++) rope_row_inv(Q + g * D, Qd + g * D, cs, sn, n2, D, p->layout);
                            cur_kpos = kpos;
                            cur_slot = s;
                        }
                        const float *kr = (const float *)src;
                        if (!f32) {
                            cvt_row_to_f32(p->dtype, src, row, D);
                            kr = row;
                        }
                        dot_rows(Qd, G, kr, D, S + jj);
                    }
                } else {
                    /* Pack: rotate each key by this slot's key position, store transposed. */
                    for (int64_t jj = 0; jj < k1 - k0; jj++) {
                        const int64_t j = k0 + jj;
                        const int64_t kpos = sr->mapped ? mids[j - off - sr->shift] : j - off;
                        if (!pack_key(p, kbase + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es,
                                      kpos, Kp + jj, row, cs, sn))
                            bad[nbad++] = j;
                    }
                    for (int64_t d = 0; d < D; d++)
                        for (int64_t jj = k1 - k0; jj < BK; jj++) Kp[d * LDK + jj] = 0.0f;
                }
                /* Values into a padded float32 block: sequential reads from memory, and P.V's
                 * column slabs then stay in L1 without set conflicts. */
                for (int64_t jj = 0; jj < k1 - k0; jj++) {
                    const int64_t j = k0 + jj;
                    const char *vsrc = vbase + (size_t)(b * p->v_stride[0] + kvh * p->v_stride[1] + j * p->v_stride[2]) * es;
                    if (!load_row_finite(p->dtype, vsrc, Vb + jj * ldv, D)) bad[nbad++] = j;
                }
                Vr = Vb;
                if (direct) nbad = direct_bad_keys(p, b, kvh, k0, k1, S, G, bad, nbad, work->overflow);
            }
            if (nbad) poison_rows(sr, M, G, bad, nbad, poisoned);
            const int64_t nk = k1 - k0, nkp = (nk + QK_NR - 1) / QK_NR * QK_NR;

            /* Scores for every row block that meets this key block (direct mode has them). */
            for (int64_t r0 = 0; r0 < M && !direct; r0 += QK_MR) {
                int meets = 0;
                for (int64_t r = r0; r < r0 + QK_MR && r < M && !meets; r++) {
                    const int64_t pi = r / G;
                    meets = sr->lo[pi] < k1 && sr->hi[pi] >= k0 && !poisoned[r];
                }
                if (meets) qk_block(Q + r0 * D, D, Kb, S + r0 * BK, nkp);
            }

            /* Online softmax: mask outside the row's range, rescale, exponentiate. */
            int64_t nact = 0;
            for (int64_t r = 0; r < M; r++) {
                const int64_t pi = r / G;
                const int64_t lo = sr->lo[pi] > k0 ? sr->lo[pi] - k0 : 0;
                const int64_t hi = sr->hi[pi] < k1 - 1 ? sr->hi[pi] - k0 : nk - 1;
                if (lo > hi || poisoned[r]) continue;
                float *Sr = S + r * BK;
                if (capped) softcap_row(Sr, nkp, cap2);
                for (int64_t jj = 0; jj < lo; jj++) Sr[jj] = -INFINITY;
                for (int64_t jj = hi + 1; jj < nkp; jj++) Sr[jj] = -INFINITY;
                vf vm = v_set1(-INFINITY);
                for (int64_t jj = 0; jj < nkp; jj += VW) vm = v_max(vm, v_load(Sr + jj));
                const float mx = v_hmax(vm);
                const float mnew = mx > mrow[r] ? mx : mrow[r];
                if (mnew == -INFINITY) { /* every logit -inf: finite inputs overflowed */
                    atomic_store(work->overflow, 1);
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
                    float *Or = O + r * D;
                    const vf va = v_set1(alpha);
                    int64_t d = 0;
                    for (; d + VW <= D; d += VW) v_store(Or + d, v_mul(v_load(Or + d), va));
                    for (; d < D; d++) Or[d] *= alpha;
                }
                mrow[r] = mnew;
                active[nact++] = (int32_t)r;
            }
            pv_rows(S, O, active, nact, Vr, ldv, D, nk);
        }
    }

    /* Finish: either the final rows, or this chunk's partial (O, max, sum) for the merge. A sum
     * that is not finite means a logit of finite inputs overflowed (NaN or inf inputs poison their
     * rows instead and never reach the sums). */
    for (int64_t r = 0; r < M; r++)
        if (!poisoned[r] && !(lrow[r] < INFINITY)) atomic_store(work->overflow, 1);
    if (work->nchunks > 1) {
        float *po = work->part_o + item * work->max_rows * D;
        float *pml = work->part_ml + item * work->max_rows * 2;
        memcpy(po, O, (size_t)(M * D) * 4);
        for (int64_t r = 0; r < M; r++) {
            pml[2 * r] = poisoned[r] ? NAN : mrow[r];
            pml[2 * r + 1] = lrow[r];
        }
        return;
    }
    char *obase = (char *)p->out;
    for (int64_t r = 0; r < M; r++) {
        const int64_t pi = r / G, g = r % G, h = kvh * G + g, t = t0 + pi;
        float *Or = O + r * D;
        const float l = lrow[r];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) Or[d] = poisoned[r] ? NAN : Or[d] * inv;
        cvt_row_from_f32(p->dtype, Or, obase + (size_t)(b * p->out_stride[0] + h * p->out_stride[1] + t * p->out_stride[2]) * es, D);
        if (p->lse)
            p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] + t * p->lse_stride[2]] =
                poisoned[r] ? NAN : l > 0.0f ? (mrow[r] + log2f(l)) * LN2 : -INFINITY;
    }
}

#endif
