/*
 * C tests of the kernel levels (built and run by tests/c/run.sh under ASan + UBSan):
 *  - dispatch: names, the cap, the emulated test levels;
 *  - where the CPU has AVX-512: the VDPBF16PS / VCVTNE2PS2BF16 / TDPBF16PS emulations against
 *    scalar restatements of the SDM pseudo-code (test_isa_avx512.c);
 *  - where it has AVX512-BF16 (and AMX): the emulations against the real instructions, bit for
 *    bit (test_isa_avx512bf16.c, test_isa_amx.c). This file itself is built with baseline flags.
 */
#include <stdio.h>
#include <stdlib.h>

#include "lampe/lampe.h"

int test_isa_emulation(void);   /* test_isa_avx512.c     */
int test_isa_real_bf16(void);   /* test_isa_avx512bf16.c */
int test_isa_real_amx(void);    /* test_isa_amx.c        */

static int failures;
#define CHECK(cond, ...)                                                                                 \
    do {                                                                                                 \
        if (!(cond)) {                                                                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                         \
            fprintf(stderr, __VA_ARGS__);                                                                \
            fprintf(stderr, "\n");                                                                       \
            failures++;                                                                                  \
        }                                                                                                \
    } while (0)

static void test_names(void)
{
    for (int i = 0; i < LAMPE_ISA_ALL; i++) {
        const char *n = lampe_isa_name((lampe_isa)i);
        CHECK(lampe_isa_from_name(n) == i, "name round trip of %d (%s)", i, n);
    }
    CHECK(lampe_isa_from_name("AMX") == LAMPE_ISA_AMX, "case-insensitive");
    CHECK(lampe_isa_from_name("amx_emu") == -1 && lampe_isa_from_name("") == -1, "unknown names");
    CHECK(lampe_set_isa(LAMPE_ISA_ALL) == LAMPE_ERR_ARG && lampe_set_isa((lampe_isa)-1) == LAMPE_ERR_ARG, "bad levels");
}

static void test_cap(void)
{
    const uint32_t mask = lampe_isa_available_mask();
    CHECK(mask & 1u, "scalar is always available");
    CHECK(!(mask >> LAMPE_ISA_COUNT), "test levels are never listed available");
    /* the available levels form a prefix of the line */
    for (int i = 1; i < LAMPE_ISA_COUNT; i++)
        if (mask & (1u << i)) CHECK(mask & (1u << (i - 1)), "level %d available without level %d", i, i - 1);
    const int best = 31 - __builtin_clz(mask);
    for (int i = 0; i < LAMPE_ISA_COUNT; i++) {
        const int rc = lampe_set_isa((lampe_isa)i);
        if (mask & (1u << i))
            CHECK(rc == LAMPE_OK && (int)lampe_isa_current() == i, "select level %d", i);
        else
            CHECK(rc == LAMPE_ERR_UNSUPPORTED, "refuse level %d", i);
    }
    const int avx512 = (mask >> LAMPE_ISA_AVX512) & 1;
    for (int i = LAMPE_ISA_COUNT; i < LAMPE_ISA_ALL; i++) {
        const int rc = lampe_set_isa((lampe_isa)i);
        CHECK(rc == (avx512 ? LAMPE_OK : LAMPE_ERR_UNSUPPORTED), "test level %d: rc %d", i, rc);
        if (avx512) CHECK((int)lampe_isa_current() == i, "test level %d is current", i);
    }
    CHECK(lampe_set_isa((lampe_isa)best) == LAMPE_OK && (int)lampe_isa_current() == best, "back to the best level");
}

int main(void)
{
    test_names();
    test_cap();
    const uint32_t mask = lampe_isa_available_mask();
    int ran = 0;
    if (mask & (1u << LAMPE_ISA_AVX512)) {
        failures += test_isa_emulation();
        ran |= 1;
    }
    if (mask & (1u << LAMPE_ISA_AVX512BF16)) {
        failures += test_isa_real_bf16();
        ran |= 2;
    }
    if (mask & (1u << LAMPE_ISA_AMX)) {
        failures += test_isa_real_amx();
        ran |= 4;
    }
    if (failures) {
        fprintf(stderr, "ISA tests: %d failure(s)\n", failures);
        return 1;
    }
    printf("ISA tests: all checks passed (emulations %s, against VDPBF16PS %s, against TDPBF16PS %s)\n",
           ran & 1 ? "checked" : "skipped: no avx512", ran & 2 ? "checked" : "skipped: no avx512bf16",
           ran & 4 ? "checked" : "skipped: no amx");
    return 0;
}
