/*
 * Prefill tiles: the panel layouts and the per-key-block step (S = Q.K^T, mask, online softmax,
 * O += P.V) of the fused attention, for float32 on every level and for bf16 inputs on the bf16
 * levels (VDPBF16PS, AMX tiles, or their emulations). Written once against simd.h, bf16_ops.h
 * and amx_ops.h, compiled per ISA. Grown in csrc/dev (attn_fp32.c v5, attn_bf16.c v3/v4).
 *
 * Rows: a tile holds M rows (query positions x the G heads of one KV head); row r is position
 * r / G. Each row sees the keys [lo, hi] (inclusive, tensor indices) of its position in the
 * current slot; the step masks everything else with -inf.
 *
 * Levels (LAMPE_LEVEL): 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 + BF16 (real or LAMPE_BF16_EMU),
 * 4 AMX (real or LAMPE_AMX_EMU). Levels 3 and 4 run bf16 inputs through bf16 panels; float32
 * and float16 inputs use the float32 path on every level.
 *
 * Numerics: float32 accumulation everywhere. bf16 path: queries (rotated, scaled) and keys
 * (rotated) are rounded to bf16 once, P is rounded to bf16 before P.V (as PyTorch's CPU flash
 * attention does); the row sums use the unrounded P. Softmax is lazy: a row's running max moves
 * only when a block's max exceeds it by more than TILE_LAZY (log2 units), so O is rarely
 * rescaled; meanwhile P <= 2^TILE_LAZY, far from overflow. Row sums stay vectors until the end.
 */
#ifndef LAMPE_ATTN_TILES_H
#define LAMPE_ATTN_TILES_H

#define TBK 64 /* keys per block (LAMPE_ATTN_BK) */
#define TILE_LAZY 8.0f

/* Micro-kernel shapes, measured in csrc/dev (README there): Q.K^T TQK_MR rows x TQK_NV vectors of
 * keys, P.V TPV_MR rows x TPV_NV vectors of head dims. */
#if LAMPE_LEVEL >= 2
#define TQK_MR 4
#define TQK_NV 4
#define TPV_MR 6
#define TPV_NV 4
#elif LAMPE_LEVEL == 1
#define TQK_MR 6
#define TQK_NV 2
#define TPV_MR 3
#define TPV_NV 4
#else /* scalar: plain loops the compiler may vectorise for the baseline ISA (SSE2, NEON) */
#define TQK_MR 4
#define TQK_NV 16
#define TPV_MR 1
#define TPV_NV 16
#endif
#define TQK_NR (TQK_NV * VW) /* keys per K chunk  */
#define TPV_DC (TPV_NV * VW) /* dims per V chunk  */
#define TILE_ROW_ALIGN 48    /* rows are padded to a multiple of every kernel height (4, 6, 3, 2, 16) */

#if LAMPE_LEVEL >= 3
#define TILE_BF16 1
#define TB_DC 64 /* dims per bf16 V chunk */
#endif
#if LAMPE_LEVEL >= 4
#define TILE_AMX 1
#endif

/* ------------------------------------------------------------------ layouts
 * float32 K block: [TBK / TQK_NR][D][TQK_NR]; V block: chunks of TPV_DC dims (the last one
 * narrower), chunk c = [TBK][w_c] at offset c * TBK * TPV_DC; dims padded to tiles_dv(D).
 * bf16 K block: [Dk / 2][TBK][2] (pairs along the head dim, Dk = D rounded up to 32);
 * V block: chunks of 64 dims, chunk c = [TBK / 2][w_c][2] (pairs along the keys) at offset
 * c * TBK * 64, dims padded to 16. Every padding element is zero. */

static inline int64_t tiles_dv(int64_t D) { return (D + VW - 1) / VW * VW; }
#ifdef TILE_BF16
static inline int64_t tiles_dk16(int64_t D) { return (D + 31) / 32 * 32; }
static inline int64_t tiles_dv16(int64_t D) { return (D + 15) / 16 * 16; }
#endif

/* Elements (floats, or uint16 for bf16) of one key block's K and V panels. */
static inline int64_t tiles_k_block_elems(int64_t D, int bf16)
{
#ifdef TILE_BF16
    if (bf16) return TBK * tiles_dk16(D);
#endif
    (void)bf16;
    return TBK * D;
}
static inline int64_t tiles_v_block_elems(int64_t D, int bf16)
{
#ifdef TILE_BF16
    if (bf16) return TBK * tiles_dv16(D);
#endif
    (void)bf16;
    return TBK * tiles_dv(D);
}

/* Key jj (0..TBK-1) of a block; row = NULL packs zeros (a key no row of this slot may see). */
static inline void tiles_pack_key_f32(float *kblk, int64_t jj, const float *row, int64_t D)
{
    float *dst = kblk + (jj / TQK_NR) * D * TQK_NR + jj % TQK_NR;
    for (int64_t d = 0; d < D; d++) dst[d * TQK_NR] = row ? row[d] : 0.0f;
}

static inline void tiles_pack_value_f32(float *vblk, int64_t jj, const float *row, int64_t D)
{
    const int64_t Dv = tiles_dv(D);
    for (int64_t c0 = 0; c0 < Dv; c0 += TPV_DC) {
        const int64_t w = Dv - c0 < TPV_DC ? Dv - c0 : TPV_DC;
        float *dst = vblk + c0 * TBK + jj * w;
        const int64_t n = !row ? 0 : c0 + w <= D ? w : D - c0; /* real dims of this chunk */
        if (n) memcpy(dst, row + c0, (size_t)n * 4);
        if (n < w) memset(dst + n, 0, (size_t)(w - n) * 4);
    }
}

#ifdef TILE_BF16
static inline void tiles_pack_key_bf16(uint16_t *kblk, int64_t jj, const float *row, int64_t D)
{
    const int64_t Dk = tiles_dk16(D);
    for (int64_t d = 0; d < Dk; d++)
        kblk[((d / 2) * TBK + jj) * 2 + d % 2] = row && d < D ? lampe_f32_to_bf16(row[d]) : 0;
}

static inline void tiles_pack_value_bf16(uint16_t *vblk, int64_t jj, const float *row, int64_t D)
{
    const int64_t Dv = tiles_dv16(D);
    for (int64_t c0 = 0; c0 < Dv; c0 += TB_DC) {
        const int64_t w = Dv - c0 < TB_DC ? Dv - c0 : TB_DC;
        uint16_t *dst = vblk + c0 * TBK + (jj / 2) * w * 2 + jj % 2;
        for (int64_t d = 0; d < w; d++) dst[2 * d] = row && c0 + d < D ? lampe_f32_to_bf16(row[c0 + d]) : 0;
    }
}
#endif

/* ------------------------------------------------------------------ float32 micro-kernels */

/* S[r][0..TQK_NR) = Q[r] . K chunk for TQK_MR rows (Q row stride D, S row stride TBK). */
static inline void tiles_qk_f32(const float *Q, int64_t D, const float *Kc, float *S)
{
    vf a[TQK_MR][TQK_NV];
#pragma GCC unroll 8
    for (int r = 0; r < TQK_MR; r++)
#pragma GCC unroll 8
        for (int c = 0; c < TQK_NV; c++) a[r][c] = v_zero();
    for (int64_t d = 0; d < D; d++) {
        vf k[TQK_NV];
#pragma GCC unroll 8
        for (int c = 0; c < TQK_NV; c++) k[c] = v_load(Kc + d * TQK_NR + c * VW);
#pragma GCC unroll 8
        for (int r = 0; r < TQK_MR; r++) {
            const vf q = v_set1(Q[r * D + d]);
#pragma GCC unroll 8
            for (int c = 0; c < TQK_NV; c++) a[r][c] = v_fma(q, k[c], a[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < TQK_MR; r++)
#pragma GCC unroll 8
        for (int c = 0; c < TQK_NV; c++) v_store(S + r * TBK + c * VW, a[r][c]);
}

/* O[r][0..NV*VW) += P[r] . V chunk for TPV_MR rows over nk keys (O row stride ldo). */
#define TILES_DEF_PV_F32(NV)                                                                                 \
    static inline void tiles_pv_f32_##NV(const float *P, float *O, int64_t ldo, const float *Vc, int64_t nk) \
    {                                                                                                       \
        vf a[TPV_MR][NV];                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < TPV_MR; r++)                                            \
            _Pragma("GCC unroll 8") for (int c = 0; c < NV; c++) a[r][c] = v_load(O + r * ldo + c * VW);    \
        for (int64_t j = 0; j < nk; j++) {                                                                  \
            vf vv[NV];                                                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < NV; c++) vv[c] = v_load(Vc + j * (NV * VW) + c * VW); \
            _Pragma("GCC unroll 8") for (int r = 0; r < TPV_MR; r++)                                        \
            {                                                                                               \
                const vf p = v_set1(P[r * TBK + j]);                                                        \
                _Pragma("GCC unroll 8") for (int c = 0; c < NV; c++) a[r][c] = v_fma(p, vv[c], a[r][c]);    \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 8") for (int r = 0; r < TPV_MR; r++)                                            \
            _Pragma("GCC unroll 8") for (int c = 0; c < NV; c++) v_store(O + r * ldo + c * VW, a[r][c]);    \
    }
#if LAMPE_LEVEL > 0
TILES_DEF_PV_F32(1)
TILES_DEF_PV_F32(2)
TILES_DEF_PV_F32(3)
TILES_DEF_PV_F32(4)

static inline void tiles_pv_f32(const float *P, float *O, int64_t ldo, const float *Vc, int64_t nk, int64_t nv)
{
    switch (nv) {
    case 1: tiles_pv_f32_1(P, O, ldo, Vc, nk); break;
    case 2: tiles_pv_f32_2(P, O, ldo, Vc, nk); break;
    case 3: tiles_pv_f32_3(P, O, ldo, Vc, nk); break;
    default: tiles_pv_f32_4(P, O, ldo, Vc, nk); break;
    }
}
#else
static inline void tiles_pv_f32(const float *P, float *O, int64_t ldo, const float *Vc, int64_t nk, int64_t nv)
{
    (void)ldo; /* TPV_MR = 1 */
    float acc[TPV_NV];
    for (int64_t c = 0; c < nv; c++) acc[c] = O[c];
    for (int64_t j = 0; j < nk; j++) {
        const float p = P[j];
        for (int64_t c = 0; c < nv; c++) acc[c] += p * Vc[j * nv + c];
    }
    for (int64_t c = 0; c < nv; c++) O[c] = acc[c];
}
#endif

/* ------------------------------------------------------------------ bf16 micro-kernels (VDPBF16PS) */

#ifdef TILE_BF16
/* S[r][0..64) = Qb[r] . K for 4 rows (Qb row stride Dk; K block [Dk/2][TBK][2]). */
static inline void tiles_qk_dp(const uint16_t *Qb, int64_t Dk, const uint16_t *Kb, float *S)
{
    vf a[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) a[r][c] = v_zero();
    for (int64_t d2 = 0; d2 < Dk / 2; d2++) {
        vbf k[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) k[c] = vbf_load(Kb + (d2 * TBK + c * 16) * 2);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const vbf q = vbf_bcast_pair(Qb + r * Dk + 2 * d2);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) a[r][c] = v_dpbf16(a[r][c], q, k[c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) v_store(S + r * TBK + c * 16, a[r][c]);
}

/* O[r][0..NV*16) += Pb[r] . V chunk for 6 rows over nk2 key pairs (chunk [TBK/2][NV*16][2]). */
#define TILES_DEF_PV_DP(NV)                                                                                  \
    static inline void tiles_pv_dp_##NV(const uint16_t *Pb, float *O, int64_t ldo, const uint16_t *Vc,      \
                                        int64_t nk2)                                                        \
    {                                                                                                       \
        vf a[6][NV];                                                                                        \
        _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++)                                                 \
            _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) a[r][c] = v_load(O + r * ldo + c * 16);    \
        for (int64_t j2 = 0; j2 < nk2; j2++) {                                                              \
            vbf vv[NV];                                                                                     \
            _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) vv[c] = vbf_load(Vc + (j2 * NV * 16 + c * 16) * 2); \
            _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++)                                             \
            {                                                                                               \
                const vbf p = vbf_bcast_pair(Pb + r * TBK + 2 * j2);                                        \
                _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) a[r][c] = v_dpbf16(a[r][c], p, vv[c]); \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++)                                                 \
            _Pragma("GCC unroll 4") for (int c = 0; c < NV; c++) v_store(O + r * ldo + c * 16, a[r][c]);    \
    }
TILES_DEF_PV_DP(1)
TILES_DEF_PV_DP(2)
TILES_DEF_PV_DP(3)
TILES_DEF_PV_DP(4)

static inline void tiles_pv_dp(const uint16_t *Pb, float *O, int64_t ldo, const uint16_t *Vc, int64_t nk2, int64_t nv)
{
    switch (nv) {
    case 1: tiles_pv_dp_1(Pb, O, ldo, Vc, nk2); break;
    case 2: tiles_pv_dp_2(Pb, O, ldo, Vc, nk2); break;
    case 3: tiles_pv_dp_3(Pb, O, ldo, Vc, nk2); break;
    default: tiles_pv_dp_4(Pb, O, ldo, Vc, nk2); break;
    }
}
#endif

/* ------------------------------------------------------------------ AMX micro-kernels */

#ifdef TILE_AMX
/* Tile numbers are literals: the instructions encode them. */
#define TT_C0 0
#define TT_C1 1
#define TT_C2 2
#define TT_C3 3
#define TT_A0 4
#define TT_A1 5
#define TT_B0 6
#define TT_B1 7

/* Every tile 16 x 64 bytes; loaded per work item and thread (the configuration is per thread). */
static inline void tiles_amx_begin(void)
{
    amx_tilecfg cfg;
    amx_tilecfg_full(&cfg);
    amx_configure(&cfg);
}
static inline void tiles_amx_end(void) { amx_release(); }

/* S[16][0..64) of one 16-row strip: four accumulator tiles (16 keys each), Dk / 32 steps of
 * A = 16 rows x 32 dims of Qb, B = 16 dim pairs x 16 keys of the K block. */
static inline void tiles_qk_amx(const uint16_t *Qb, int64_t Dk, const uint16_t *Kb, float *S)
{
    AMX_ZERO(TT_C0);
    AMX_ZERO(TT_C1);
    AMX_ZERO(TT_C2);
    AMX_ZERO(TT_C3);
    for (int64_t k = 0; k < Dk / 32; k++) {
        const uint16_t *kb = Kb + k * 16 * TBK * 2;
        AMX_LOAD(TT_A0, Qb + k * 32, Dk * 2);
        AMX_LOAD(TT_B0, kb, TBK * 4);
        AMX_DPBF16(TT_C0, TT_A0, TT_B0);
        AMX_LOAD(TT_B1, kb + 32, TBK * 4);
        AMX_DPBF16(TT_C1, TT_A0, TT_B1);
        AMX_LOAD(TT_B0, kb + 64, TBK * 4);
        AMX_DPBF16(TT_C2, TT_A0, TT_B0);
        AMX_LOAD(TT_B1, kb + 96, TBK * 4);
        AMX_DPBF16(TT_C3, TT_A0, TT_B1);
    }
    AMX_STORE(TT_C0, S, TBK * 4);
    AMX_STORE(TT_C1, S + 16, TBK * 4);
    AMX_STORE(TT_C2, S + 32, TBK * 4);
    AMX_STORE(TT_C3, S + 48, TBK * 4);
}

/* O[16][0..Dv16) += Pb[16][0..64) . V block: P in two A tiles (keys 0-31, 32-63), then per
 * 16-dim column the O block as accumulator and two B tiles (16 key pairs x 16 dims). Keys of a
 * partial block beyond nk have P = 0 and zero values. */
static inline void tiles_pv_amx(const uint16_t *Pb, float *O, int64_t ldo, const uint16_t *Vb, int64_t Dv16)
{
    AMX_LOAD(TT_A0, Pb, TBK * 2);
    AMX_LOAD(TT_A1, Pb + 32, TBK * 2);
    for (int64_t n = 0; n < Dv16; n += 16) {
        const int64_t c0 = n / TB_DC * TB_DC, w = Dv16 - c0 < TB_DC ? Dv16 - c0 : TB_DC;
        const uint16_t *vb = Vb + c0 * TBK + (n - c0) * 2; /* key pairs 0..15 of this column */
        AMX_LOAD(TT_C0, O + n, ldo * 4);
        AMX_LOAD(TT_B0, vb, w * 4);
        AMX_DPBF16(TT_C0, TT_A0, TT_B0);
        AMX_LOAD(TT_B1, vb + 16 * w * 2, w * 4);
        AMX_DPBF16(TT_C0, TT_A1, TT_B1);
        AMX_STORE(TT_C0, O + n, ldo * 4);
    }
}
#endif

/* ------------------------------------------------------------------ tile state and the block step */

typedef struct tile_state {
    int64_t D, M, G;  /* head dim, rows, query heads per position */
    int64_t Mp;       /* rows padded to TILE_ROW_ALIGN            */
    int64_t ldo;      /* O row stride: tiles_dv(D), or tiles_dv16(D) on the bf16 path */
    int bf16;         /* bf16 panels and products                 */
    float *S;         /* [Mp][TBK] scores, then float32 P         */
    float *O;         /* [Mp][ldo]                                */
    float *m;         /* [Mp] running max (log2 units)            */
    float *l;         /* [Mp][VW] running sums, vector per row    */
    uint16_t *Pb;     /* [Mp][TBK] P in bf16 (bf16 path)          */
    uint8_t *act;     /* [Mp] row sees keys of the current block  */
    const int32_t *skip; /* [M] rows to leave alone (poisoned), or NULL */
    float cap2;       /* logit soft-cap in log2 units (0: none)   */
    int overflow;     /* an active row's logits were all -inf     */
} tile_state;

static inline int64_t tiles_rows(int64_t M) { return (M + TILE_ROW_ALIGN - 1) / TILE_ROW_ALIGN * TILE_ROW_ALIGN; }

/* O row stride of a path (the caller's O must hold tiles_rows(M) rows of it). */
static inline int64_t tiles_ldo(int64_t D, int bf16)
{
#ifdef TILE_BF16
    if (bf16) return tiles_dv16(D);
#endif
    (void)bf16;
    return tiles_dv(D);
}

/* Point the state at the caller's arrays (sized for tiles_rows(M) rows) and start it empty. */
static inline void tiles_bind(tile_state *t, int64_t M, int64_t G, int64_t D, int bf16, float *S, float *O, float *m,
                              float *l, uint16_t *Pb, uint8_t *act)
{
    t->D = D;
    t->M = M;
    t->G = G;
    t->Mp = tiles_rows(M);
    t->bf16 = bf16;
    t->ldo = tiles_ldo(D, bf16);
    t->S = S;
    t->O = O;
    t->m = m;
    t->l = l;
    t->Pb = Pb;
    t->act = act;
    t->skip = NULL;
    t->cap2 = 0.0f;
    t->overflow = 0;
    memset(t->O, 0, (size_t)(t->Mp * t->ldo) * 4);
    memset(t->l, 0, (size_t)(t->Mp * VW) * 4);
    memset(t->act, 0, (size_t)t->Mp);
    for (int64_t r = 0; r < t->Mp; r++) t->m[r] = -INFINITY;
}

/* Floats of one buffer tiles_init lays everything out in (the workbench's way). */
static inline int64_t tiles_scratch_floats(int64_t M, int64_t D)
{
    const int64_t Mp = tiles_rows(M);
    int64_t ldo = tiles_dv(D);
#ifdef TILE_BF16
    if (tiles_dv16(D) > ldo) ldo = tiles_dv16(D);
#endif
    return Mp * TBK + Mp * ldo + Mp + Mp * VW + Mp * TBK / 2 + Mp / 4 + 64;
}

static inline void tiles_init(tile_state *t, int64_t M, int64_t G, int64_t D, int bf16, float *scratch)
{
    const int64_t Mp = tiles_rows(M);
    float *S = scratch, *O = S + Mp * TBK, *m = O + Mp * tiles_ldo(D, bf16), *l = m + Mp;
    uint16_t *Pb = (uint16_t *)(l + Mp * VW);
    tiles_bind(t, M, G, D, bf16, S, O, m, l, Pb, (uint8_t *)(Pb + Mp * TBK));
}

/* Online softmax of the active rows over one block; lo/hi: the row's visible keys, block-local
 * (inclusive; lo > hi when it sees none). Writes P over the scores (and rounded into Pb). */
static inline void tiles_zero_row(tile_state *t, int64_t r);

static inline void tiles_softmax_row(tile_state *t, int64_t r, int64_t lo, int64_t hi)
{
    float *Sr = t->S + r * TBK;
    if (t->cap2 > 0.0f) { /* soft-capping: c2 * tanh(S / c2) (log2 units) */
        const vf inv = v_set1(1.0f / t->cap2), c = v_set1(t->cap2);
        for (int64_t jj = 0; jj < TBK; jj += VW) v_store(Sr + jj, v_mul(v_tanh(v_mul(v_load(Sr + jj), inv)), c));
    }
    for (int64_t jj = 0; jj < lo; jj++) Sr[jj] = -INFINITY;
    for (int64_t jj = hi + 1; jj < TBK; jj++) Sr[jj] = -INFINITY;
    vf vm = v_load(Sr);
    for (int64_t jj = VW; jj < TBK; jj += VW) vm = v_max(vm, v_load(Sr + jj));
    const float mx = v_hmax(vm), mold = t->m[r];
    const float mnew = (mold == -INFINITY || mx > mold + TILE_LAZY) ? (mx > mold ? mx : mold) : mold;
    if (mnew == -INFINITY) { /* every logit -inf: finite inputs overflowed (the caller reports it) */
        t->overflow = 1;
        tiles_zero_row(t, r);
        return;
    }
    const vf vmn = v_set1(mnew);
    vf vs = v_zero();
    for (int64_t jj = 0; jj < TBK; jj += VW) {
        const vf e = v_exp2(v_sub(v_load(Sr + jj), vmn));
        v_store(Sr + jj, e);
        vs = v_add(vs, e);
    }
#ifdef TILE_BF16
    if (t->bf16) cvt_row_f32_to_bf16(Sr, t->Pb + r * TBK, TBK);
#endif
    if (mnew != mold) {
        const float alpha = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
        const vf va = v_set1(alpha);
        float *Or = t->O + r * t->ldo;
        for (int64_t d = 0; d < t->ldo; d += VW) v_store(Or + d, v_mul(v_load(Or + d), va));
        v_store(t->l + r * VW, v_mul(v_load(t->l + r * VW), va));
        t->m[r] = mnew;
    }
    v_store(t->l + r * VW, v_add(v_load(t->l + r * VW), vs));
}

/* A row that sees nothing of this block but shares a kernel row group with one that does. */
static inline void tiles_zero_row(tile_state *t, int64_t r)
{
    memset(t->S + r * TBK, 0, TBK * 4);
#ifdef TILE_BF16
    if (t->bf16) memset(t->Pb + r * TBK, 0, TBK * 2);
#endif
}

/* Marks the rows that see keys of [k0, k0 + nk); returns the last such row (-1: none) and the
 * first in *rmin. */
static inline int64_t tiles_mark_rows(tile_state *t, int64_t k0, int64_t nk, const int64_t *lo, const int64_t *hi,
                                      int64_t *rmin)
{
    const int64_t M = t->M, G = t->G;
    int64_t first = M, last = -1;
    for (int64_t pi = 0; pi * G < M; pi++) {
        const int meets = lo[pi] < k0 + nk && hi[pi] >= k0 && lo[pi] <= hi[pi];
        for (int64_t g = 0; g < G; g++) t->act[pi * G + g] = (uint8_t)(meets && !(t->skip && t->skip[pi * G + g]));
        if (meets) {
            if (pi * G < first) first = pi * G;
            last = pi * G + G - 1;
        }
    }
    *rmin = first;
    return last;
}

/* Row-group heights of the path's Q.K^T and P.V kernels. */
static inline int64_t tiles_qk_height(const tile_state *t)
{
#ifdef TILE_AMX
    if (t->bf16) return 16;
#elif defined(TILE_BF16)
    if (t->bf16) return 4;
#endif
    (void)t;
    return TQK_MR;
}
static inline int64_t tiles_pv_height(const tile_state *t)
{
#ifdef TILE_AMX
    if (t->bf16) return 16;
#elif defined(TILE_BF16)
    if (t->bf16) return 6;
#endif
    (void)t;
    return TPV_MR;
}

/* Mask + online softmax of rows [s0, s1) (inactive and padding rows get P = 0), then O += P.V
 * for the row groups [p0, p1). */
static inline void tiles_softmax_pv(tile_state *t, const void *Vb, int64_t k0, int64_t nk, const int64_t *lo,
                                    const int64_t *hi, int64_t s0, int64_t s1, int64_t p0, int64_t p1)
{
    const int64_t M = t->M, G = t->G, D = t->D;
    for (int64_t r = s0; r < s1; r++) {
        if (r >= M || !t->act[r]) {
            tiles_zero_row(t, r);
            continue;
        }
        const int64_t pi = r / G;
        const int64_t a = lo[pi] > k0 ? lo[pi] - k0 : 0, b = hi[pi] < k0 + nk - 1 ? hi[pi] - k0 : nk - 1;
        tiles_softmax_row(t, r, a, b);
    }
    if (!t->bf16) {
        const float *V = (const float *)Vb;
        const int64_t Dv = tiles_dv(D);
        for (int64_t c0 = 0; c0 < Dv; c0 += TPV_DC) {
            const int64_t w = Dv - c0 < TPV_DC ? Dv - c0 : TPV_DC;
            for (int64_t r = p0; r < p1; r += TPV_MR)
                tiles_pv_f32(t->S + r * TBK, t->O + r * t->ldo + c0, t->ldo, V + c0 * TBK, nk, w / VW);
        }
    }
#ifdef TILE_BF16
    else {
        const uint16_t *V = (const uint16_t *)Vb;
        const int64_t Dv = tiles_dv16(D);
#ifdef TILE_AMX
        for (int64_t r = p0; r < p1; r += 16) tiles_pv_amx(t->Pb + r * TBK, t->O + r * t->ldo, t->ldo, V, Dv);
#else
        const int64_t nk2 = (nk + 1) / 2;
        for (int64_t c0 = 0; c0 < Dv; c0 += TB_DC) {
            const int64_t w = Dv - c0 < TB_DC ? Dv - c0 : TB_DC;
            for (int64_t r = p0; r < p1; r += 6)
                tiles_pv_dp(t->Pb + r * TBK, t->O + r * t->ldo + c0, t->ldo, V + c0 * TBK, nk2, w / 16);
        }
#endif
    }
#endif
}

/*
 * One key block [k0, k0 + nk) for rows [0, M): Q (float32 [Mp][D]) or Qb (bf16 [Mp][Dk]) are
 * this slot's rotated, scaled queries (padding rows zero); lo/hi[pi] the slot's visible key range
 * of position pi (tensor indices, inclusive). Kb/Vb: this block's panels in the layout of the
 * path (float32 or bf16).
 */
static inline void tiles_block(tile_state *t, const float *Q, const uint16_t *Qb, const void *Kb, const void *Vb,
                               int64_t k0, int64_t nk, const int64_t *lo, const int64_t *hi)
{
    const int64_t D = t->D;
    int64_t rmin;
    const int64_t rmax = tiles_mark_rows(t, k0, nk, lo, hi, &rmin);
    if (rmax < 0) return;
    const int64_t hq = tiles_qk_height(t), hp = tiles_pv_height(t);
    const int64_t q0 = rmin / hq * hq, q1 = (rmax / hq + 1) * hq, p0 = rmin / hp * hp, p1 = (rmax / hp + 1) * hp;
    if (!t->bf16) { /* S = Q.K^T */
        const float *K = (const float *)Kb;
        for (int64_t j = 0; j < TBK; j += TQK_NR)
            for (int64_t r = q0; r < q1; r += TQK_MR) tiles_qk_f32(Q + r * D, D, K + j * D, t->S + r * TBK + j);
    }
#ifdef TILE_BF16
    else {
        const int64_t Dk = tiles_dk16(D);
#ifdef TILE_AMX
        for (int64_t r = q0; r < q1; r += 16) tiles_qk_amx(Qb + r * Dk, Dk, (const uint16_t *)Kb, t->S + r * TBK);
#else
        for (int64_t r = q0; r < q1; r += 4) tiles_qk_dp(Qb + r * Dk, Dk, (const uint16_t *)Kb, t->S + r * TBK);
#endif
    }
#else
    (void)Qb;
#endif
    tiles_softmax_pv(t, Vb, k0, nk, lo, hi, q0 < p0 ? q0 : p0, q1 > p1 ? q1 : p1, p0, p1);
}

/* The same step for scores the caller computed into S rows [0, M) (decode rows). */
static inline void tiles_block_scored(tile_state *t, const void *Vb, int64_t k0, int64_t nk, const int64_t *lo,
                                      const int64_t *hi)
{
    int64_t rmin;
    const int64_t rmax = tiles_mark_rows(t, k0, nk, lo, hi, &rmin);
    if (rmax < 0) return;
    const int64_t hp = tiles_pv_height(t), p0 = rmin / hp * hp, p1 = (rmax / hp + 1) * hp;
    tiles_softmax_pv(t, Vb, k0, nk, lo, hi, p0, p1, p0, p1);
}

/* Row r's sum l (natural units are the caller's business). */
static inline float tiles_row_sum(const tile_state *t, int64_t r) { return v_hsum(v_load(t->l + r * VW)); }

#endif
