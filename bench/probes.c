/* Machine-ceiling probes for the benchmarks: peak fp32 FMA throughput (SSE, AVX2, AVX-512), peak
 * bf16 dot-product throughput (VDPBF16PS), peak AMX tile throughput (TDPBF16PS) and streaming
 * read bandwidth, each on one thread or on several pinned threads at once.
 *
 * Built by bench/_probes.py with plain `-O2 -shared -fPIC`: the ISA-specific loops carry their own
 * target attributes, so the library loads on any x86-64 CPU and Python only calls a loop after
 * probe_has_isa() said the CPU (and the OS, through XGETBV, which __builtin_cpu_supports checks)
 * supports it.
 *
 * Every loop returns a value derived from its accumulators so the compiler cannot delete it, and
 * times itself with CLOCK_MONOTONIC so that the Python call overhead stays out of the measurement.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* AMX needs GCC >= 11 / clang >= 12 (the intrinsics) and, on Linux, the process's permission for
 * the tile data state; without either the AMX probe reports itself unavailable. */
#if defined(__has_include)
#if __has_include(<amxtileintrin.h>) && __has_include(<amxbf16intrin.h>)
#define PROBE_HAVE_AMX 1
#endif
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Probe kinds, shared with _probes.py. */
enum { K_FMA_AVX2 = 0, K_FMA_AVX512 = 1, K_BF16_DOT = 2, K_READ_AVX2 = 3, K_READ_AVX512 = 4, K_FMA_SSE = 5,
       K_AMX_BF16 = 6 };

/* CPUID AMX-TILE + AMX-BF16, XCR0 tile state, and (Linux) the permission for the tile data. */
static int amx_usable(void) {
#ifdef PROBE_HAVE_AMX
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return 0;
#ifdef __linux__
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return 0;
    return 1;
#else
    return 0;
#endif
#else
    return 0;
#endif
}

int probe_has_isa(const char *name) {
    __builtin_cpu_init();
    if (!strcmp(name, "sse")) return 1; /* baseline of x86-64 */
    if (!strcmp(name, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(name, "avx512")) return __builtin_cpu_supports("avx512f");
    if (!strcmp(name, "avx512bf16"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    if (!strcmp(name, "amx")) {
        static int cached = -1;
        if (cached < 0) cached = amx_usable();
        return cached;
    }
    return 0;
}

/* ------------------------------------------------------------------ compute probes
 * 12 independent accumulator chains: FMA latency (4-5 cycles) x FMA ports (2) needs at least 8-10
 * chains in flight to keep every port busy; 12 covers every current x86 core without spilling
 * (12 of the 16 ymm / 32 zmm registers). The multiplier is close to 1 so nothing overflows or
 * becomes denormal (denormals would hit a microcode slow path). */

#define CHAINS12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)

static double fma_sse(int64_t iters) {
    /* SSE has no FMA: a mul + add pair per lane is the scalar-path ceiling (2 FLOP per lane). */
    __m128 a = _mm_set1_ps(0.999999f), b = _mm_set1_ps(1e-7f);
#define DECL(i) __m128 x##i = _mm_set1_ps(1.0f + 0.01f * (i));
    CHAINS12(DECL)
#undef DECL
    for (int64_t n = 0; n < iters; n++) {
#define STEP(i) x##i = _mm_add_ps(_mm_mul_ps(x##i, a), b);
        CHAINS12(STEP)
#undef STEP
    }
    __m128 s = _mm_setzero_ps();
#define SUM(i) s = _mm_add_ps(s, x##i);
    CHAINS12(SUM)
#undef SUM
    float o[4];
    _mm_storeu_ps(o, s);
    return o[0] + o[1] + o[2] + o[3];
}

__attribute__((target("avx2,fma"))) static double fma_avx2(int64_t iters) {
    __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
#define DECL(i) __m256 x##i = _mm256_set1_ps(1.0f + 0.01f * (i));
    CHAINS12(DECL)
#undef DECL
    for (int64_t n = 0; n < iters; n++) {
#define STEP(i) x##i = _mm256_fmadd_ps(x##i, a, b);
        CHAINS12(STEP)
#undef STEP
    }
    __m256 s = _mm256_setzero_ps();
#define SUM(i) s = _mm256_add_ps(s, x##i);
    CHAINS12(SUM)
#undef SUM
    float o[8];
    _mm256_storeu_ps(o, s);
    double r = 0;
    for (int i = 0; i < 8; i++) r += o[i];
    return r;
}

__attribute__((target("avx512f"))) static double fma_avx512(int64_t iters) {
    __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
#define DECL(i) __m512 x##i = _mm512_set1_ps(1.0f + 0.01f * (i));
    CHAINS12(DECL)
#undef DECL
    for (int64_t n = 0; n < iters; n++) {
#define STEP(i) x##i = _mm512_fmadd_ps(x##i, a, b);
        CHAINS12(STEP)
#undef STEP
    }
    __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, x##i);
    CHAINS12(SUM)
#undef SUM
    return (double)_mm512_reduce_add_ps(s);
}

/* One VDPBF16PS does 32 bf16 products accumulated pairwise into 16 fp32 lanes: 64 FLOP. The
 * bf16 operands are tiny so the fp32 accumulators grow slowly and never overflow. */
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) static double bf16_dot(int64_t iters) {
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3380); /* bf16 ~6e-8 */
    __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);
#define DECL(i) __m512 x##i = _mm512_set1_ps(1.0f + 0.01f * (i));
    CHAINS12(DECL)
#undef DECL
    for (int64_t n = 0; n < iters; n++) {
#define STEP(i) x##i = _mm512_dpbf16_ps(x##i, a, b);
        CHAINS12(STEP)
#undef STEP
    }
    __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, x##i);
    CHAINS12(SUM)
#undef SUM
    return (double)_mm512_reduce_add_ps(s);
}

/* TDPBF16PS on 4 independent 16 x 16 accumulator tiles from two A and two B tiles that stay put
 * (data in registers, as the ceiling of the tile unit itself): each instruction is
 * 16 x 16 x 32 multiply-adds = 16384 FLOP. */
#ifdef PROBE_HAVE_AMX
__attribute__((target("amx-tile,amx-bf16"))) static double amx_bf16(int64_t iters) {
    struct __attribute__((aligned(64))) {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    static uint16_t src[16 * 32] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 32; i++) src[i] = 0x3380; /* bf16 ~6e-8: accumulators never overflow */
    float out[16 * 16] __attribute__((aligned(64)));
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, src, 64);
    _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64);
    _tile_loadd(7, src, 64);
    for (int64_t n = 0; n < iters; n++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    _tile_release();
    return (double)out[0];
}
#else
static double amx_bf16(int64_t iters) {
    (void)iters;
    return 0;
}
#endif

/* FLOP per loop iteration of each compute probe (12 chains x lanes x FLOP per lane). */
double probe_flop_per_iter(int kind) {
    switch (kind) {
    case K_FMA_SSE: return 12.0 * 4 * 2;
    case K_FMA_AVX2: return 12.0 * 8 * 2;
    case K_FMA_AVX512: return 12.0 * 16 * 2;
    case K_BF16_DOT: return 12.0 * 16 * 4;
    case K_AMX_BF16: return 4.0 * 16 * 16 * 32 * 2;
    default: return 0;
    }
}

/* ------------------------------------------------------------------ streaming read
 * Sum of a buffer much larger than the last-level cache. Eight accumulators hide the add latency
 * so the loop is limited by loads from DRAM, not by the dependency chain; the loads are unaligned
 * loads of (in practice) aligned data, which costs nothing on current cores. */

__attribute__((target("avx2,fma"))) static double read_avx2(const float *p, int64_t n, int64_t reps) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int64_t r = 0; r < reps; r++) {
        for (int64_t i = 0; i + 64 <= n; i += 64) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + i + 24));
            s4 = _mm256_add_ps(s4, _mm256_loadu_ps(p + i + 32));
            s5 = _mm256_add_ps(s5, _mm256_loadu_ps(p + i + 40));
            s6 = _mm256_add_ps(s6, _mm256_loadu_ps(p + i + 48));
            s7 = _mm256_add_ps(s7, _mm256_loadu_ps(p + i + 56));
        }
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)),
                             _mm256_add_ps(_mm256_add_ps(s4, s5), _mm256_add_ps(s6, s7)));
    float o[8];
    _mm256_storeu_ps(o, s);
    double r = 0;
    for (int i = 0; i < 8; i++) r += o[i];
    return r;
}

__attribute__((target("avx512f"))) static double read_avx512(const float *p, int64_t n, int64_t reps) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int64_t r = 0; r < reps; r++) {
        for (int64_t i = 0; i + 128 <= n; i += 128) {
            s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
            s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
            s4 = _mm512_add_ps(s4, _mm512_loadu_ps(p + i + 64));
            s5 = _mm512_add_ps(s5, _mm512_loadu_ps(p + i + 80));
            s6 = _mm512_add_ps(s6, _mm512_loadu_ps(p + i + 96));
            s7 = _mm512_add_ps(s7, _mm512_loadu_ps(p + i + 112));
        }
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)),
                             _mm512_add_ps(_mm512_add_ps(s4, s5), _mm512_add_ps(s6, s7)));
    return (double)_mm512_reduce_add_ps(s);
}

/* ------------------------------------------------------------------ threads
 * Every thread pins itself to its own CPU, then waits for a common start signal; the aggregate
 * rate is total work / (last finish - common start), i.e. what the machine sustains with all of
 * them busy, not a sum of rates measured at different times. The start signal is a flag rather
 * than a barrier so that a failed pthread_create can still release the threads already waiting. */

typedef struct {
    int kind;
    int cpu;
    int64_t iters;        /* compute probes: loop iterations; read probes: passes over the slice */
    const float *buf;     /* read probes: this thread's slice */
    int64_t nfloats;
    volatile int *go;     /* 0: wait, 1: run, -1: abandon */
    int *ready;
    double t_end;
    double sink;
    int pin_failed;
} job_t;

static double run_kind(int kind, int64_t iters, const float *buf, int64_t n) {
    switch (kind) {
    case K_FMA_SSE: return fma_sse(iters);
    case K_FMA_AVX2: return fma_avx2(iters);
    case K_FMA_AVX512: return fma_avx512(iters);
    case K_BF16_DOT: return bf16_dot(iters);
    case K_AMX_BF16: return amx_bf16(iters);
    case K_READ_AVX2: return read_avx2(buf, n, iters);
    case K_READ_AVX512: return read_avx512(buf, n, iters);
    default: return 0;
    }
}

static void *worker(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(j->cpu, &set);
        j->pin_failed = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0;
    }
    __atomic_add_fetch(j->ready, 1, __ATOMIC_SEQ_CST);
    int g;
    /* Yield while waiting: the waiting thread may share a CPU with the thread creating the rest. */
    while ((g = __atomic_load_n(j->go, __ATOMIC_ACQUIRE)) == 0) sched_yield();
    if (g < 0) return NULL;
    j->sink = run_kind(j->kind, j->iters, j->buf, j->nfloats);
    j->t_end = now_s();
    return NULL;
}

/* Runs probe `kind` on nthreads threads pinned to cpus[0..nthreads-1] (cpus may be NULL: no
 * pinning). Read probes split buf[0..nfloats) into equal contiguous slices, one per thread.
 * Returns the wall time in seconds from the common start to the last finish, or a negative
 * value on error (-1: allocation or thread creation failed, -2: pinning refused). */
double probe_run(int kind, int nthreads, const int *cpus, int64_t iters, const float *buf, int64_t nfloats,
                 double *sink_out) {
    if (nthreads < 1 || nthreads > 1024) return -1;
    job_t *jobs = (job_t *)calloc((size_t)nthreads, sizeof(job_t));
    pthread_t *tids = (pthread_t *)calloc((size_t)nthreads, sizeof(pthread_t));
    if (!jobs || !tids) {
        free(jobs);
        free(tids);
        return -1;
    }
    volatile int go = 0;
    int ready = 0;
    int64_t slice = (nfloats / nthreads) & ~(int64_t)127; /* whole 512-byte blocks per thread */
    int created = 0;
    for (int t = 0; t < nthreads; t++) {
        jobs[t].kind = kind;
        jobs[t].cpu = cpus ? cpus[t] : -1;
        jobs[t].iters = iters;
        jobs[t].buf = buf ? buf + (int64_t)t * slice : NULL;
        jobs[t].nfloats = slice;
        jobs[t].go = &go;
        jobs[t].ready = &ready;
        if (pthread_create(&tids[t], NULL, worker, &jobs[t]) != 0) break;
        created++;
    }
    if (created == nthreads)
        while (__atomic_load_n(&ready, __ATOMIC_ACQUIRE) < nthreads) sched_yield();
    double t0 = now_s(), t1 = t0, sink = 0;
    __atomic_store_n(&go, created == nthreads ? 1 : -1, __ATOMIC_RELEASE);
    int pin_failed = 0;
    for (int t = 0; t < created; t++) {
        pthread_join(tids[t], NULL);
        if (jobs[t].t_end > t1) t1 = jobs[t].t_end;
        sink += jobs[t].sink;
        pin_failed |= jobs[t].pin_failed;
    }
    free(jobs);
    free(tids);
    if (sink_out) *sink_out = sink;
    if (created != nthreads) return -1;
    return pin_failed ? -2 : t1 - t0;
}
