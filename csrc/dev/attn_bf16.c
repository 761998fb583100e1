/*
 * attn_bf16.c - workbench of the fused attention's inner loop for bfloat16 inputs.
 *
 *   csrc/dev/run.sh attn_bf16 avx512bf16 L G REPS VERSION ...   (VDPBF16PS; AMX needs ISA amx)
 *   csrc/dev/run.sh attn_bf16 emu        L G REPS VERSION ...   (both emulated in plain AVX-512:
 *                                                                 correct, not fast - check only)
 *
 * Same problem as attn_fp32.c (one KV head, G query heads, L positions, causal, D = 128, tiles of
 * 128 rows, BK = 64, lazy softmax) with q, k, v given in bf16. Checked against float64 on the
 * bf16 input values before timing; the error printed is max |out - ref| / max |ref| over the
 * sampled rows (the package's bf16 tolerance is 2e-2).
 *
 * Versions:
 *  1  what the package does today: bf16 converted to float32 panels, float32 kernels (attn_fp32
 *     v4's loop). "Own float32" for the speed targets.
 *  2  Q.K^T with VDPBF16PS: queries rounded to bf16 after scaling (torch rounds them after
 *     rotation too), keys packed as bf16 pairs along the head dim ([D/2][BK][2]); P.V float32.
 *  3  P.V with VDPBF16PS too: P rounded to bf16 (as torch's CPU flash attention does), values
 *     packed as bf16 pairs along the keys ([D/DC][BK/2][DC][2]); row sums from the unrounded P.
 *  4  both products on AMX tiles (TDPBF16PS), same layouts as 3: Q.K^T per 16-row strip into
 *     4 accumulator tiles (64 keys), P.V per strip and 16-dim column with O loaded into the
 *     accumulator tile and stored back.
 *  5  the package's csrc/cpu/attn_tiles.h on its bf16 path: version 3 (LAMPE_LEVEL 3: ISA
 *     avx512bf16 or emu3) or version 4 (LAMPE_LEVEL 4: amx or emu), rows masked per position.
 */
#include "dev.h"

#ifndef LAMPE_LEVEL
#define LAMPE_LEVEL 4 /* run.sh: 3 for avx512bf16 and emu3 (version 5 = VDPBF16PS), 4 otherwise (AMX) */
#endif
#include "../cpu/simd.h"
#include "../cpu/bf16_ops.h"
#include "../cpu/amx_ops.h"
#include "../cpu/attn_tiles.h"

#define D 128
#define BK 64
#define LOG2E 1.4426950408889634f
#define QK_MR 4
#define QK_NV 4 /* 64 keys */
#define PV_MR 6
#define PV_NV 4
#define DC (PV_NV * VW) /* 64 dims per value chunk */
#define TILE_ROWS 128

typedef struct {
    int64_t L, G, nblk;
    const uint16_t *Q; /* [L][G][D] bf16, unscaled */
    float qscale;
    const float *Kf, *Vf;       /* fp32 sub-panels as attn_fp32 v2: [blk][D][64], [blk][D/DC][BK][DC] */
    const uint16_t *Kb, *Vb;    /* bf16 pairs: [blk][D/2][BK][2], [blk][D/DC][BK/2][DC][2]          */
    float *out;                 /* [L][G][D] */
    int skip;
} ctx;

/* ------------------------------------------------------------------ float32 kernels (version 1, 2) */

static inline void qk_f32(const float *Q, const float *Kc, float *S)
{
    vf a[QK_MR][QK_NV];
    for (int r = 0; r < QK_MR; r++)
        for (int c = 0; c < QK_NV; c++) a[r][c] = v_zero();
    for (int64_t d = 0; d < D; d++) {
        vf k[QK_NV];
        for (int c = 0; c < QK_NV; c++) k[c] = v_load(Kc + d * BK + c * VW);
        for (int r = 0; r < QK_MR; r++) {
            const vf q = v_set1(Q[r * D + d]);
            for (int c = 0; c < QK_NV; c++) a[r][c] = v_fma(q, k[c], a[r][c]);
        }
    }
    for (int r = 0; r < QK_MR; r++)
        for (int c = 0; c < QK_NV; c++) v_store(S + r * BK + c * VW, a[r][c]);
}

static inline void pv_f32(const float *P, float *O, const float *Vc)
{
    vf a[PV_MR][PV_NV];
    for (int r = 0; r < PV_MR; r++)
        for (int c = 0; c < PV_NV; c++) a[r][c] = v_load(O + r * D + c * VW);
    for (int64_t j = 0; j < BK; j++) {
        vf vv[PV_NV];
        for (int c = 0; c < PV_NV; c++) vv[c] = v_load(Vc + j * DC + c * VW);
        for (int r = 0; r < PV_MR; r++) {
            const vf p = v_set1(P[r * BK + j]);
            for (int c = 0; c < PV_NV; c++) a[r][c] = v_fma(p, vv[c], a[r][c]);
        }
    }
    for (int r = 0; r < PV_MR; r++)
        for (int c = 0; c < PV_NV; c++) v_store(O + r * D + c * VW, a[r][c]);
}

/* ------------------------------------------------------------------ VDPBF16PS kernels (versions 2, 3) */

/* S[r][0..64) for 4 rows: Q rows bf16 [r][D], keys [D/2][BK][2]. */
static inline void qk_dp(const uint16_t *Qb, const uint16_t *Kc, float *S)
{
    vf a[QK_MR][QK_NV];
    for (int r = 0; r < QK_MR; r++)
        for (int c = 0; c < QK_NV; c++) a[r][c] = v_zero();
    for (int64_t d2 = 0; d2 < D / 2; d2++) {
        vbf k[QK_NV];
        for (int c = 0; c < QK_NV; c++) k[c] = vbf_load(Kc + (d2 * BK + c * VW) * 2);
        for (int r = 0; r < QK_MR; r++) {
            const vbf q = vbf_bcast_pair(Qb + r * D + 2 * d2);
            for (int c = 0; c < QK_NV; c++) a[r][c] = v_dpbf16(a[r][c], q, k[c]);
        }
    }
    for (int r = 0; r < QK_MR; r++)
        for (int c = 0; c < QK_NV; c++) v_store(S + r * BK + c * VW, a[r][c]);
}

/* O[r][0..DC) += Pb[r] . V for 6 rows: P bf16 [r][BK], values [BK/2][DC][2]. */
static inline void pv_dp(const uint16_t *Pb, float *O, const uint16_t *Vc)
{
    vf a[PV_MR][PV_NV];
    for (int r = 0; r < PV_MR; r++)
        for (int c = 0; c < PV_NV; c++) a[r][c] = v_load(O + r * D + c * VW);
    for (int64_t j2 = 0; j2 < BK / 2; j2++) {
        vbf vv[PV_NV];
        for (int c = 0; c < PV_NV; c++) vv[c] = vbf_load(Vc + (j2 * DC + c * VW) * 2);
        for (int r = 0; r < PV_MR; r++) {
            const vbf p = vbf_bcast_pair(Pb + r * BK + 2 * j2);
            for (int c = 0; c < PV_NV; c++) a[r][c] = v_dpbf16(a[r][c], p, vv[c]);
        }
    }
    for (int r = 0; r < PV_MR; r++)
        for (int c = 0; c < PV_NV; c++) v_store(O + r * D + c * VW, a[r][c]);
}

/* ------------------------------------------------------------------ AMX kernels (version 4) */

/* tile numbers: literal macros (the instructions encode them; GCC's intrinsics stringify them) */
#define T_C0 0
#define T_C1 1
#define T_C2 2
#define T_C3 3
#define T_A0 4
#define T_A1 5
#define T_B0 6
#define T_B1 7

/* S[16 rows][64 keys] of one strip: 4 accumulator tiles, D / 32 steps of (A: 16 rows x 32 dims
 * of Q, B: 16 dim pairs x 16 keys). */
static inline void qk_amx(const uint16_t *Qb, const uint16_t *Kblk, float *S)
{
    AMX_ZERO(T_C0);
    AMX_ZERO(T_C1);
    AMX_ZERO(T_C2);
    AMX_ZERO(T_C3);
    for (int64_t k = 0; k < D / 32; k++) {
        AMX_LOAD(T_A0, Qb + k * 32, D * 2);
        const uint16_t *kb = Kblk + k * 16 * BK * 2; /* dim pairs 16k.. */
        AMX_LOAD(T_B0, kb + 0 * 32, BK * 4);
        AMX_DPBF16(T_C0, T_A0, T_B0);
        AMX_LOAD(T_B1, kb + 1 * 32, BK * 4);
        AMX_DPBF16(T_C1, T_A0, T_B1);
        AMX_LOAD(T_B0, kb + 2 * 32, BK * 4);
        AMX_DPBF16(T_C2, T_A0, T_B0);
        AMX_LOAD(T_B1, kb + 3 * 32, BK * 4);
        AMX_DPBF16(T_C3, T_A0, T_B1);
    }
    AMX_STORE(T_C0, S + 0 * 16, BK * 4);
    AMX_STORE(T_C1, S + 1 * 16, BK * 4);
    AMX_STORE(T_C2, S + 2 * 16, BK * 4);
    AMX_STORE(T_C3, S + 3 * 16, BK * 4);
}

/* O[16 rows][D] += Pb[16][64] . V: P in two A tiles (keys 0..31, 32..63), then per 16-dim column
 * two B tiles of 16 key pairs x 16 dims and O's 16 x 16 block as the accumulator. */
static inline void pv_amx(const uint16_t *Pb, float *O, const uint16_t *Vblk)
{
    AMX_LOAD(T_A0, Pb, BK * 2);
    AMX_LOAD(T_A1, Pb + 32, BK * 2);
    for (int64_t n = 0; n < D / 16; n += 2) {
        for (int h = 0; h < 2; h++) {
            const int64_t dim = (n + h) * 16, chunk = dim / DC, off = dim % DC;
            const uint16_t *vb = Vblk + (chunk * (BK / 2) * DC + off) * 2;
            if (h == 0) {
                AMX_LOAD(T_C0, O + dim, D * 4);
                AMX_LOAD(T_B0, vb, DC * 4);
                AMX_DPBF16(T_C0, T_A0, T_B0);
                AMX_LOAD(T_B1, vb + 16 * DC * 2, DC * 4); /* key pairs 16..31 */
                AMX_DPBF16(T_C0, T_A1, T_B1);
                AMX_STORE(T_C0, O + dim, D * 4);
            } else {
                AMX_LOAD(T_C1, O + dim, D * 4);
                AMX_LOAD(T_B0, vb, DC * 4);
                AMX_DPBF16(T_C1, T_A0, T_B0);
                AMX_LOAD(T_B1, vb + 16 * DC * 2, DC * 4);
                AMX_DPBF16(T_C1, T_A1, T_B1);
                AMX_STORE(T_C1, O + dim, D * 4);
            }
        }
    }
}

/* ------------------------------------------------------------------ softmax */

/* Lazy online softmax (attn_fp32 v3) over rows [r0, M); writes P as float32 into S and, when
 * Pb is given, rounded to bf16 into Pb (row stride BK). */
static void softmax(float *S, uint16_t *Pb, float *O, float *mrow, float *lvec, int64_t r0, int64_t M, int64_t G,
                    int64_t t0, int64_t k0, int64_t nk)
{
    for (int64_t r = r0; r < M; r++) {
        const int64_t pos = t0 + r / G;
        float *Sr = S + r * BK;
        const int64_t hi = pos - k0 + 1 < nk ? pos - k0 + 1 : nk;
        if (hi <= 0) {
            for (int64_t jj = 0; jj < BK; jj += VW) v_store(Sr + jj, v_zero());
            if (Pb) memset(Pb + r * BK, 0, BK * 2);
            continue;
        }
        for (int64_t jj = hi; jj < BK; jj++) Sr[jj] = -INFINITY;
        vf vm = v_load(Sr);
        for (int64_t jj = VW; jj < BK; jj += VW) vm = v_max(vm, v_load(Sr + jj));
        const float mx = v_hmax(vm), mold = mrow[r];
        const float mnew = mx > mold + 8.0f || mold == -INFINITY ? (mx > mold ? mx : mold) : mold;
        const vf vmn = v_set1(mnew);
        vf vs = v_zero();
        for (int64_t jj = 0; jj < BK; jj += 2 * VW) {
            const vf e0 = v_exp2(v_sub(v_load(Sr + jj), vmn)), e1 = v_exp2(v_sub(v_load(Sr + jj + VW), vmn));
            v_store(Sr + jj, e0);
            v_store(Sr + jj + VW, e1);
            if (Pb) vbf_store(Pb + r * BK + jj, v_cvt2_bf16(e0, e1));
            vs = v_add(vs, v_add(e0, e1));
        }
        if (mnew != mold) {
            const float alpha = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
            const vf va = v_set1(alpha);
            for (int64_t d = 0; d < D; d += VW) v_store(O + r * D + d, v_mul(v_load(O + r * D + d), va));
            v_store(lvec + r * VW, v_mul(v_load(lvec + r * VW), va));
            mrow[r] = mnew;
        }
        v_store(lvec + r * VW, v_add(v_load(lvec + r * VW), vs));
    }
}

/* ------------------------------------------------------------------ driver */

static void tile(const ctx *c, int version, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t G = c->G, M = (t1 - t0) * G;
    const int64_t Mq = (M + 47) / 48 * 48 + 48; /* padded to 4, 6 and 16 rows */
    float *Qf = scratch, *S = Qf + Mq * D, *O = S + Mq * BK, *mrow = O + Mq * D, *lvec = mrow + Mq;
    uint16_t *Qb = (uint16_t *)(lvec + Mq * VW), *Pb = Qb + Mq * D;
    memset(Qf, 0, (size_t)(Mq * D) * 4);
    for (int64_t r = 0; r < M; r++) {
        const uint16_t *src = c->Q + (t0 * G + r) * D;
        for (int64_t d = 0; d < D; d++) Qf[r * D + d] = lampe_bf16_to_f32(src[d]) * c->qscale;
    }
    if (version >= 2) {
        cvt_row_f32_to_bf16(Qf, Qb, Mq * D);
        memset(Pb, 0, (size_t)(Mq * BK) * 2);
    }
    memset(O, 0, (size_t)(Mq * D) * 4);
    memset(lvec, 0, (size_t)(Mq * VW) * 4);
    for (int64_t r = 0; r < Mq; r++) mrow[r] = -INFINITY;
    const int64_t last = (t1 - 1) / BK;
    for (int64_t blk = 0; blk <= last; blk++) {
        const int64_t k0 = blk * BK, nk = k0 + BK < c->L ? BK : c->L - k0;
        const int64_t r_lo = k0 > t0 ? (k0 - t0) * G : 0;
        const int64_t step = version == 4 ? 16 : 12; /* lcm of the kernels' heights */
        const int64_t rs = r_lo / step * step, Me = (M + step - 1) / step * step;
        const float *Kf = c->Kf + blk * BK * D, *Vf = c->Vf + blk * BK * D;
        const uint16_t *Kb = c->Kb + blk * BK * D, *Vb = c->Vb + blk * BK * D;
        if (!(c->skip & 1)) {
            if (version == 1)
                for (int64_t r = rs; r < Me; r += QK_MR) qk_f32(Qf + r * D, Kf, S + r * BK);
            else if (version <= 3)
                for (int64_t r = rs; r < Me; r += QK_MR) qk_dp(Qb + r * D, Kb, S + r * BK);
            else
                for (int64_t r = rs; r < Me; r += 16) qk_amx(Qb + r * D, Kb, S + r * BK);
        }
        if (!(c->skip & 2)) softmax(S, version >= 3 ? Pb : NULL, O, mrow, lvec, rs, M, G, t0, k0, nk);
        if (!(c->skip & 4)) {
            if (version <= 2) {
                for (int64_t d0 = 0; d0 < D; d0 += DC)
                    for (int64_t r = rs; r < Me; r += PV_MR) pv_f32(S + r * BK, O + r * D + d0, Vf + d0 * BK);
            } else if (version == 3) {
                for (int64_t d0 = 0; d0 < D; d0 += DC)
                    for (int64_t r = rs; r < Me; r += PV_MR) pv_dp(Pb + r * BK, O + r * D + d0, Vb + d0 * BK);
            } else {
                for (int64_t r = rs; r < Me; r += 16) pv_amx(Pb + r * BK, O + r * D, Vb);
            }
        }
    }
    for (int64_t r = 0; r < M; r++) {
        const float l = v_hsum(v_load(lvec + r * VW)), inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) c->out[(t0 * G + r) * D + d] = O[r * D + d] * inv;
    }
}

/* Version 5: one tile through attn_tiles.h (bf16 panels of the same layout as 3 and 4). */
static void tile_v5(const ctx *c, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t G = c->G, M = (t1 - t0) * G, Dk = tiles_dk16(D);
    tile_state ts;
    float *Qf = scratch;
    uint16_t *Qb = (uint16_t *)(Qf + (M + TILE_ROW_ALIGN) * D);
    float *tsc = (float *)(Qb + (M + TILE_ROW_ALIGN) * Dk);
    tiles_init(&ts, M, G, D, 1, tsc);
    memset(Qf, 0, (size_t)(ts.Mp * D) * 4);
    for (int64_t r = 0; r < M; r++)
        for (int64_t d = 0; d < D; d++) Qf[r * D + d] = lampe_bf16_to_f32(c->Q[(t0 * G + r) * D + d]) * c->qscale;
    for (int64_t r = 0; r < ts.Mp; r++) cvt_row_f32_to_bf16(Qf + r * D, Qb + r * Dk, D);
    int64_t lo[TILE_ROWS], hi[TILE_ROWS];
    for (int64_t pi = 0; pi < t1 - t0; pi++) lo[pi] = 0, hi[pi] = t0 + pi;
    for (int64_t blk = 0; blk <= (t1 - 1) / BK; blk++) {
        const int64_t k0 = blk * BK, nk = k0 + BK < c->L ? BK : c->L - k0;
        tiles_block(&ts, Qf, Qb, c->Kb + blk * BK * Dk, c->Vb + blk * BK * D, k0, nk, lo, hi);
    }
    for (int64_t r = 0; r < M; r++) {
        const float l = tiles_row_sum(&ts, r), inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; d++) c->out[(t0 * G + r) * D + d] = ts.O[r * ts.ldo + d] * inv;
    }
}

static void run(const ctx *c, int version, float *scratch)
{
    amx_tilecfg cfg;
    if (version == 5) {
#ifdef TILE_AMX
        tiles_amx_begin();
#endif
        int64_t bq = TILE_ROWS / c->G;
        if (bq < 1) bq = 1;
        for (int64_t t0 = (c->L - 1) / bq * bq; t0 >= 0; t0 -= bq)
            tile_v5(c, t0, t0 + bq < c->L ? t0 + bq : c->L, scratch);
#ifdef TILE_AMX
        tiles_amx_end();
#endif
        return;
    }
    if (version == 4) {
        amx_tilecfg_full(&cfg);
        amx_configure(&cfg);
    }
    int64_t bq = TILE_ROWS / c->G;
    if (bq < 1) bq = 1;
    for (int64_t t0 = (c->L - 1) / bq * bq; t0 >= 0; t0 -= bq) tile(c, version, t0, t0 + bq < c->L ? t0 + bq : c->L, scratch);
    if (version == 4) amx_release();
}

/* ------------------------------------------------------------------ main */

static double check(const ctx *c, const float *Qv, const float *K, const float *V, uint64_t *seed)
{
    const int64_t L = c->L, G = c->G;
    double worst = 0.0, big = 0.0;
    for (int64_t s = 0; s < 32; s++) {
        const int64_t t = s == 0 ? 0 : s == 1 ? L - 1 : (int64_t)(dev_uniform(seed) * (double)L);
        for (int64_t g = 0; g < G; g++) {
            const float *q = Qv + (t * G + g) * D;
            double m = -INFINITY, l = 0.0, acc[D] = {0};
            for (int64_t j = 0; j <= t; j++) {
                double x = 0.0;
                for (int64_t d = 0; d < D; d++) x += (double)q[d] * K[j * D + d];
                x *= (double)c->qscale;
                if (x > m) {
                    const double a = exp2(m - x);
                    l *= a;
                    for (int64_t d = 0; d < D; d++) acc[d] *= a;
                    m = x;
                }
                const double p = exp2(x - m);
                l += p;
                for (int64_t d = 0; d < D; d++) acc[d] += p * V[j * D + d];
            }
            for (int64_t d = 0; d < D; d++) {
                const double ref = acc[d] / l, e = fabs(ref - c->out[(t * G + g) * D + d]);
                if (e > worst) worst = e;
                if (fabs(ref) > big) big = fabs(ref);
            }
        }
    }
    return worst / big;
}

#define MAXV 8

int main(int argc, char **argv)
{
    int64_t L, G;
    int reps, ver[MAXV], skp[MAXV];
    const int nv = dev_args(argc, argv, 5, MAXV, &L, &G, &reps, ver, skp);
    if (nv < 0) return 2;
    const int64_t nblk = (L + BK - 1) / BK, np = nblk * BK;
    float *Qv = dev_alloc((size_t)(L * G * D) * 4), *K = dev_alloc((size_t)(np * D) * 4), *V = dev_alloc((size_t)(np * D) * 4);
    uint16_t *Q = dev_alloc((size_t)(L * G * D) * 2);
    float *Kf = dev_alloc((size_t)(np * D) * 4), *Vf = dev_alloc((size_t)(np * D) * 4);
    uint16_t *Kb = dev_alloc((size_t)(np * D) * 2), *Vb = dev_alloc((size_t)(np * D) * 2);
    float *out = dev_alloc((size_t)(L * G * D) * 4);
    uint64_t seed = 0x2545F4914F6CDD1Dull;
    /* bf16 inputs; Qv, K, V hold their exact float values (rows beyond L stay zero) */
    for (int64_t i = 0; i < L * G * D; i++) {
        Q[i] = lampe_f32_to_bf16((float)dev_normal(&seed));
        Qv[i] = lampe_bf16_to_f32(Q[i]);
    }
    for (int64_t i = 0; i < L * D; i++) K[i] = lampe_bf16_to_f32(lampe_f32_to_bf16((float)dev_normal(&seed)));
    for (int64_t i = 0; i < L * D; i++) V[i] = lampe_bf16_to_f32(lampe_f32_to_bf16((float)dev_normal(&seed)));
    for (int64_t j = 0; j < np; j++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t b = j / BK, jj = j % BK;
            Kf[b * BK * D + d * BK + jj] = K[j * D + d];
            Vf[b * BK * D + (d / DC) * BK * DC + jj * DC + d % DC] = V[j * D + d];
            Kb[b * BK * D + ((d / 2) * BK + jj) * 2 + d % 2] = lampe_f32_to_bf16(K[j * D + d]);
            Vb[b * BK * D + ((d / DC) * (BK / 2) + jj / 2) * DC * 2 + (d % DC) * 2 + jj % 2] = lampe_f32_to_bf16(V[j * D + d]);
        }
    ctx c = {L, G, nblk, Q, (float)(1.0 / sqrt((double)D)) * LOG2E, Kf, Vf, Kb, Vb, out, 0};
    float *scratch = dev_alloc((size_t)(TILE_ROWS + 96) * (2 * D + BK + 1 + VW + D / 2 + BK / 2) * 4 +
                               (size_t)tiles_scratch_floats(TILE_ROWS, D) * 4);
    dev_pin(0);
    for (int i = 0; i < nv; i++) {
        memset(out, 0, (size_t)(L * G * D) * 4);
        run(&c, ver[i], scratch);
        const double err = check(&c, Qv, K, V, &seed);
        printf("  v%d: max |out - ref| / max |ref| = %.3g on sampled rows%s\n", ver[i], err,
               err < 2e-2 ? "" : "  ABOVE the package's bf16 tolerance 2e-2");
        if (!(err < 2e-2)) return 1;
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
#ifdef LAMPE_BF16_EMU
    printf("EMULATED VDPBF16PS / AMX: timings of versions 2-4 mean nothing\n");
#endif
    const double peak = dev_fma_peak();
    printf("L=%lld G=%lld D=%d, %d rounds round-robin, thread CPU time; fp32 FMA ceiling %.1f GFLOP/s\n", (long long)L,
           (long long)G, D, R, peak);
    for (int i = 0; i < nv; i++) {
        dev_median(t[i], R);
        printf("  v%d skip=%d: best %8.1f ms  %6.1f GFLOP/s useful = %5.1f%% of fp32 FMA\n", ver[i], skp[i],
               t[i][0] * 1e3, flop / t[i][0] / 1e9, 100.0 * flop / t[i][0] / 1e9 / peak);
    }
    return 0;
}
