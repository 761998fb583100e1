/*
 * The bf16 and AMX emulations (csrc/cpu/bf16_ops.h, amx_ops.h) against scalar restatements of
 * the SDM pseudo-code: conversion on ~460 000 patterns (every sign/exponent/high-mantissa half
 * with rounding-tie, denormal, infinity and NaN low halves), VDPBF16PS lanes and pair order with
 * denormal inputs and outputs, TDPBF16PS on a non-square tile shape with row strides. Built with
 * the avx512 kernel unit's flags; called only where the CPU has AVX-512.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAMPE_LEVEL 4
#define LAMPE_BF16_EMU 1
#define LAMPE_AMX_EMU 1
#include "../../csrc/cpu/simd.h"
#include "../../csrc/cpu/bf16_ops.h"
#include "../../csrc/cpu/amx_ops.h"

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* convert_fp32_to_bfloat16 of the SDM, one value. */
static uint16_t ref_cvt(float x)
{
    const uint32_t u = bits(x), e = u & 0x7f800000u;
    if (e == 0) return (uint16_t)((u >> 16) & 0x8000u);
    if (e == 0x7f800000u) return (uint16_t)((u >> 16) | ((u & 0x7fffffu) ? 0x40u : 0u));
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float daz(uint16_t h) { return from_bits(((uint32_t)(h & 0x7f80u ? h : h & 0x8000u)) << 16); }
static float ftz(float x) { return (bits(x) & 0x7f800000u) ? x : from_bits(bits(x) & 0x80000000u); }
static int same(float a, float b) { return bits(a) == bits(b) || (isnan(a) && isnan(b)); }

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

/* A bf16 from a mix of ordinary values, zeros, denormals, infinities and NaNs. */
static uint16_t some_bf16(void)
{
    const uint32_t k = rnd() % 16, s = (rnd() & 1u) << 15;
    if (k == 0) return (uint16_t)s;                             /* zero */
    if (k == 1) return (uint16_t)(s | (1 + rnd() % 0x7f));      /* denormal */
    if (k == 2) return (uint16_t)(s | 0x7f80u);                 /* infinity */
    if (k == 3 && rnd() % 4 == 0) return (uint16_t)(s | 0x7fc1u); /* NaN */
    if (k == 4) return (uint16_t)(s | ((1 + rnd() % 6) << 7) | (rnd() & 0x7f)); /* tiny normals: denormal products */
    return (uint16_t)(s | ((100 + rnd() % 56) << 7) | (rnd() & 0x7f));          /* ordinary */
}

int test_isa_emulation(void)
{
    int fails = 0;
    /* conversion */
    static const uint16_t lows[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234};
    long bad = 0;
    for (uint32_t hi = 0; hi < 65536; hi++)
        for (size_t li = 0; li < sizeof(lows) / sizeof(lows[0]); li += 1) {
            float in[32];
            for (int i = 0; i < 32; i++) in[i] = from_bits((hi << 16) | lows[(li + (size_t)i) % 7]);
            uint16_t out[32];
            vbf_store(out, v_cvt2_bf16(v_load(in), v_load(in + 16)));
            for (int i = 0; i < 32; i++) bad += out[i] != ref_cvt(in[i]);
        }
    if (bad) fprintf(stderr, "FAIL emulated VCVTNE2PS2BF16: %ld of %d patterns differ from the SDM\n", bad, 65536 * 7 * 32), fails++;

    /* VDPBF16PS: srcdest += odd product, then += even product, FMA each, DAZ in, FTZ out */
    bad = 0;
    for (int it = 0; it < 20000; it++) {
        uint16_t a[32], b[32];
        float acc[16], out[16];
        for (int i = 0; i < 32; i++) a[i] = some_bf16(), b[i] = some_bf16();
        for (int i = 0; i < 16; i++) acc[i] = it % 3 ? daz(some_bf16()) * 1.5f : 0.0f;
        v_store(out, v_dpbf16(v_load(acc), vbf_load(a), vbf_load(b)));
        for (int i = 0; i < 16; i++) {
            float r = ftz(fmaf(daz(a[2 * i + 1]), daz(b[2 * i + 1]), acc[i]));
            r = ftz(fmaf(daz(a[2 * i]), daz(b[2 * i]), r));
            bad += !same(out[i], r);
        }
    }
    if (bad) fprintf(stderr, "FAIL emulated VDPBF16PS: %ld lanes differ from the SDM\n", bad), fails++;

    /* TDPBF16PS on a 7-row tile with 5 dword columns (K = 6 pairs), loads and stores with strides */
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    cfg.rows[0] = 7, cfg.colsb[0] = 20; /* C: 7 x 5 fp32  */
    cfg.rows[1] = 7, cfg.colsb[1] = 24; /* A: 7 x 6 pairs */
    cfg.rows[2] = 6, cfg.colsb[2] = 20; /* B: 6 x 5 pairs */
    amx_configure(&cfg);
    bad = 0;
    for (int it = 0; it < 200; it++) {
        uint16_t A[7][16], B[6][14];
        float C[7][9], out[7][9];
        for (int m = 0; m < 7; m++)
            for (int k = 0; k < 16; k++) A[m][k] = some_bf16();
        for (int k = 0; k < 6; k++)
            for (int n = 0; n < 14; n++) B[k][n] = some_bf16();
        for (int m = 0; m < 7; m++)
            for (int n = 0; n < 9; n++) C[m][n] = daz(some_bf16()), out[m][n] = -1.0f;
        AMX_LOAD(0, C, sizeof(C[0]));
        AMX_LOAD(1, A, sizeof(A[0]));
        AMX_LOAD(2, B, sizeof(B[0]));
        AMX_DPBF16(0, 1, 2);
        AMX_STORE(0, out, sizeof(out[0]));
        for (int m = 0; m < 7; m++)
            for (int n = 0; n < 9; n++) {
                if (n >= 5) { /* beyond the tile's 5 columns: never written */
                    bad += out[m][n] != -1.0f;
                    continue;
                }
                float ev = 0.0f, od = 0.0f;
                for (int k = 0; k < 6; k++) {
                    ev = ftz(fmaf(daz(A[m][2 * k]), daz(B[k][2 * n]), ev));
                    od = ftz(fmaf(daz(A[m][2 * k + 1]), daz(B[k][2 * n + 1]), od));
                }
                bad += !same(out[m][n], ftz(C[m][n] + ftz(ev + od)));
            }
    }
    amx_release();
    if (bad) fprintf(stderr, "FAIL emulated TDPBF16PS: %ld elements differ from the SDM\n", bad), fails++;
    return fails;
}

/* ------------------------------------------------------------------ for the real-hardware checks */

uint16_t test_isa_some_bf16(void) { return some_bf16(); }

void test_isa_emu_cvt2(const float *in, uint16_t *out) { vbf_store(out, v_cvt2_bf16(v_load(in), v_load(in + 16))); }

void test_isa_emu_dpbf16(const float *acc, const uint16_t *a, const uint16_t *b, float *out)
{
    v_store(out, v_dpbf16(v_load(acc), vbf_load(a), vbf_load(b)));
}

/* C (16 x 16 fp32) += A (16 x 32 bf16) . B (16 x 32 bf16 pairs) on full tiles. */
void test_isa_emu_tdpbf16(float *C, const uint16_t *A, const uint16_t *B)
{
    amx_tilecfg cfg;
    amx_tilecfg_full(&cfg);
    amx_configure(&cfg);
    AMX_LOAD(0, C, 64);
    AMX_LOAD(1, A, 64);
    AMX_LOAD(2, B, 64);
    AMX_DPBF16(0, 1, 2);
    AMX_STORE(0, C, 64);
    amx_release();
}
