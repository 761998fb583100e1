/*
 * host_check.cpp - plan.cuh compiled for the host (g++, no CUDA), exported with C linkage for
 * tests/test_cuda_host.py, which loads it with ctypes and compares every mapped id, the plan
 * fields and the regions of every row with lampe.plan (the C planner). The kernels use these
 * very functions on the device, so what this checks is what they compute.
 */
#include "plan.cuh"

extern "C" {

/* plan_out: length, mapping_length, sink_size, bias_map, bias_sink, fallback, status */
int lcu_host_plan(int kind, int64_t window, int64_t sink, int64_t mapping_length, const double *sig,
                  int64_t key_offset, int64_t key_count, int64_t query_start, int64_t prompt_own, int64_t *plan_out,
                  int64_t *mapped_out, int64_t n_mapped, const int64_t *positions, int64_t npos, int64_t *regions_out)
{
    lampe_cuda_cfg c{};
    c.kind = kind;
    c.window = window;
    c.sink = sink;
    c.mapping_length = mapping_length;
    if (sig) {
        c.sig_a = sig[0];
        c.sig_b = sig[1];
        c.sig_lmax = sig[2];
        c.sig_threshold = (int64_t)sig[3];
        c.sig_below = (int64_t)sig[4];
    }
    lampe_cuda_seq s{};
    s.key_offset = key_offset;
    s.key_count = key_count;
    s.query_start = query_start;
    lcu_plan_row(&c, prompt_own, &s);
    const int64_t f[7] = {s.length, s.mapping_length, s.sink_size, s.bias_map, s.bias_sink, s.fallback, s.status};
    for (int i = 0; i < 7; i++) plan_out[i] = f[i];
    for (int64_t p = 0; p < n_mapped; p++) mapped_out[p] = lcu_mapped_id(&s, p);
    for (int64_t i = 0; i < npos; i++) {
        lcu_region r[LCU_SLOTS];
        const int n = lcu_row_regions(&s, positions[i], r);
        int64_t *o = regions_out + i * LCU_SLOTS * 6;
        for (int k = 0; k < LCU_SLOTS; k++) {
            int64_t *e = o + k * 6;
            if (k < n) {
                e[0] = r[k].slot;
                e[1] = r[k].mapped;
                e[2] = r[k].lo;
                e[3] = r[k].hi;
                e[4] = r[k].qpos;
                e[5] = r[k].shift;
            } else {
                e[0] = -1;
                e[1] = e[2] = e[3] = e[4] = e[5] = 0;
            }
        }
    }
    return 0;
}

int lcu_host_is_decode(int kind, int64_t window, int64_t sink, int64_t mapping_length, int64_t key_count,
                       int64_t prompt_own, int64_t pos, int all_decode)
{
    lampe_cuda_cfg c{};
    c.kind = kind;
    c.window = window;
    c.sink = sink;
    c.mapping_length = mapping_length;
    lampe_cuda_seq s{};
    s.key_count = key_count;
    lcu_plan_row(&c, prompt_own, &s);
    return lcu_row_is_decode(&s, pos, all_decode);
}

float lcu_host_angle(int64_t pos, float inv_freq) { return lcu_angle(pos, inv_freq); }
}
