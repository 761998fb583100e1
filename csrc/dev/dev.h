/*
 * Harness of the kernel workbench (csrc/dev): timing, pinning, inputs, a float64 reference and
 * the correctness check every version passes before it is timed. Plain C11 + POSIX; included by
 * the numbered workbench programs only, never by the package.
 */
#ifndef LAMPE_DEV_H
#define LAMPE_DEV_H

#define _GNU_SOURCE
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The command line every workbench program takes: L G REPS VERSION[/SKIP] ... (at most maxv
 * variants, versions 1..nversions). Returns the number of variants, or -1 after printing why. */
static inline int dev_args(int argc, char **argv, int nversions, int maxv, int64_t *L, int64_t *G, int *reps,
                           int *ver, int *skp)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s L G REPS VERSION[/SKIP] ...   (variants are timed round-robin)\n", argv[0]);
        return -1;
    }
    *L = atoll(argv[1]);
    *G = atoll(argv[2]);
    *reps = atoi(argv[3]);
    int nv = 0;
    for (int i = 4; i < argc && nv < maxv; i++, nv++) {
        ver[nv] = atoi(argv[i]);
        const char *sl = strchr(argv[i], '/');
        skp[nv] = sl ? atoi(sl + 1) : 0;
        if (ver[nv] < 1 || ver[nv] > nversions) {
            fprintf(stderr, "unknown version %d\n", ver[nv]);
            return -1;
        }
    }
    return nv;
}

static inline double dev_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of the calling thread: on a shared machine the time other processes hold our CPU is
 * not counted, which wall time would (the workbench compares variants, not end-to-end latency). */
static inline double dev_cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Pin the calling thread to one CPU (the workbench is single-threaded: per-core rates). */
static inline void dev_pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) perror("sched_setaffinity");
}

#include <sys/mman.h>

/* 64-byte aligned, zeroed; buffers of 2 MB and more are 2 MB aligned and offered to the kernel
 * as transparent huge pages when DEV_HUGE=1 (fewer TLB misses on the key/value panels). */
static inline void *dev_alloc(size_t bytes)
{
    const int huge = bytes >= (2u << 20) && getenv("DEV_HUGE") && atoi(getenv("DEV_HUGE"));
    const size_t al = huge ? (2u << 20) : 64;
    void *p = aligned_alloc(al, (bytes + al - 1) / al * al);
#ifdef MADV_HUGEPAGE
    if (p && huge) madvise(p, (bytes + al - 1) / al * al, MADV_HUGEPAGE);
#endif
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    memset(p, 0, (bytes + al - 1) / al * al);
    return p;
}

/* xorshift64* -> standard normal by Box-Muller: reproducible inputs without libc rand. */
static inline double dev_uniform(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return ((*s * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
}

static inline double dev_normal(uint64_t *s)
{
    const double u = dev_uniform(s) + 1e-300, v = dev_uniform(s);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static int dev_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of n timings (sorts in place). */
static inline double dev_median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof(double), dev_cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* fp32 FMA ceiling of this core in GFLOP/s (thread CPU time, best of 5): 12 independent chains
 * of the widest vector this unit is compiled for, as bench/probes.c does. */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
static inline double dev_fma_peak(void)
{
#if defined(__AVX512F__)
    typedef __m512 pv;
#define PV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PV_SET(x) _mm512_set1_ps(x)
#define PV_LANES 16
#elif defined(__AVX2__)
    typedef __m256 pv;
#define PV_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PV_SET(x) _mm256_set1_ps(x)
#define PV_LANES 8
#else
    return 0.0;
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    const int64_t iters = 20000000;
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        pv x[12];
        pv a = PV_SET(0.999999f), b = PV_SET(1e-7f);
        /* opaque to the optimiser: a and b stay in registers instead of becoming memory operands
         * (12 loads per 12 FMAs would make this a load-port probe) */
        __asm__("" : "+v"(a), "+v"(b));
        for (int i = 0; i < 12; i++) x[i] = PV_SET(1.0f + 0.01f * (float)i);
        const double t0 = dev_cpu_now();
        for (int64_t n = 0; n < iters; n++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) x[i] = PV_FMA(x[i], a, b);
        }
        const double t = dev_cpu_now() - t0;
        float sink[PV_LANES];
        memcpy(sink, &x[0], sizeof(sink));
        for (int i = 1; i < 12; i++) {
            float o[PV_LANES];
            memcpy(o, &x[i], sizeof(o));
            sink[0] += o[0];
        }
        if (sink[0] == 12345.0f) puts("");
        const double r = 12.0 * PV_LANES * 2.0 * (double)iters / t / 1e9;
        if (r > best) best = r;
    }
    return best;
#undef PV_FMA
#undef PV_SET
#undef PV_LANES
#endif
}

#endif
