/*
 * Internal interfaces of the C core: the thread pool and the per-ISA kernel table. Not part of
 * the public contract (lampe.h); ISA translation units include this to export their table.
 */
#ifndef LAMPE_INTERNAL_H
#define LAMPE_INTERNAL_H

#include "lampe/lampe.h"

#define LAMPE_MAX_THREADS 256

/* Run fn(ctx, tid, n) on n threads (the caller is tid 0); returns when all have finished.
 * Work inside fn is claimed through atomics, so a busy pool degrades to fewer threads. */
typedef void (*lampe_task_fn)(void *ctx, int tid, int nthreads);
void lampe_parallel_run(int nthreads, lampe_task_fn fn, void *ctx);
int lampe_resolve_threads(int requested);

struct lampe_attn_work; /* defined in attention.h */

typedef struct lampe_kernels {
    lampe_isa isa;
    /* Rotate tokens [t0, t1) of every (batch, head) row; scratch: 32 * rotary_dim + head_dim floats. */
    void (*rope_tokens)(const lampe_rope_params *p, int64_t t0, int64_t t1, float *scratch);
    /* One attention work item (a query tile, or one key chunk of it). */
    void (*attn_item)(const struct lampe_attn_work *work, int64_t item, float *scratch);
    /* One block of the prefill panels (see attention.h); scratch holds 3 * head_dim floats. */
    void (*attn_pack)(const struct lampe_attn_work *work, int64_t item, float *scratch);
} lampe_kernels;

const lampe_kernels *lampe_kernels_active(void);

extern const lampe_kernels lampe_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
#define LAMPE_X86 1
extern const lampe_kernels lampe_kernels_avx2;
extern const lampe_kernels lampe_kernels_avx512;
extern const lampe_kernels lampe_kernels_avx512bf16;
#endif

#endif
