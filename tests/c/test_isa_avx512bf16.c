/*
 * The emulations of test_isa_avx512.c against the real VCVTNE2PS2BF16 and VDPBF16PS, bit for
 * bit (NaNs compared as NaNs: payload propagation is not part of the contract). Built with the
 * avx512bf16 unit's flags; called only where the CPU has AVX512-BF16.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#define LAMPE_LEVEL 3
#include "../../csrc/cpu/simd.h"
#include "../../csrc/cpu/bf16_ops.h"

uint16_t test_isa_some_bf16(void);
void test_isa_emu_cvt2(const float *in, uint16_t *out);
void test_isa_emu_dpbf16(const float *acc, const uint16_t *a, const uint16_t *b, float *out);

static float f_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int test_isa_real_bf16(void)
{
    int fails = 0;
    long bad = 0;
    uint32_t state = 12345u;
    for (uint32_t hi = 0; hi < 65536; hi++) {
        float in[32];
        uint16_t emu[32], real[32];
        for (int i = 0; i < 32; i++) {
            state = state * 1664525u + 1013904223u;
            in[i] = f_of((hi << 16) | (i < 4 ? (uint32_t[]){0, 0x7fff, 0x8000, 0x8001}[i] : state >> 16));
        }
        test_isa_emu_cvt2(in, emu);
        vbf_store(real, v_cvt2_bf16(v_load(in), v_load(in + 16)));
        for (int i = 0; i < 32; i++) bad += emu[i] != real[i];
    }
    if (bad) fprintf(stderr, "FAIL VCVTNE2PS2BF16 emulation differs from the CPU on %ld values\n", bad), fails++;
    bad = 0;
    for (int it = 0; it < 50000; it++) {
        uint16_t a[32], b[32];
        float acc[16], emu[16], real[16];
        for (int i = 0; i < 32; i++) a[i] = test_isa_some_bf16(), b[i] = test_isa_some_bf16();
        for (int i = 0; i < 16; i++) acc[i] = f_of((uint32_t)test_isa_some_bf16() << 16);
        test_isa_emu_dpbf16(acc, a, b, emu);
        v_store(real, v_dpbf16(v_load(acc), vbf_load(a), vbf_load(b)));
        for (int i = 0; i < 16; i++) {
            uint32_t x, y;
            memcpy(&x, &emu[i], 4);
            memcpy(&y, &real[i], 4);
            bad += x != y && !(isnan(emu[i]) && isnan(real[i]));
        }
    }
    if (bad) fprintf(stderr, "FAIL VDPBF16PS emulation differs from the CPU on %ld lanes\n", bad), fails++;
    return fails;
}
