/*
 * Run-time CPU dispatch. Features come from CPUID *and* XGETBV: a CPU may report AVX-512 while
 * the OS has not enabled the zmm state, and then the instructions fault. AMX additionally needs
 * the OS to manage the tile state (XCR0 bits 17-18) and, on Linux, a per-process permission for
 * the 8 KB tile data (arch_prctl ARCH_REQ_XCOMP_PERM), asked for once here; when it is refused
 * the amx level is simply unavailable and the best other level runs.
 *
 * Levels form a line (scalar < avx2 < avx512 < avx512bf16 < amx): every CPU with a level has the
 * features of the lower ones (Zen 4/5 stop at avx512bf16, Sapphire Rapids reaches amx). The cap
 * (LAMPE_CPU_ISA, lampe_set_isa) picks the best available level not above it. The two emulated
 * test levels sit outside the line and are only ever selected by name.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

#ifdef LAMPE_X86
#include <cpuid.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* The kernel tables of the levels added after internal.h's list (defined in csrc/cpu). A
 * compiler without -mavx512bf16 / -mamx-* builds without those units (setup.py defines
 * LAMPE_WITHOUT_*): their levels are then never available. */
extern const lampe_kernels lampe_kernels_amx;
extern const lampe_kernels lampe_kernels_avx512bf16_emu;
extern const lampe_kernels lampe_kernels_amx_emu;
#ifdef LAMPE_WITHOUT_AVX512BF16
#define LAMPE_WITHOUT_AMX 1
#endif

static uint64_t xgetbv0(void)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* Linux: ask for the AMX tile data state (XFEATURE_XTILEDATA = 18) and confirm it is granted.
 * Elsewhere AMX is not used. */
static int amx_permitted(void)
{
#ifdef __linux__
    enum { ARCH_GET_XCOMP_PERM_ = 0x1022, ARCH_REQ_XCOMP_PERM_ = 0x1023, XFEATURE_XTILEDATA_ = 18 };
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM_, XFEATURE_XTILEDATA_) != 0) return 0;
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM_, &granted) != 0) return 0;
    return (int)((granted >> XFEATURE_XTILEDATA_) & 1);
#else
    return 0;
#endif
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
    const int amx_tile = (d >> 24) & 1, amx_bf16 = (d >> 22) & 1;
    const int tile_state = ((xcr0 >> 17) & 3) == 3; /* XTILECFG and XTILEDATA */
    if ((mask & (1u << LAMPE_ISA_AVX2)) && zmm_state && f512 && dq && bw && vl) {
        mask |= 1u << LAMPE_ISA_AVX512;
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 5) & 1) {
#ifndef LAMPE_WITHOUT_AVX512BF16
            mask |= 1u << LAMPE_ISA_AVX512BF16;
#endif
#ifndef LAMPE_WITHOUT_AMX
            if (amx_tile && amx_bf16 && tile_state && amx_permitted()) mask |= 1u << LAMPE_ISA_AMX;
#else
            (void)amx_tile, (void)amx_bf16, (void)tile_state, (void)amx_permitted;
#endif
        }
    }
    return mask;
}
#else
static uint32_t detect(void) { return 1u << LAMPE_ISA_SCALAR; }
#endif

static const char *const names[LAMPE_ISA_ALL] = {"scalar", "avx2", "avx512", "avx512bf16", "amx",
                                                  "avx512bf16-emu", "amx-emu"};

static uint32_t g_mask;
static int g_cap = -1; /* highest level allowed, or a test level; -1 until initialised */

static int is_test_level(int isa) { return isa >= LAMPE_ISA_COUNT && isa < LAMPE_ISA_ALL; }

/* A test level runs the AVX-512 instructions its emulation is made of. */
static int test_level_ok(void) { return (g_mask >> LAMPE_ISA_AVX512) & 1; }

static void init(void)
{
    if (g_cap >= 0) return;
    g_mask = detect();
    int cap = LAMPE_ISA_COUNT - 1;
    const char *env = getenv("LAMPE_CPU_ISA");
    if (env && *env) {
        int want = lampe_isa_from_name(env);
        if (want >= 0 && (!is_test_level(want) || test_level_ok())) cap = want;
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
    if (is_test_level(g_cap)) return (lampe_isa)g_cap;
    for (int i = g_cap; i > 0; i--)
        if (g_mask & (1u << i)) return (lampe_isa)i;
    return LAMPE_ISA_SCALAR;
}

int lampe_set_isa(lampe_isa isa)
{
    init();
    if ((int)isa < 0 || isa >= LAMPE_ISA_ALL) return LAMPE_ERR_ARG;
    if (is_test_level(isa) ? !test_level_ok() : !(g_mask & (1u << isa))) return LAMPE_ERR_UNSUPPORTED;
    g_cap = isa;
    return LAMPE_OK;
}

const char *lampe_isa_name(lampe_isa isa)
{
    return ((int)isa >= 0 && isa < LAMPE_ISA_ALL) ? names[isa] : "unknown";
}

int lampe_isa_from_name(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < LAMPE_ISA_ALL; i++)
        if (!strcasecmp(name, names[i])) return i;
    return -1;
}

const lampe_kernels *lampe_kernels_active(void)
{
    switch (lampe_isa_current()) {
#ifdef LAMPE_X86
    case LAMPE_ISA_AMX_EMU: return &lampe_kernels_amx_emu;
    case LAMPE_ISA_AVX512BF16_EMU: return &lampe_kernels_avx512bf16_emu;
#ifndef LAMPE_WITHOUT_AMX
    case LAMPE_ISA_AMX: return &lampe_kernels_amx;
#endif
#ifndef LAMPE_WITHOUT_AVX512BF16
    case LAMPE_ISA_AVX512BF16: return &lampe_kernels_avx512bf16;
#endif
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
