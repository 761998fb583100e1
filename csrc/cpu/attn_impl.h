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
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* S[r][j] = <Q[r], K[:, j]> for QK_MR rows and nkp keys (a multiple of QK_NR), K packed [d][BK]. */
static inline void qk_block(const float *Q, int64_t D, const float *Kp, float *S, int64_t nkp)
{
    for (int64_t j = 0; j < nkp; j += QK_NR) {
        vf a0[QK_MR], a1[QK_MR];
#pragma GCC unroll 8
        for (int r = 0; r < QK_MR; r++) a0[r] = a1[r] = v_zero();
        const float *kp = Kp + j;
        for (int64_t d = 0; d < D; d++) {
            const vf k0 = v_load(kp + d * BK), k1 = v_load(kp + d * BK + VW);
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

/* O0 += P0 . V and O1 += P1 . V over nk keys (V rows of D floats); O1 may be NULL. */
static inline void pv_rows(const float *P0, const float *P1, const float *V, int64_t D, int64_t nk,
                           float *O0, float *O1)
{
    int64_t d = 0;
    if (O1) {
        for (; d + 4 * VW <= D; d += 4 * VW) {
            vf a0 = v_load(O0 + d), a1 = v_load(O0 + d + VW), a2 = v_load(O0 + d + 2 * VW), a3 = v_load(O0 + d + 3 * VW);
            vf b0 = v_load(O1 + d), b1 = v_load(O1 + d + VW), b2 = v_load(O1 + d + 2 * VW), b3 = v_load(O1 + d + 3 * VW);
            for (int64_t j = 0; j < nk; j++) {
                const float *vr = V + j * D + d;
                const vf v0 = v_load(vr), v1 = v_load(vr + VW), v2 = v_load(vr + 2 * VW), v3 = v_load(vr + 3 * VW);
                const vf p = v_set1(P0[j]), q = v_set1(P1[j]);
                a0 = v_fma(p, v0, a0); a1 = v_fma(p, v1, a1); a2 = v_fma(p, v2, a2); a3 = v_fma(p, v3, a3);
                b0 = v_fma(q, v0, b0); b1 = v_fma(q, v1, b1); b2 = v_fma(q, v2, b2); b3 = v_fma(q, v3, b3);
            }
            v_store(O0 + d, a0); v_store(O0 + d + VW, a1); v_store(O0 + d + 2 * VW, a2); v_store(O0 + d + 3 * VW, a3);
            v_store(O1 + d, b0); v_store(O1 + d + VW, b1); v_store(O1 + d + 2 * VW, b2); v_store(O1 + d + 3 * VW, b3);
        }
        for (; d + VW <= D; d += VW) {
            vf a = v_load(O0 + d), b = v_load(O1 + d);
            for (int64_t j = 0; j < nk; j++) {
                const vf v = v_load(V + j * D + d);
                a = v_fma(v_set1(P0[j]), v, a);
                b = v_fma(v_set1(P1[j]), v, b);
            }
            v_store(O0 + d, a);
            v_store(O1 + d, b);
        }
        for (; d < D; d++) {
            float a = O0[d], b = O1[d];
            for (int64_t j = 0; j < nk; j++) {
                a += P0[j] * V[j * D + d];
                b += P1[j] * V[j * D + d];
            }
            O0[d] = a;
            O1[d] = b;
        }
        return;
    }
    for (; d + 4 * VW <= D; d += 4 * VW) {
        vf a0 = v_load(O0 + d), a1 = v_load(O0 + d + VW), a2 = v_load(O0 + d + 2 * VW), a3 = v_load(O0 + d + 3 * VW);
        for (int64_t j = 0; j < nk; j++) {
            const float *vr = V + j * D + d;
            const vf p = v_set1(P0[j]);
            a0 = v_fma(p, v_load(vr), a0); a1 = v_fma(p, v_load(vr + VW), a1);
            a2 = v_fma(p, v_load(vr + 2 * VW), a2); a3 = v_fma(p, v_load(vr + 3 * VW), a3);
        }
        v_store(O0 + d, a0); v_store(O0 + d + VW, a1); v_store(O0 + d + 2 * VW, a2); v_store(O0 + d + 3 * VW, a3);
    }
    for (; d + VW <= D; d += VW) {
        vf a = v_load(O0 + d);
        for (int64_t j = 0; j < nk; j++) a = v_fma(v_set1(P0[j]), v_load(V + j * D + d), a);
        v_store(O0 + d, a);
    }
    for (; d < D; d++) {
        float a = O0[d];
        for (int64_t j = 0; j < nk; j++) a += P0[j] * V[j * D + d];
        O0[d] = a;
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

typedef struct slot_rows {
    int present, mapped;
    int64_t shift, lo_min, hi_max;
    int64_t lo[LAMPE_ATTN_MAX_BQ], hi[LAMPE_ATTN_MAX_BQ], qpos[LAMPE_ATTN_MAX_BQ];
} slot_rows;

static void attn_item(const lampe_attn_plan *ap, int64_t item, float *scratch)
{
    const lampe_attn_params *p = ap->p;
    const lampe_attn_tile *tile = &ap->tiles[item / ap->nchunks];
    const int64_t chunk = item % ap->nchunks;
    const int64_t D = p->head_dim, G = ap->group, n2 = p->rotary_dim / 2;
    const int64_t b = tile->b, kvh = tile->kvh, t0 = tile->t0, npos = tile->t1 - tile->t0;
    const int64_t M = npos * G, Mp = (M + QK_MR - 1) / QK_MR * QK_MR;
    const lampe_attn_seq *seq = &p->seqs[b];
    const int64_t off = seq->key_offset;
    const lampe_plan *plan = seq->plan;
    const size_t es = dtype_size(p->dtype);
    /* Amplitude s on queries and keys = s^2 on the query alone (rotated dims only). */
    const float qamp = plan ? p->amplitude * p->amplitude : 1.0f;
    const float qscale = p->scale * LOG2E;

    float *Qs = scratch;            /* [3][Mp][D] rotated, scaled queries per slot */
    float *Kp = Qs + 3 * Mp * D;    /* [D][BK] rotated keys of one block           */
    float *Vb = Kp + D * BK;        /* [BK][D]                                     */
    float *S = Vb + BK * D;         /* [Mp][BK] scores, then probabilities         */
    float *O = S + Mp * BK;         /* [Mp][D]                                     */
    float *mrow = O + Mp * D, *lrow = mrow + Mp;
    float *cs = lrow + Mp, *sn = cs + D, *row = sn + D;
    int32_t *active = (int32_t *)(row + D); /* [Mp] rows updated by the current block */

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
    for (int64_t pi = 0; pi < npos; pi++) {
        const int64_t pos = p->kv_len - p->q_len + t0 + pi - off;
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
            const int s = regs[r].kind == LAMPE_REGION_FULL ? 0 : regs[r].kind;
            slot_rows *sr = &slots[s];
            sr->present = 1;
            sr->mapped = regs[r].mapped;
            sr->shift = regs[r].shift; /* uniform in a tile: the driver gives later rows tiles of one */
            sr->lo[pi] = regs[r].key_lo + off;
            sr->hi[pi] = regs[r].key_hi + off;
            sr->qpos[pi] = regs[r].qpos;
            if (sr->lo[pi] < sr->lo_min) sr->lo_min = sr->lo[pi];
            if (sr->hi[pi] > sr->hi_max) sr->hi_max = sr->hi[pi];
        }
    }

    memset(O, 0, (size_t)(Mp * D) * 4);
    for (int64_t r = 0; r < Mp; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
    }

    /* Rotate every query once per slot; trigonometry once per (position, slot) for all G heads. */
    const char *qbase = (const char *)p->q;
    for (int s = 0; s < 3; s++) {
        if (!slots[s].present) continue;
        float *Q = Qs + s * Mp * D;
        memset(Q, 0, (size_t)(Mp * D) * 4);
        for (int64_t pi = 0; pi < npos; pi++) {
            if (slots[s].lo[pi] > slots[s].hi[pi]) continue;
            attn_angles(p, slots[s].qpos[pi], qamp, cs, sn);
            for (int64_t g = 0; g < G; g++) {
                float *qr = Q + (pi * G + g) * D;
                const char *src = qbase + (size_t)(b * p->q_stride[0] + (kvh * G + g) * p->q_stride[1] +
                                                   (t0 + pi) * p->q_stride[2]) * es;
                cvt_row_to_f32(p->dtype, src, qr, D);
                rope_row_f32(qr, cs, sn, n2, p->layout);
                for (int64_t d = 0; d < D; d++) qr[d] *= qscale;
            }
        }
    }

    /* The tile's (slot, key block) list; a chunk takes a contiguous share of it. */
    int64_t nblk[3], total = 0;
    for (int s = 0; s < 3; s++) {
        nblk[s] = slots[s].present ? (slots[s].hi_max - slots[s].lo_min + BK) / BK : 0;
        total += nblk[s];
    }
    const int64_t cb0 = total * chunk / ap->nchunks, cb1 = total * (chunk + 1) / ap->nchunks;
    const char *kbase = (const char *)p->k, *vbase = (const char *)p->v;
    const int64_t *mids = plan ? plan->mapped_ids : NULL;
    int64_t idx = 0;
    for (int s = 0; s < 3; s++) {
        const slot_rows *sr = &slots[s];
        const float *Q = Qs + s * Mp * D;
        for (int64_t blk = 0; blk < nblk[s]; blk++, idx++) {
            if (idx < cb0 || idx >= cb1) continue;
            const int64_t k0 = sr->lo_min + blk * BK;
            const int64_t k1 = k0 + BK <= sr->hi_max + 1 ? k0 + BK : sr->hi_max + 1;
            const int64_t nk = k1 - k0, nkp = (nk + QK_NR - 1) / QK_NR * QK_NR;

            /* Pack: rotate each key by this slot's key position, store transposed. */
            for (int64_t jj = 0; jj < nk; jj++) {
                const int64_t j = k0 + jj;
                const char *src = kbase + (size_t)(b * p->k_stride[0] + kvh * p->k_stride[1] + j * p->k_stride[2]) * es;
                cvt_row_to_f32(p->dtype, src, row, D);
                const int64_t kpos = sr->mapped ? mids[j - off - sr->shift] : j - off;
                attn_angles(p, kpos, 1.0f, cs, sn);
                rope_row_f32(row, cs, sn, n2, p->layout);
                for (int64_t d = 0; d < D; d++) Kp[d * BK + jj] = row[d];
                const char *vsrc = vbase + (size_t)(b * p->v_stride[0] + kvh * p->v_stride[1] + j * p->v_stride[2]) * es;
                cvt_row_to_f32(p->dtype, vsrc, Vb + jj * D, D);
            }
            for (int64_t d = 0; d < D; d++)
                for (int64_t jj = nk; jj < nkp; jj++) Kp[d * BK + jj] = 0.0f;

            /* Scores for every row block that meets this key block. */
            for (int64_t r0 = 0; r0 < M; r0 += QK_MR) {
                int meets = 0;
                for (int64_t r = r0; r < r0 + QK_MR && r < M && !meets; r++) {
                    const int64_t pi = r / G;
                    meets = sr->lo[pi] < k1 && sr->hi[pi] >= k0;
                }
                if (meets) qk_block(Q + r0 * D, D, Kp, S + r0 * BK, nkp);
            }

            /* Online softmax: mask outside the row's range, rescale, exponentiate. */
            int64_t nact = 0;
            for (int64_t r = 0; r < M; r++) {
                const int64_t pi = r / G;
                const int64_t lo = sr->lo[pi] > k0 ? sr->lo[pi] - k0 : 0;
                const int64_t hi = sr->hi[pi] < k1 - 1 ? sr->hi[pi] - k0 : nk - 1;
                if (lo > hi) continue;
                float *Sr = S + r * BK;
                for (int64_t jj = 0; jj < lo; jj++) Sr[jj] = -INFINITY;
                for (int64_t jj = hi + 1; jj < nkp; jj++) Sr[jj] = -INFINITY;
                vf vm = v_set1(-INFINITY);
                for (int64_t jj = 0; jj < nkp; jj += VW) vm = v_max(vm, v_load(Sr + jj));
                const float mx = v_hmax(vm);
                const float mnew = mx > mrow[r] ? mx : mrow[r];
                if (mnew == -INFINITY) continue; /* nothing finite yet (all -inf logits) */
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
            for (int64_t a = 0; a < nact; a += 2) {
                const int64_t r = active[a];
                const int64_t r2 = a + 1 < nact ? active[a + 1] : -1;
                pv_rows(S + r * BK, r2 >= 0 ? S + r2 * BK : NULL, Vb, D, nk, O + r * D, r2 >= 0 ? O + r2 * D : NULL);
            }
        }
    }

    /* Finish: either the final rows, or this chunk's partial (O, max, sum) for the merge. */
    if (ap->nchunks > 1) {
        float *po = ap->part_o + item * ap->max_rows * D;
        float *pml = ap->part_ml + item * ap->max_rows * 2;
        memcpy(po, O, (size_t)(M * D) * 4);
        for (int64_t r = 0; r < M; r++) {
            pml[2 * r] = mrow[r];
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
        for (int64_t d = 0; d < D; d++) Or[d] *= inv;
        cvt_row_from_f32(p->dtype, Or, obase + (size_t)(b * p->out_stride[0] + h * p->out_stride[1] + t * p->out_stride[2]) * es, D);
        if (p->lse)
            p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] + t * p->lse_stride[2]] =
                l > 0.0f ? (mrow[r] + log2f(l)) * LN2 : -INFINITY;
    }
}

#endif
