/*
 * AMX tile vocabulary of the amx kernel level (include after simd.h).
 *
 * The amx kernels are written once against these names. A unit compiled with -mamx-tile
 * -mamx-bf16 gets the real instructions (LDTILECFG, TILELOADD, TDPBF16PS, TILESTORED,
 * TILEZERO, TILERELEASE); a unit that defines LAMPE_AMX_EMU gets a software tile unit with the
 * same semantics (eight 1 KB tiles, a 64-byte configuration, rows beyond a tile's configured
 * shape read as zero, shape mismatches fault like the #UD of the hardware), so the tile blocking
 * and the data layouts run and are tested on any AVX-512 CPU. The emulation is for tests only.
 *
 * Tile numbers must be compile-time constants (the instructions encode them).
 */
#ifndef LAMPE_AMX_OPS_H
#define LAMPE_AMX_OPS_H

#include <stdint.h>
#include <string.h>

/* The LDTILECFG memory format (palette 1): 64 bytes. */
typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16]; /* bytes per row of tile i (<= 64) */
    uint8_t rows[16];   /* rows of tile i (<= 16)          */
} __attribute__((aligned(64))) amx_tilecfg;

/* Every tile 16 rows x 64 bytes: 16 x 16 fp32, 16 x 32 bf16. */
static inline void amx_tilecfg_full(amx_tilecfg *c)
{
    memset(c, 0, sizeof(*c));
    c->palette_id = 1;
    for (int t = 0; t < 8; t++) {
        c->colsb[t] = 64;
        c->rows[t] = 16;
    }
}

#ifndef LAMPE_AMX_EMU /* ------------------------------------------------ the instructions */

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__)
#error "amx_ops.h: compile with -mamx-tile -mamx-bf16, or define LAMPE_AMX_EMU for the emulated test level"
#endif

static inline void amx_configure(const amx_tilecfg *c) { _tile_loadconfig(c); }
static inline void amx_release(void) { _tile_release(); }
#define AMX_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define AMX_STORE(t, base, stride) _tile_stored(t, base, stride)
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_DPBF16(c, a, b) _tile_dpbf16ps(c, a, b)

#else /* ------------------------------------------------------------------ software tile unit */

typedef struct {
    amx_tilecfg cfg;
    int configured;
    uint8_t t[8][16][64];
} amx_emu_state;

static _Thread_local amx_emu_state amx_emu;

static inline void amx_emu_fault(void) { __builtin_trap(); } /* the hardware raises #UD */

static inline void amx_configure(const amx_tilecfg *c)
{
    if (c->palette_id != 1) amx_emu_fault();
    for (int i = 0; i < 8; i++)
        if (c->rows[i] > 16 || c->colsb[i] > 64) amx_emu_fault();
    amx_emu.cfg = *c;
    amx_emu.configured = 1;
    memset(amx_emu.t, 0, sizeof(amx_emu.t));
}

static inline void amx_release(void)
{
    amx_emu.configured = 0;
    memset(amx_emu.t, 0, sizeof(amx_emu.t));
}

/* TILELOADD: rows[t] rows of colsb[t] bytes from base + r * stride; the rest of the tile zero. */
static inline void amx_emu_load(int t, const void *base, int64_t stride)
{
    if (!amx_emu.configured) amx_emu_fault();
    const int rows = amx_emu.cfg.rows[t], colsb = amx_emu.cfg.colsb[t];
    memset(amx_emu.t[t], 0, sizeof(amx_emu.t[t]));
    for (int r = 0; r < rows; r++) memcpy(amx_emu.t[t][r], (const char *)base + r * stride, (size_t)colsb);
}

static inline void amx_emu_store(int t, void *base, int64_t stride)
{
    if (!amx_emu.configured) amx_emu_fault();
    const int rows = amx_emu.cfg.rows[t], colsb = amx_emu.cfg.colsb[t];
    for (int r = 0; r < rows; r++) memcpy((char *)base + r * stride, amx_emu.t[t][r], (size_t)colsb);
}

static inline void amx_emu_zero(int t)
{
    if (!amx_emu.configured) amx_emu_fault();
    memset(amx_emu.t[t], 0, sizeof(amx_emu.t[t]));
}

static inline float amx_emu_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* DAZ of a bf16 operand (exponent 0 -> signed zero), as an fp32 value. */
static inline float amx_emu_bf16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    if (!(h & 0x7f80u)) h &= 0x8000u;
    return amx_emu_f32((uint32_t)h << 16);
}

/* FTZ of an fp32 result. */
static inline float amx_emu_ftz(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if (!(u & 0x7f800000u)) u &= 0x80000000u;
    return amx_emu_f32(u);
}

/* TDPBF16PS c, a, b as the SDM's pseudo-code states it: per row m of c, the even and the odd
 * products of every k are accumulated separately from zero (FP32 FMA, DAZ = FTZ = 1, round to
 * nearest even), then summed and added to c. (The Intel Intrinsics Guide shows a sequential
 * order instead; results of the real unit are checked against the float64 reference by the
 * tests, never against this emulation bit for bit.) Shape rules: c.rows = a.rows,
 * c.colsb = b.colsb, a.colsb / 4 = b.rows; otherwise #UD. */
static inline void amx_emu_dpbf16(int c, int a, int b)
{
    const amx_tilecfg *cf = &amx_emu.cfg;
    if (!amx_emu.configured || cf->rows[c] != cf->rows[a] || cf->colsb[c] != cf->colsb[b] ||
        cf->colsb[a] / 4 != cf->rows[b] || c == a || c == b || a == b)
        amx_emu_fault();
    const int M = cf->rows[c], N = cf->colsb[c] / 4, K = cf->colsb[a] / 4;
    for (int m = 0; m < M; m++) {
        float even[16] = {0}, odd[16] = {0};
        for (int k = 0; k < K; k++)
            for (int n = 0; n < N; n++) {
                const float a0 = amx_emu_bf16(&amx_emu.t[a][m][4 * k]), a1 = amx_emu_bf16(&amx_emu.t[a][m][4 * k + 2]);
                const float b0 = amx_emu_bf16(&amx_emu.t[b][k][4 * n]), b1 = amx_emu_bf16(&amx_emu.t[b][k][4 * n + 2]);
                even[n] = amx_emu_ftz(fmaf(a0, b0, even[n]));
                odd[n] = amx_emu_ftz(fmaf(a1, b1, odd[n]));
            }
        for (int n = 0; n < N; n++) {
            float acc;
            memcpy(&acc, &amx_emu.t[c][m][4 * n], 4);
            acc = amx_emu_ftz(acc + amx_emu_ftz(even[n] + odd[n]));
            memcpy(&amx_emu.t[c][m][4 * n], &acc, 4);
        }
    }
}

#define AMX_LOAD(t, base, stride) amx_emu_load(t, base, stride)
#define AMX_STORE(t, base, stride) amx_emu_store(t, base, stride)
#define AMX_ZERO(t) amx_emu_zero(t)
#define AMX_DPBF16(c, a, b) amx_emu_dpbf16(c, a, b)

#endif
#endif
