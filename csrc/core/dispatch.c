/*
 * Run-time CPU dispatch. Features come from CPUID *and* XGETBV: a CPU may report AVX-512 while
 * the OS has not enabled the zmm state, and then the instructions fault.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

#ifdef LAMPE_X86
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

static uint32_t detect(void)
{
    uint32_t mask = 1u << LAMPE_ISA_SCALAR;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return mask;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return mask; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return mask;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1;
    const int f512 = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if (avx2 && fma && f16c) mask |= 1u << LAMPE_ISA_AVX2;
    const int zmm_state = (xcr0 & 0xE6) == 0xE6; /* opmask, ZMM_Hi256, Hi16_ZMM */
    if ((mask & (1u << LAMPE_ISA_AVX2)) && zmm_state && f512 && dq && bw && vl) {
        mask |= 1u << LAMPE_ISA_AVX512;
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 5) & 1) mask |= 1u << LAMPE_ISA_AVX512BF16;
    }
    return mask;
}
#else
static uint32_t detect(void) { return 1u << LAMPE_ISA_SCALAR; }
#endif

static const char *const names[LAMPE_ISA_COUNT] = {"scalar", "avx2", "avx512", "avx512bf16"};

static uint32_t g_mask;
static int g_cap = -1; /* highest ISA allowed; -1 until initialised */

static void init(void)
{
    if (g_cap >= 0) return;
    g_mask = detect();
    int cap = LAMPE_ISA_COUNT - 1;
    const char *env = getenv("LAMPE_CPU_ISA");
    if (env && *env) {
        int want = lampe_isa_from_name(env);
        if (want >= 0) cap = want;
    }
    g_cap = cap;
}

uint32_t lampe_isa_available_mask(void)
{
    init();
    return g_mask;
}

lampe_isa lampe_isa_current(void)
{
    init();
    for (int i = g_cap; i > 0; i--)
        if (g_mask & (1u << i)) return (lampe_isa)i;
    return LAMPE_ISA_SCALAR;
}

int lampe_set_isa(lampe_isa isa)
{
    init();
    if ((int)isa < 0 || isa >= LAMPE_ISA_COUNT) return LAMPE_ERR_ARG;
    if (!(g_mask & (1u << isa))) return LAMPE_ERR_UNSUPPORTED;
    g_cap = isa;
    return LAMPE_OK;
}

const char *lampe_isa_name(lampe_isa isa)
{
    return ((int)isa >= 0 && isa < LAMPE_ISA_COUNT) ? names[isa] : "unknown";
}

int lampe_isa_from_name(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < LAMPE_ISA_COUNT; i++)
        if (!strcasecmp(name, names[i])) return i;
    return -1;
}

const lampe_kernels *lampe_kernels_active(void)
{
    switch (lampe_isa_current()) {
#ifdef LAMPE_X86
    case LAMPE_ISA_AVX512BF16: return &lampe_kernels_avx512bf16;
    case LAMPE_ISA_AVX512: return &lampe_kernels_avx512;
    case LAMPE_ISA_AVX2: return &lampe_kernels_avx2;
#endif
    default: return &lampe_kernels_scalar;
    }
}

int lampe_default_threads(void)
{
    const char *env = getenv("LAMPE_NUM_THREADS");
    if (env && *env) {
        long n = strtol(env, NULL, 10);
        if (n >= 1) return n > LAMPE_MAX_THREADS ? LAMPE_MAX_THREADS : (int)n;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n >= 1) return n > LAMPE_MAX_THREADS ? LAMPE_MAX_THREADS : n;
    }
    return 1;
}

int lampe_resolve_threads(int requested)
{
    if (requested <= 0) return lampe_default_threads();
    return requested > LAMPE_MAX_THREADS ? LAMPE_MAX_THREADS : requested;
}
