/*
 * attn_fp32.c - workbench of the fused attention's inner loop in float32 (AVX2 / AVX-512).
 *
 *   csrc/dev/run.sh attn_fp32 avx512 VERSION [L] [G] [REPS] [SKIP]    (see csrc/dev/README.md)
 *
 * One KV head and the G query heads sharing it; L query positions over L keys, causal; D = 128.
 * Keys are packed once into the package's panel layout ([block][D][LDK]) and values stored as
 * padded rows, as attn_pack does; queries arrive scaled. What is timed is what attn_item does per
 * query tile with panels: copy the tile's queries, then per key block Q.K^T, mask + online
 * softmax, P.V; finally normalise. RoPE (O(L.D) per call, in attn_pack) is not in here.
 *
 * Every version is checked against a float64 reference on sampled rows before it is timed.
 * SKIP leaves stages out, to see where the time goes (the result is then wrong and not checked):
 * 1 = no Q.K^T, 2 = no softmax (P = S as is), 4 = no P.V; 8 = read key block 0 every time (cache-hot
 * K and V: the difference to the same run without 8 is the cost of fetching blocks).
 *
 * Versions (each later one keeps what the earlier ones changed):
 *  1  the package's kernel at 482e68b: tiles of 64 rows (64/G positions x G heads), BK = 64 keys,
 *     K panels [D][BK + 16], V rows padded to D + 16; Q.K^T 8 rows x 32 keys (AVX-512) / 6 x 16
 *     (AVX2) with the row-group loop outermost (each group re-reads the whole 32 KB panel);
 *     softmax row by row; P.V 4 rows x 2 vectors with the head-dim chunk loop outermost.
 *  2  contiguous sub-panels (K as [BK / QK_NR][D][QK_NR], V as [D / PV_DC][BK][PV_DC]: sequential
 *     streams, no padding), the chunk loop outermost in both products (a 16-32 KB chunk stays in
 *     L1 while every row group uses it), and the micro-kernel shapes that measured best L1-hot:
 *     AVX-512 Q.K^T 4 x 64 keys, P.V 6 rows x 64 dims; AVX2 Q.K^T 6 x 16, P.V 3 x 32. Rows are
 *     padded to the kernels' heights (zero queries; their outputs are discarded).
 *  3  lazy softmax: the running max moves only when a score exceeds it by more than 8 (log2
 *     units), so O is rarely rescaled; row sums stay vectors until the end.
 *  4  tiles of 128 rows: each K/V block is fetched from L2/L3 half as often.
 *  5  the next key block is prefetched into L2, spread over the Q.K^T row groups.
 *  6  tiles of 256 rows.
 *  7  version 5 through the package's csrc/cpu/attn_tiles.h (rows masked per position, row
 *     groups skipped per block, lazy softmax, 128-row tiles; no prefetch).
 */
#include "dev.h"

#if defined(__AVX512F__)
#define LAMPE_LEVEL 2
#elif defined(__AVX2__)
#define LAMPE_LEVEL 1
#else
#define LAMPE_LEVEL 0
#endif
#include "../cpu/simd.h"
#include "../cpu/attn_tiles.h"

#define D 128
#define BK 64
#define LDK 80
#define LOG2E 1.4426950408889634f

#if LAMPE_LEVEL == 2
#define QK_MR 8
#elif LAMPE_LEVEL == 1
#define QK_MR 6
#else
#define QK_MR 4
#endif
#define QK_NR (2 * VW)

typedef struct {
    int64_t L, G, ldv, nblk;
    const float *Q;  /* [L][G][D] scaled by scale * log2(e) */
    const float *Kp; /* [nblk][D][LDK] */
    const float *V;  /* [L][ldv] */
    const float *Ks; /* versions 2+: [nblk][BK / QK2_NR][D][QK2_NR] */
    const float *Vs; /* versions 2+: [nblk][D / PV_DC][BK][PV_DC] */
    float *out;      /* [L][G][D] */
    int skip;
} ctx;

/* ------------------------------------------------------------------ shared pieces */

/* S[r][j] = <Q[r], K[:, j]> for QK_MR rows and nkp keys (a multiple of QK_NR); as in attn_impl.h. */
static inline void qk_block(const float *Q, const float *Kp, float *S, int64_t nkp)
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

/* ------------------------------------------------------------------ version 1 */

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

static inline void pv1(const float *P, float *O, const float *V, int64_t ldv, int64_t nk)
{
    for (int64_t d = 0; d < D; d += VW) {
        vf a = v_load(O + d);
        for (int64_t j = 0; j < nk; j++) a = v_fma(v_set1(P[j]), v_load(V + j * ldv + d), a);
        v_store(O + d, a);
    }
}

static void pv_rows_v1(const float *S, float *O, const int32_t *active, int64_t nact, const float *V, int64_t ldv,
                       int64_t nk)
{
    const int64_t n4 = nact / 4 * 4;
    for (int64_t d0 = 0; d0 < D; d0 += 2 * VW)
        for (int64_t a = 0; a < n4; a += 4) {
            float *Pr[4], *Or[4];
            for (int i = 0; i < 4; i++) Pr[i] = (float *)S + active[a + i] * BK, Or[i] = O + active[a + i] * D;
            pv4_chunk(Pr, Or, V, ldv, d0, nk);
        }
    for (int64_t a = n4; a < nact; a++) pv1(S + active[a] * BK, O + active[a] * D, V, ldv, nk);
}

/* Row-by-row online softmax of attn_impl.h; returns the active rows. */
static int64_t softmax_v1(float *S, float *O, float *mrow, float *lrow, int32_t *active, int64_t M, int64_t G,
                          int64_t t0, int64_t k0, int64_t nk, int64_t nkp)
{
    int64_t nact = 0;
    for (int64_t r = 0; r < M; r++) {
        const int64_t pi = r / G;
        const int64_t hi_abs = t0 + pi; /* causal: keys 0..position */
        const int64_t lo = 0, hi = hi_abs < k0 + nk - 1 ? hi_abs - k0 : nk - 1;
        if (lo > hi) continue;
        float *Sr = S + r * BK;
        for (int64_t jj = hi + 1; jj < nkp; jj++) Sr[jj] = -INFINITY;
        vf vm = v_set1(-INFINITY);
        for (int64_t jj = 0; jj < nkp; jj += VW) vm = v_max(vm, v_load(Sr + jj));
        const float mx = v_hmax(vm);
        const float mnew = mx > mrow[r] ? mx : mrow[r];
        if (mnew == -INFINITY) continue;
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
            for (int64_t d = 0; d < D; d += VW) v_store(Or + d, v_mul(v_load(Or + d), va));
        }
        mrow[r] = mnew;
        active[nact++] = (int32_t)r;
    }
    return nact;
}

/* ------------------------------------------------------------------ drivers */

typedef void (*pv_fn)(const float *, float *, const int32_t *, int64_t, const float *, int64_t, int64_t);

/* One query tile of positions t0..t1-1 (all G heads): the attn_item loop with panels. */
static void tile_v1(const ctx *c, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t G = c->G, npos = t1 - t0, M = npos * G, Mp = (M + QK_MR - 1) / QK_MR * QK_MR;
    float *Q = scratch, *S = Q + Mp * D, *O = S + Mp * BK, *mrow = O + Mp * D, *lrow = mrow + Mp;
    int32_t *active = (int32_t *)(lrow + Mp);
    memcpy(Q, c->Q + t0 * G * D, (size_t)(M * D) * 4);
    memset(Q + M * D, 0, (size_t)((Mp - M) * D) * 4);
    memset(O, 0, (size_t)(Mp * D) * 4);
    for (int64_t r = 0; r < Mp; r++) mrow[r] = -INFINITY, lrow[r] = 0.0f;
    const int64_t last = (t1 - 1) / BK;
    for (int64_t blk = 0; blk <= last; blk++) {
        const int64_t k0 = blk * BK, nk = k0 + BK < c->L ? BK : c->L - k0, nkp = (nk + QK_NR - 1) / QK_NR * QK_NR;
        const int64_t hb = c->skip & 8 ? 0 : blk; /* 8: always block 0 (L1/L2-hot K and V) */
        const float *Kb = c->Kp + hb * D * LDK, *Vb = c->V + hb * BK * c->ldv;
        if (!(c->skip & 1))
            for (int64_t r0 = 0; r0 < M; r0 += QK_MR) qk_block(Q + r0 * D, Kb, S + r0 * BK, nkp);
        int64_t nact;
        if (!(c->skip & 2)) {
            nact = softmax_v1(S, O, mrow, lrow, active, M, G, t0, k0, nk, nkp);
        } else {
            for (int64_t r = 0; r < M; r++) active[r] = (int32_t)r, lrow[r] = 1.0f;
            nact = M;
        }
        if (!(c->skip & 4)) pv_rows_v1(S, O, active, nact, Vb, c->ldv, nk);
    }
    for (int64_t r = 0; r < M; r++) {
        const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
        float *dst = c->out + (t0 * G + r) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = O[r * D + d] * inv;
    }
}

/* ------------------------------------------------------------------ versions 2+ */

/* Micro-kernel shapes (measured on Ice Lake-SP, L1-hot, see README): Q.K^T QK2_MR rows x QK2_NV
 * vectors of keys, P.V PV_MR rows x PV_NV vectors of the head dim. */
#if LAMPE_LEVEL == 2
#define QK2_MR 4
#define QK2_NV 4 /* 4 x 64 keys: 16 accumulators, 94% of FMA peak hot (8 x 32: 74%) */
#define PV_MR 6
#define PV_NV 4  /* 6 x 64 dims: 24 accumulators, 93% (4 x 2 vectors: 61%) */
#elif LAMPE_LEVEL == 1
#define QK2_MR 6
#define QK2_NV 2 /* 6 x 16 keys: 12 accumulators, 90% */
#define PV_MR 3
#define PV_NV 4  /* 3 x 32 dims: 12 accumulators, 88% (4 x 2: 77%) */
#else
#define QK2_MR 4
#define QK2_NV 16
#define PV_MR 1
#define PV_NV 16
#endif
#define QK2_NR (QK2_NV * VW)
#define PV_DC (PV_NV * VW)

typedef struct {
    int tile_rows; /* rows (positions x G) per query tile                                   */
    int lazy;      /* softmax keeps a stale max until a score exceeds it by > 8; row sums
                      stay vectors until the end                                              */
    int prefetch;  /* prefetch the next key block into L2, spread over the Q.K^T row groups */
} features;

static const features FEAT[] = {
    {0}, {64, 0, 0},
    /* 2 */ {64, 0, 0},
    /* 3 */ {64, 1, 0},
    /* 4 */ {128, 1, 0},
    /* 5 */ {128, 1, 1},
    /* 6 */ {256, 1, 1},
    /* 7 */ {128, 1, 0},
};

/* S[r][0..QK2_NR) for `mr` <= QK2_MR rows from one [D][QK2_NR] chunk. */
#define DEF_QK(NAME, MR)                                                                                     \
    static inline void NAME(const float *Q, const float *Kc, float *S)                                      \
    {                                                                                                       \
        vf a[MR][QK2_NV];                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                \
            _Pragma("GCC unroll 8") for (int c = 0; c < QK2_NV; c++) a[r][c] = v_zero();                    \
        for (int64_t d = 0; d < D; d++) {                                                                   \
            vf k[QK2_NV];                                                                                   \
            _Pragma("GCC unroll 8") for (int c = 0; c < QK2_NV; c++) k[c] = v_load(Kc + d * QK2_NR + c * VW); \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                            \
            {                                                                                               \
                const vf q = v_set1(Q[r * D + d]);                                                          \
                _Pragma("GCC unroll 8") for (int c = 0; c < QK2_NV; c++) a[r][c] = v_fma(q, k[c], a[r][c]); \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                \
            _Pragma("GCC unroll 8") for (int c = 0; c < QK2_NV; c++) v_store(S + r * BK + c * VW, a[r][c]); \
    }
DEF_QK(qk_full, QK2_MR)

/* O[r][0..PV_DC) += P[r] . Vc for MR rows from one [BK][PV_DC] chunk. */
#define DEF_PV(NAME, MR)                                                                                     \
    static inline void NAME(const float *P, float *O, const float *Vc, int64_t nk)                          \
    {                                                                                                       \
        vf a[MR][PV_NV];                                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                \
            _Pragma("GCC unroll 8") for (int c = 0; c < PV_NV; c++) a[r][c] = v_load(O + r * D + c * VW);   \
        for (int64_t j = 0; j < nk; j++) {                                                                  \
            vf vv[PV_NV];                                                                                   \
            _Pragma("GCC unroll 8") for (int c = 0; c < PV_NV; c++) vv[c] = v_load(Vc + j * PV_DC + c * VW); \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                            \
            {                                                                                               \
                const vf p = v_set1(P[r * BK + j]);                                                         \
                _Pragma("GCC unroll 8") for (int c = 0; c < PV_NV; c++) a[r][c] = v_fma(p, vv[c], a[r][c]); \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                \
            _Pragma("GCC unroll 8") for (int c = 0; c < PV_NV; c++) v_store(O + r * D + c * VW, a[r][c]);   \
    }
DEF_PV(pv_full, PV_MR)

/* Online softmax of rows [r_lo, M) over this block's keys (scores in S, row stride BK; the block
 * is padded to BK keys with zero keys, masked here). lazy: the running max moves only when a
 * score exceeds it by more than 8 (log2 units), so O is rarely rescaled (P <= 2^8 meanwhile), and
 * the row sums are kept as vectors (lvec, VW per row) reduced once at the end. */
static void softmax_v2(float *S, float *O, float *mrow, float *lrow, float *lvec, int64_t r_lo, int64_t M, int64_t G,
                       int64_t t0, int64_t k0, int64_t nk, int lazy)
{
    for (int64_t r = r_lo; r < M; r++) {
        const int64_t pos = t0 + r / G;
        float *Sr = S + r * BK;
        const int64_t hi = pos - k0 + 1 < nk ? pos - k0 + 1 : nk; /* keys [0, hi) visible */
        if (hi <= 0) { /* the row sees nothing of this block */
            for (int64_t jj = 0; jj < BK; jj += VW) v_store(Sr + jj, v_zero());
            continue;
        }
        for (int64_t jj = hi; jj < BK; jj++) Sr[jj] = -INFINITY;
        vf vm = v_load(Sr);
        for (int64_t jj = VW; jj < BK; jj += VW) vm = v_max(vm, v_load(Sr + jj));
        const float mx = v_hmax(vm), mold = mrow[r];
        const float mnew = mx > mold + (lazy ? 8.0f : 0.0f) || mold == -INFINITY ? (mx > mold ? mx : mold) : mold;
        if (mnew == -INFINITY) { /* all -inf so far: P = 0 */
            for (int64_t jj = 0; jj < BK; jj += VW) v_store(Sr + jj, v_zero());
            continue;
        }
        const vf vmn = v_set1(mnew);
        vf vs = v_zero();
        for (int64_t jj = 0; jj < BK; jj += VW) {
            const vf e = v_exp2(v_sub(v_load(Sr + jj), vmn));
            v_store(Sr + jj, e);
            vs = v_add(vs, e);
        }
        if (mnew != mold) {
            const float alpha = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
            const vf va = v_set1(alpha);
            float *Or = O + r * D;
            for (int64_t d = 0; d < D; d += VW) v_store(Or + d, v_mul(v_load(Or + d), va));
            if (lazy)
                v_store(lvec + r * VW, v_mul(v_load(lvec + r * VW), va));
            else
                lrow[r] *= alpha;
            mrow[r] = mnew;
        }
        if (lazy)
            v_store(lvec + r * VW, v_add(v_load(lvec + r * VW), vs));
        else
            lrow[r] += v_hsum(vs);
    }
}

static void tile_v2(const ctx *c, const features *f, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t G = c->G, npos = t1 - t0, M = npos * G;
    /* rows padded to both kernel heights: zero queries, scores 0, never normalised or stored */
    const int64_t MR2 = QK2_MR > PV_MR ? QK2_MR : PV_MR;
    const int64_t Mq = (M + MR2 - 1) / MR2 * MR2 + MR2;
    float *Q = scratch, *S = Q + Mq * D, *O = S + Mq * BK, *mrow = O + Mq * D, *lrow = mrow + Mq, *lvec = lrow + Mq;
    memcpy(Q, c->Q + t0 * G * D, (size_t)(M * D) * 4);
    memset(Q + M * D, 0, (size_t)((Mq - M) * D) * 4);
    memset(O, 0, (size_t)(Mq * D) * 4);
    memset(lvec, 0, (size_t)(M * VW) * 4);
    for (int64_t r = 0; r < M; r++) mrow[r] = -INFINITY, lrow[r] = 0.0f;
    const int64_t last = (t1 - 1) / BK, blk_floats = BK * D;
    for (int64_t blk = 0; blk <= last; blk++) {
        const int64_t k0 = blk * BK, nk = k0 + BK < c->L ? BK : c->L - k0;
        const int64_t hb = c->skip & 8 ? 0 : blk;
        const float *Kb = c->Ks + hb * blk_floats, *Vb = c->Vs + hb * blk_floats;
        /* rows that see this block at all (positions >= k0), rounded down to each kernel's height;
         * the softmax gives rows below r_lo zero probabilities */
        const int64_t r_lo = k0 > t0 ? (k0 - t0) * G : 0;
        const int64_t rq = r_lo / QK2_MR * QK2_MR, rp = r_lo / PV_MR * PV_MR, rs = rq < rp ? rq : rp;
        const int64_t Mqk = (M + QK2_MR - 1) / QK2_MR * QK2_MR, Mpv = (M + PV_MR - 1) / PV_MR * PV_MR;
        const char *nxk = (const char *)(c->Ks + (hb + 1) * blk_floats), *nxv = (const char *)(c->Vs + (hb + 1) * blk_floats);
        const int pf = f->prefetch && blk < last;
        const int64_t ngroups = (Mqk - rq) / QK2_MR, nlines = blk_floats * 4 / 64;
        if (!(c->skip & 1))
            for (int64_t j = 0; j < BK; j += QK2_NR) {
                int64_t g = 0;
                for (int64_t r = rq; r < Mqk; r += QK2_MR, g++) {
                    qk_full(Q + r * D, Kb + j * D, S + r * BK + j);
                    if (pf && j == 0) { /* this group's share of the next block's lines */
                        for (int64_t ln = g * nlines / ngroups; ln < (g + 1) * nlines / ngroups; ln++) {
                            __builtin_prefetch(nxk + ln * 64, 0, 2);
                            __builtin_prefetch(nxv + ln * 64, 0, 2);
                        }
                    }
                }
            }
        if (!(c->skip & 2))
            softmax_v2(S, O, mrow, lrow, lvec, rs, M, G, t0, k0, nk, f->lazy);
        else
            for (int64_t r = 0; r < M; r++) lrow[r] = 1.0f;
        if (!(c->skip & 4))
            for (int64_t d0 = 0; d0 < D; d0 += PV_DC) {
                const float *Vc = Vb + d0 * BK;
                for (int64_t r = rp; r < Mpv; r += PV_MR) pv_full(S + r * BK, O + r * D + d0, Vc, nk);
            }
    }
    for (int64_t r = 0; r < M; r++) {
        const float l = f->lazy && !(c->skip & 2) ? v_hsum(v_load(lvec + r * VW)) : lrow[r];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float *dst = c->out + (t0 * G + r) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = O[r * D + d] * inv;
    }
}

/* Version 7: one tile through attn_tiles.h (float32 panels of the same layout as 2-6). */
static void tile_v7(const ctx *c, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t G = c->G, M = (t1 - t0) * G;
    float *Q = scratch, *tsc = Q + (M + TILE_ROW_ALIGN) * D;
    tile_state ts;
    tiles_init(&ts, M, G, D, 0, tsc);
    memcpy(Q, c->Q + t0 * G * D, (size_t)(M * D) * 4);
    memset(Q + M * D, 0, (size_t)((ts.Mp - M) * D) * 4);
    int64_t lo[256], hi[256];
    for (int64_t pi = 0; pi < t1 - t0; pi++) lo[pi] = 0, hi[pi] = t0 + pi;
    for (int64_t blk = 0; blk <= (t1 - 1) / BK; blk++) {
        const int64_t k0 = blk * BK, nk = k0 + BK < c->L ? BK : c->L - k0, hb = c->skip & 8 ? 0 : blk;
        tiles_block(&ts, Q, NULL, c->Ks + hb * BK * D, c->Vs + hb * BK * D, k0, nk, lo, hi);
    }
    for (int64_t r = 0; r < M; r++) {
        const float l = tiles_row_sum(&ts, r), inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) c->out[(t0 * G + r) * D + d] = ts.O[r * ts.ldo + d] * inv;
    }
}

#define NVERSIONS 7


static void run(const ctx *c, int version, float *scratch)
{
    const int64_t rows_per_tile = FEAT[version].tile_rows;
    int64_t bq = rows_per_tile / c->G;
    if (bq < 1) bq = 1;
    for (int64_t t0 = (c->L - 1) / bq * bq; t0 >= 0; t0 -= bq) {
        const int64_t t1 = t0 + bq < c->L ? t0 + bq : c->L;
        if (version == 1)
            tile_v1(c, t0, t1, scratch);
        else if (version == 7)
            tile_v7(c, t0, t1, scratch);
        else
            tile_v2(c, &FEAT[version], t0, t1, scratch);
    }
}

/* ------------------------------------------------------------------ main */

/* max |err| of sampled output rows against float64 (base-2 softmax of the pre-scaled logits). */
static double check(const ctx *c, const float *K, uint64_t *seed)
{
    const int64_t L = c->L, G = c->G;
    double worst = 0.0;
    for (int64_t s = 0; s < 48; s++) {
        const int64_t t = s == 0 ? 0 : s == 1 ? L - 1 : (int64_t)(dev_uniform(seed) * (double)L);
        for (int64_t g = 0; g < G; g++) {
            const float *q = c->Q + (t * G + g) * D;
            double m = -INFINITY, l = 0.0, acc[D] = {0};
            for (int64_t j = 0; j <= t; j++) {
                double x = 0.0;
                for (int64_t d = 0; d < D; d++) x += (double)q[d] * K[j * D + d];
                if (x > m) {
                    const double a = exp2(m - x);
                    l *= a;
                    for (int64_t d = 0; d < D; d++) acc[d] *= a;
                    m = x;
                }
                const double p = exp2(x - m);
                l += p;
                for (int64_t d = 0; d < D; d++) acc[d] += p * c->V[j * c->ldv + d];
            }
            for (int64_t d = 0; d < D; d++) {
                const double e = fabs(acc[d] / l - c->out[(t * G + g) * D + d]);
                if (e > worst) worst = e;
            }
        }
    }
    return worst;
}

#define MAXV 16

int main(int argc, char **argv)
{
    int64_t L, G;
    int reps, ver[MAXV], skp[MAXV];
    const int nv = dev_args(argc, argv, NVERSIONS, MAXV, &L, &G, &reps, ver, skp);
    if (nv < 0) return 2;
    const int64_t nblk = (L + BK - 1) / BK, ldv = D + 16;
    float *Q = dev_alloc((size_t)(L * G * D) * 4), *K = dev_alloc((size_t)(L * D) * 4);
    float *Kp = dev_alloc((size_t)(nblk * D * LDK) * 4), *V = dev_alloc((size_t)(L * ldv) * 4);
    float *out = dev_alloc((size_t)(L * G * D) * 4);
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    const float qs = (float)(1.0 / sqrt((double)D)) * LOG2E;
    for (int64_t i = 0; i < L * G * D; i++) Q[i] = (float)dev_normal(&seed) * qs;
    for (int64_t i = 0; i < L * D; i++) K[i] = (float)dev_normal(&seed);
    for (int64_t j = 0; j < L; j++)
        for (int64_t d = 0; d < D; d++) V[j * ldv + d] = (float)dev_normal(&seed);
    for (int64_t j = 0; j < L; j++)
        for (int64_t d = 0; d < D; d++) Kp[(j / BK) * D * LDK + d * LDK + j % BK] = K[j * D + d];
    /* sub-panel layouts of versions 2+ (zero beyond L: the last block is padded) */
    float *Ks = dev_alloc((size_t)(nblk * BK * D) * 4), *Vs = dev_alloc((size_t)(nblk * BK * D) * 4);
    for (int64_t j = 0; j < L; j++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t b = j / BK, jj = j % BK;
            Ks[b * BK * D + (jj / QK2_NR) * D * QK2_NR + d * QK2_NR + jj % QK2_NR] = K[j * D + d];
            Vs[b * BK * D + (d / PV_DC) * BK * PV_DC + jj * PV_DC + d % PV_DC] = V[j * ldv + d];
        }
    ctx c = {L, G, ldv, nblk, Q, Kp, V, Ks, Vs, out, 0};
    float *scratch = dev_alloc((size_t)((256 + 48) * (2 * D + BK + 2 + VW)) * 4 + (size_t)tiles_scratch_floats(256, D) * 4);
    dev_pin(0);

    for (int i = 0; i < nv; i++) { /* correctness first */
        memset(out, 0, (size_t)(L * G * D) * 4);
        run(&c, ver[i], scratch);
        const double err = check(&c, K, &seed);
        if (!(err < 1e-4)) {
            printf("version %d: WRONG, max |err| %.3g on sampled rows\n", ver[i], err);
            return 1;
        }
    }
    static double t[MAXV][64];
    const int R = reps < 64 ? reps : 64;
    for (int r = 0; r < R; r++)
        for (int i = 0; i < nv; i++) {
            c.skip = skp[i];
            const double t0 = dev_cpu_now();
            run(&c, ver[i], scratch);
            t[i][r] = dev_cpu_now() - t0;
        }
    const double flop = 4.0 * D * (double)L * (double)(L + 1) / 2.0 * (double)G;
    printf("level %d (VW=%d) L=%lld G=%lld D=%d, %d rounds round-robin, thread CPU time (best = least disturbed), checked against float64 first\n", LAMPE_LEVEL,
           VW, (long long)L, (long long)G, D, R);
    const double peak = dev_fma_peak();
    printf("  fp32 FMA ceiling of this core (same process, CPU time): %.1f GFLOP/s\n", peak);
    for (int i = 0; i < nv; i++) {
        const double med = dev_median(t[i], R);
        printf("  v%d skip=%d: best %8.1f ms (median %8.1f)  %6.1f GFLOP/s useful = %4.1f%% of FMA\n", ver[i], skp[i],
               t[i][0] * 1e3, med * 1e3, flop / t[i][0] / 1e9, 100.0 * flop / t[i][0] / 1e9 / peak);
    }
    return 0;
}
