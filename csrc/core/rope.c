/* Driver of the rotary kernel: validation, threading over token ranges. */
#include <stdlib.h>

#include "internal.h"

typedef struct {
    const lampe_rope_params *p;
    const lampe_kernels *k;
    int64_t chunk;
    int failed;
} rope_job;

static void rope_task(void *ctx, int tid, int nth)
{
    rope_job *job = (rope_job *)ctx;
    const lampe_rope_params *p = job->p;
    /* cos and sin of 32 tokens (see rope_impl.h) and one row */
    float *scratch = (float *)malloc((size_t)(32 * p->rotary_dim + p->head_dim + 16) * sizeof(float));
    if (!scratch) {
        job->failed = 1;
        return;
    }
    /* Static split in whole chunks of 32 tokens: every token costs the same. */
    const int64_t per = ((p->tokens + nth - 1) / nth + 31) / 32 * 32;
    const int64_t t0 = per * tid, t1 = t0 + per < p->tokens ? t0 + per : p->tokens;
    if (t0 < t1) job->k->rope_tokens(p, t0, t1, scratch);
    free(scratch);
}

int lampe_rope(const lampe_rope_params *p)
{
    if (!p || !p->src || !p->dst || !p->positions) return LAMPE_ERR_ARG;
    if (p->dtype < LAMPE_F32 || p->dtype > LAMPE_F16) return LAMPE_ERR_ARG;
    if (p->batch < 0 || p->heads < 0 || p->tokens < 0 || p->head_dim < 1) return LAMPE_ERR_ARG;
    if (p->rotary_dim < 0 || p->rotary_dim > p->head_dim || p->rotary_dim % 2) return LAMPE_ERR_ARG;
    if (p->rotary_dim > 0 && !p->inv_freq) return LAMPE_ERR_ARG;
    if (p->layout != LAMPE_LAYOUT_HALF && p->layout != LAMPE_LAYOUT_INTERLEAVED) return LAMPE_ERR_ARG;
    if (p->batch == 0 || p->heads == 0 || p->tokens == 0) return LAMPE_OK;
    rope_job job = {p, lampe_kernels_active(), 0, 0};
    int nth = lampe_resolve_threads(p->num_threads);
    /* Below ~16K elements threads cost more than they save. */
    const int64_t work = p->batch * p->heads * p->tokens * p->head_dim;
    if (work < (1 << 14)) nth = 1;
    if (nth > p->tokens) nth = (int)p->tokens;
    lampe_parallel_run(nth, rope_task, &job);
    return job.failed ? LAMPE_ERR_NOMEM : LAMPE_OK;
}
