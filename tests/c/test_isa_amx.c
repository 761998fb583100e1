/*
 * The TDPBF16PS emulation against the CPU's AMX unit on full 16 x 16 tiles. The emulation
 * follows the SDM's pseudo-code (even and odd products summed separately); the test reports
 * how many elements match bit for bit and fails when any differs by more than 2^-20 of the
 * sum of |products| (an accumulation order the SDM does not pin down would stay far below that,
 * a layout error far above). Built with the amx unit's flags; called only where the CPU has AMX
 * and the OS granted the tile state (lampe_isa_available_mask asked for it).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#define LAMPE_LEVEL 4
#include "../../csrc/cpu/simd.h"
#include "../../csrc/cpu/bf16_ops.h"
#include "../../csrc/cpu/amx_ops.h"

uint16_t test_isa_some_bf16(void);
void test_isa_emu_tdpbf16(float *C, const uint16_t *A, const uint16_t *B);

static float f_of(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ordinary values only (no inf/NaN), so the magnitude bound below is meaningful */
static uint16_t finite_bf16(void)
{
    uint16_t h;
    do h = test_isa_some_bf16();
    while ((h & 0x7f80u) == 0x7f80u);
    return h;
}

int test_isa_real_amx(void)
{
    long exact = 0, total = 0, bad = 0;
    for (int it = 0; it < 300; it++) {
        uint16_t A[16][32], B[16][32];
        float C[16][16], emu[16][16], real[16][16];
        for (int m = 0; m < 16; m++)
            for (int k = 0; k < 32; k++) A[m][k] = finite_bf16(), B[m][k] = finite_bf16();
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 16; n++) C[m][n] = f_of(finite_bf16());
        memcpy(emu, C, sizeof(C));
        memcpy(real, C, sizeof(C));
        test_isa_emu_tdpbf16(&emu[0][0], &A[0][0], &B[0][0]);
        amx_tilecfg cfg;
        amx_tilecfg_full(&cfg);
        amx_configure(&cfg);
        AMX_LOAD(0, real, 64);
        AMX_LOAD(1, A, 64);
        AMX_LOAD(2, B, 64);
        AMX_DPBF16(0, 1, 2);
        AMX_STORE(0, real, 64);
        amx_release();
        for (int m = 0; m < 16; m++)
            for (int n = 0; n < 16; n++) {
                double mag = fabs((double)C[m][n]);
                for (int k = 0; k < 32; k++) mag += fabs((double)f_of(A[m][k]) * f_of(B[k / 2][2 * n + k % 2]));
                total++;
                exact += memcmp(&emu[m][n], &real[m][n], 4) == 0;
                bad += fabs((double)emu[m][n] - real[m][n]) > mag * 0x1p-20;
            }
    }
    printf("TDPBF16PS: emulation equals the CPU bit for bit on %ld of %ld elements\n", exact, total);
    if (bad) {
        fprintf(stderr, "FAIL TDPBF16PS emulation differs from the CPU beyond rounding on %ld elements\n", bad);
        return 1;
    }
    return 0;
}
