/*
 * plan.cu - per-row plans made on the device (lampe_cuda_plan_rows), and the module's error
 * bookkeeping. One block per batch row scans its key_padding_mask (left pads, valid run) and one
 * thread then plans the row with lcu_plan_row (plan.cuh), so a mask that lives on the GPU never
 * has to be copied to the host.
 */
#include <limits.h>
#include <stdio.h>

#include "internal.cuh"

static thread_local char lcu_error_text[256];

int lcu_check_launch(void)
{
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return LAMPE_CUDA_OK;
    snprintf(lcu_error_text, sizeof(lcu_error_text), "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
    return LAMPE_CUDA_ERR_LAUNCH;
}

extern "C" const char *lampe_cuda_last_error(void) { return lcu_error_text; }

extern "C" const char *lampe_cuda_arch_list(void)
{
#ifdef LAMPE_CUDA_ARCHS
    return LAMPE_CUDA_ARCHS; /* set by build_cuda.py from TORCH_CUDA_ARCH_LIST */
#else
    return "unknown";
#endif
}

#define PLAN_THREADS 256

__global__ void __launch_bounds__(PLAN_THREADS) lcu_plan_kernel(const lampe_cuda_plan_params p)
{
    const int64_t b = p.first_row + blockIdx.x;
    const int64_t Lk = p.kv_len;
    __shared__ long long first, last;
    if (threadIdx.x == 0) {
        first = LLONG_MAX;
        last = -1;
    }
    __syncthreads();
    if (p.mask) {
        /* the valid run is [first True, last True]; the op trusts False* True* False* (the
         * Python API checks the pattern where it may synchronise) */
        long long f = LLONG_MAX, l = -1;
        const uint8_t *row = p.mask + b * p.mask_stride[0];
        for (int64_t j = threadIdx.x; j < Lk; j += PLAN_THREADS)
            if (row[j * p.mask_stride[1]]) {
                if (j < f) f = j;
                l = j;
            }
        if (f != LLONG_MAX) atomicMin(&first, f);
        if (l >= 0) atomicMax(&last, l);
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    lampe_cuda_seq s;
    if (p.mask) {
        s.key_offset = first == LLONG_MAX ? Lk : first;
        s.key_count = first == LLONG_MAX ? 0 : last - first + 1;
    } else {
        s.key_offset = 0;
        s.key_count = Lk;
    }
    const int64_t i = blockIdx.x;
    const int64_t qs = p.query_start[i];
    s.query_start = qs == INT64_MIN ? Lk - p.q_len - s.key_offset : qs;
    const int64_t pl = p.prompt_length[i];
    int64_t own = 0; /* 0: the default (all valid keys are prompt) */
    if (pl >= 0) {
        own = pl - s.key_offset;
        if (own < 1) own = -1; /* a prompt inside the pads: invalid when the row has keys */
    }
    lcu_plan_row(&p.cfg, own < 0 ? 0 : own, &s);
    if (own < 0 && s.key_count > 0 && p.cfg.kind != LAMPE_CUDA_CAUSAL) s.status = LAMPE_CUDA_ERR_ARG;
    p.seqs[b] = s;
}

extern "C" int lampe_cuda_plan_rows(const lampe_cuda_plan_params *p, cudaStream_t stream)
{
    if (!p || !p->seqs || p->rows < 0 || p->rows > LAMPE_CUDA_PLAN_ROWS || p->first_row < 0 ||
        p->first_row + p->rows > p->batch)
        return LAMPE_CUDA_ERR_ARG;
    if (p->rows == 0) return LAMPE_CUDA_OK;
    lcu_plan_kernel<<<(unsigned)p->rows, PLAN_THREADS, 0, stream>>>(*p);
    return lcu_check_launch();
}
