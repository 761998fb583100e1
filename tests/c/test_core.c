/*
 * Standalone C tests of the core (no Python): planner against docs/spec.md, mapping length,
 * rotary kernel and fused attention against naive double-precision code, conversions, exp2,
 * thread pool and dispatch. Built and run under ASan/UBSan by tests/c/run.sh.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../csrc/core/internal.h"
#include "../../csrc/cpu/convert.h"

static int failures = 0;
#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) /* xorshift64*: fresh but reproducible inputs */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static void test_plan_config_a(void)
{
    /* docs/spec.md §6, config A: L=20, H=4, T=2, U=10 */
    const int64_t want_m[20] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 10};
    int64_t m[20];
    lampe_plan p;
    CHECK(lampe_plan_make(&p, 20, 4, 2, 10, 0, 0, m) == LAMPE_OK, "plan A");
    CHECK(memcmp(m, want_m, sizeof m) == 0, "mapped ids of config A");
    CHECK(p.sink_size == 3 && p.bias_map == 1 && p.bias_sink == 7 && !p.fallback, "R=%lld b1=%lld b2=%lld",
          (long long)p.sink_size, (long long)p.bias_map, (long long)p.bias_sink);
    lampe_region r[3];
    int n;
    /* row 19 | H j=15..19 q=19 | M j=2..15 q=11 | T j=0..2 q=12 */
    CHECK(lampe_plan_regions(&p, 19, r, &n) == LAMPE_OK && n == 3, "row 19");
    CHECK(r[0].kind == LAMPE_REGION_LOCAL && r[0].key_lo == 15 && r[0].key_hi == 19 && r[0].qpos == 19, "19 local");
    CHECK(r[1].kind == LAMPE_REGION_MAP && r[1].key_lo == 2 && r[1].key_hi == 15 && r[1].qpos == 11 && r[1].mapped, "19 map");
    CHECK(r[2].kind == LAMPE_REGION_SINK && r[2].key_lo == 0 && r[2].key_hi == 2 && r[2].qpos == 12, "19 sink");
    /* shifted decode D=5: 24 | H j=21..24 q=24 | M j=8..20 q=11 (m[j-5]) | T j=0..7 q=17 */
    CHECK(lampe_plan_regions(&p, 24, r, &n) == LAMPE_OK && n == 3, "row 24");
    CHECK(r[1].key_lo == 8 && r[1].key_hi == 20 && r[1].qpos == 11 && r[1].shift == 5, "24 map");
    CHECK(r[2].key_hi == 7 && r[2].qpos == 17, "24 sink");
    /* the authors' decode refuses step 5 > H */
    p.decode = LAMPE_DECODE_AUTHORS;
    CHECK(lampe_plan_regions(&p, 24, r, &n) == LAMPE_ERR_DECODE_RANGE, "authors decode beyond H");
    CHECK(lampe_plan_regions(&p, 23, r, &n) == LAMPE_OK && r[1].shift == 0, "authors decode step 4");
}

static void test_plan_errors(void)
{
    int64_t m[32];
    lampe_plan p;
    CHECK(lampe_plan_make(&p, 20, 4, 16, 10, 0, 0, m) == LAMPE_ERR_SINK, "R=17 > L-H");
    CHECK(lampe_plan_make(&p, 20, 4, 0, 10, 0, 0, m) == LAMPE_ERR_ARG, "sink=0");
    CHECK(lampe_plan_make(&p, 0, 4, 2, 10, 0, 0, m) == LAMPE_ERR_ARG, "L=0");
    CHECK(lampe_plan_make(&p, 20, 4, 2, 10, 7, 0, m) == LAMPE_ERR_ARG, "bad mode");
    CHECK(lampe_plan_make(&p, 7, 4, 2, 3, 0, 0, m) == LAMPE_OK && p.fallback && p.sink_size == 3 &&
              p.bias_map == 1 && p.bias_sink == 1, "config C fallback");
    CHECK(lampe_plan_make(&p, 5, 4, 30, 3, 0, 0, m) == LAMPE_OK && p.fallback, "fallback with a huge sink");
    CHECK(lampe_plan_make(&p, 5, INT64_MAX, 30, 3, 0, 0, m) == LAMPE_ERR_LENGTH, "no overflow with a huge window");
    int64_t *big = malloc(sizeof(int64_t) * 4);
    CHECK(lampe_plan_make(&p, LAMPE_MAX_LENGTH + 1, 4, 2, 10, 0, 0, big) == LAMPE_ERR_LENGTH, "L > 2^24");
    free(big);
}

static void test_mapping_recipe(void)
{
    const int64_t L = 16384;
    int64_t *m = malloc(sizeof(int64_t) * L);
    CHECK(lampe_mapped_ids(L, 1993, m) == LAMPE_OK, "ids");
    CHECK(m[L - 1] == 1992, "float32 recipe gives 1992, got %lld", (long long)m[L - 1]);
    int64_t nd = 0;
    for (int64_t p = 0; p < L; p++) {
        const int64_t exact = p * 1993 / (L - 1);
        nd += m[p] != exact;
        CHECK(llabs(m[p] - exact) <= 1, "p=%lld", (long long)p);
        if (p) CHECK(m[p] >= m[p - 1], "non-decreasing");
    }
    CHECK(nd == 1, "one index differs from the rational map, got %lld", (long long)nd);
    free(m);
}

static void test_sigmoid(void)
{
    /* docs/spec.md §4 */
    const char *names[4] = {"llama2", "llama3", "mistral", "llama3.1"};
    const int64_t lens[4] = {8191, 8192, 32768, 131072};
    const int64_t want[4][4] = {{1536, 1283, 2239, 2489}, {1536, 1036, 4501, 6204}, {1536, 4104, 17829, 24575},
                                {6728, 6728, 17468, 78864}};
    for (int i = 0; i < 4; i++) {
        lampe_sigmoid s;
        CHECK(lampe_sigmoid_preset(names[i], &s) == LAMPE_OK, "%s", names[i]);
        for (int j = 0; j < 4; j++)
            CHECK(lampe_sigmoid_eval(&s, lens[j]) == want[i][j], "%s at %lld: %lld", names[i], (long long)lens[j],
                  (long long)lampe_sigmoid_eval(&s, lens[j]));
    }
    lampe_sigmoid s;
    CHECK(lampe_sigmoid_preset("llama9", &s) == LAMPE_ERR_ARG, "unknown preset");
    CHECK(lampe_sigmoid_generic(8, &s) == LAMPE_ERR_ARG, "tiny window");
}

static void test_conversions(void)
{
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = lampe_f16_to_f32((uint16_t)h);
        if (f != f) continue; /* NaN payloads need not survive */
        CHECK(lampe_f32_to_f16(f) == h, "f16 round trip %04x", h);
        const float g = lampe_bf16_to_f32((uint16_t)h);
        if (g == g) CHECK(lampe_f32_to_bf16(g) == h, "bf16 round trip %04x", h);
    }
    CHECK(lampe_f32_to_bf16(1.00390625f) == 0x3f80, "ties to even (down)");
    CHECK(lampe_f32_to_bf16(1.01171875f) == 0x3f82, "ties to even (up)");
    CHECK(lampe_f32_to_f16(65520.0f) == 0x7c00, "overflow to inf");
    CHECK(lampe_f32_to_f16(1e-8f) == 0x0000, "underflow to zero");
    CHECK(lampe_f32_to_f16(5.9604645e-08f) == 0x0001, "smallest subnormal");
}

static void test_rope_all_isas(void)
{
    enum { B = 2, H = 3, T = 11, D = 20, RD = 16 };
    float x[B * H * T * D], y[B * H * T * D], inv[RD / 2];
    int64_t pos[B * T];
    for (int i = 0; i < B * H * T * D; i++) x[i] = (float)urand();
    for (int i = 0; i < B * T; i++) pos[i] = (int64_t)(urand() * 1048576.0);
    for (int k = 0; k < RD / 2; k++) inv[k] = (float)pow(10000.0, -2.0 * k / RD);
    const uint32_t mask = lampe_isa_available_mask();
    for (int isa = 0; isa < LAMPE_ISA_COUNT; isa++) {
        if (!(mask & (1u << isa))) continue;
        CHECK(lampe_set_isa((lampe_isa)isa) == LAMPE_OK, "set isa");
        for (int layout = 0; layout < 2; layout++) {
            lampe_rope_params p = {x, y, LAMPE_F32, B, H, T, D, H * T * D, T * D, D, H * T * D, T * D, D,
                                   pos, T, inv, RD, layout, 1.25f, 2};
            CHECK(lampe_rope(&p) == LAMPE_OK, "rope");
            double worst = 0;
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < T; t++) {
                        const float *xs = x + ((b * H + h) * T + t) * D;
                        const float *ys = y + ((b * H + h) * T + t) * D;
                        for (int k = 0; k < RD / 2; k++) {
                            const float a = (float)pos[b * T + t] * inv[k];
                            const double c = cos((double)a) * 1.25, s = sin((double)a) * 1.25;
                            const int i1 = layout ? 2 * k : k, i2 = layout ? 2 * k + 1 : k + RD / 2;
                            const double r1 = xs[i1] * c - xs[i2] * s, r2 = xs[i2] * c + xs[i1] * s;
                            worst = fmax(worst, fmax(fabs(ys[i1] - r1), fabs(ys[i2] - r2)));
                        }
                        for (int d = RD; d < D; d++) CHECK(ys[d] == xs[d], "pass-through dims");
                    }
            CHECK(worst < 4e-6, "isa %s layout %d: max error %g", lampe_isa_name((lampe_isa)isa), layout, worst);
        }
    }
    lampe_rope_params bad = {x, y, LAMPE_F32, B, H, T, D, 0, 0, 0, 0, 0, 0, pos, T, inv, 7, 0, 1.0f, 1};
    CHECK(lampe_rope(&bad) == LAMPE_ERR_ARG, "odd rotary_dim");
    lampe_set_isa(LAMPE_ISA_SCALAR);
    lampe_set_isa((lampe_isa)(31 - __builtin_clz(mask)));
}

/* Naive double attention of one query row over explicit (key, qpos, kpos) visits. */
static void naive_row(const float *q, const float *k, const float *v, int D, const int64_t *keys, const int64_t *qp,
                      const int64_t *kp, int n, const float *inv, double amp, double scale, double softcap, double *out)
{
    double *s = malloc(sizeof(double) * n), mx = -INFINITY, tot = 0;
    for (int e = 0; e < n; e++) {
        double dot = 0;
        for (int kk = 0; kk < D / 2; kk++) {
            const float aq = (float)qp[e] * inv[kk], ak = (float)kp[e] * inv[kk];
            const double cq = cos(aq) * amp, sq = sin(aq) * amp, ck = cos(ak) * amp, sk = sin(ak) * amp;
            const float *kr = k + keys[e] * D;
            const double q1 = q[kk] * cq - q[kk + D / 2] * sq, q2 = q[kk + D / 2] * cq + q[kk] * sq;
            const double k1 = kr[kk] * ck - kr[kk + D / 2] * sk, k2 = kr[kk + D / 2] * ck + kr[kk] * sk;
            dot += q1 * k1 + q2 * k2;
        }
        s[e] = dot * scale;
        if (softcap > 0) s[e] = softcap * tanh(s[e] / softcap);
        mx = fmax(mx, s[e]);
    }
    for (int d = 0; d < D; d++) out[d] = 0;
    for (int e = 0; e < n; e++) {
        const double w = exp(s[e] - mx);
        tot += w;
        for (int d = 0; d < D; d++) out[d] += w * v[keys[e] * D + d];
    }
    for (int d = 0; d < D; d++) out[d] /= tot;
    free(s);
}

static void test_attention_vs_naive(void)
{
    enum { L = 150, D = 32, HQ = 4, HKV = 2, G = HQ / HKV };
    static float q[HQ * L * D], k[HKV * L * D], v[HKV * L * D], o[HQ * L * D], lse[HQ * L];
    float inv[D / 2];
    for (int i = 0; i < HQ * L * D; i++) q[i] = (float)urand();
    for (int i = 0; i < HKV * L * D; i++) k[i] = (float)urand(), v[i] = (float)urand();
    for (int i = 0; i < D / 2; i++) inv[i] = (float)pow(10000.0, -2.0 * i / D);
    int64_t m[L];
    lampe_plan plan;
    CHECK(lampe_plan_make(&plan, 140, 16, 4, 30, 0, 0, m) == LAMPE_OK, "plan");
    const uint32_t mask = lampe_isa_available_mask();
    for (int isa = 0; isa < LAMPE_ISA_COUNT; isa++) {
        if (!(mask & (1u << isa))) continue;
        lampe_set_isa((lampe_isa)isa);
        for (int use_plan = 0; use_plan < 2; use_plan++) {
            lampe_attn_seq seq = {0, L, 0, use_plan ? &plan : NULL};
            lampe_attn_params p;
            memset(&p, 0, sizeof p);
            p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse; p.dtype = LAMPE_F32;
            p.batch = 1; p.q_heads = HQ; p.kv_heads = HKV; p.q_len = L; p.kv_len = L; p.head_dim = D;
            int64_t qs[3] = {HQ * L * D, L * D, D}, ks[3] = {HKV * L * D, L * D, D}, ls[3] = {HQ * L, L, 1};
            memcpy(p.q_stride, qs, sizeof qs); memcpy(p.out_stride, qs, sizeof qs);
            memcpy(p.k_stride, ks, sizeof ks); memcpy(p.v_stride, ks, sizeof ks); memcpy(p.lse_stride, ls, sizeof ls);
            p.seqs = &seq; p.inv_freq = inv; p.rotary_dim = D; p.layout = 0;
            p.amplitude = 1.0693147f; p.scale = 1.0f / sqrtf((float)D); p.num_threads = 2;
            CHECK(lampe_attention(&p) == LAMPE_OK, "attention");
            double worst = 0;
            int64_t keys[3 * L], qp[3 * L], kp[3 * L];
            double ref[D];
            for (int t = 0; t < L; t += 7) {
                int n = 0;
                lampe_region r[3];
                int nr = 1;
                if (use_plan) lampe_plan_regions(&plan, t, r, &nr);
                else r[0] = (lampe_region){LAMPE_REGION_FULL, 0, 0, t, t, 0};
                for (int g = 0; g < nr; g++)
                    for (int64_t j = r[g].key_lo; j <= r[g].key_hi; j++) {
                        keys[n] = j; qp[n] = r[g].qpos;
                        kp[n] = r[g].mapped ? m[j - r[g].shift] : j;
                        n++;
                    }
                for (int h = 0; h < HQ; h++) {
                    naive_row(q + (h * L + t) * D, k + (h / G) * L * D, v + (h / G) * L * D, D, keys, qp, kp, n, inv,
                              use_plan ? 1.0693147 : 1.0, 1.0 / sqrt((double)D), 0.0, ref);
                    for (int d = 0; d < D; d++) worst = fmax(worst, fabs(o[(h * L + t) * D + d] - ref[d]));
                }
            }
            CHECK(worst < 5e-6, "isa %s plan %d: max error %g", lampe_isa_name((lampe_isa)isa), use_plan, worst);
        }
    }
    lampe_set_isa((lampe_isa)(31 - __builtin_clz(mask)));
}

/* The contract's per-row layout: left pads, trailing slots never attended, queries placed by
 * query_start (prompt rows and rows after the prompt), logit soft-capping; every ISA. */
static void test_attention_contract_layout(void)
{
    enum { LK = 150, LQ = 50, D = 32, HQ = 4, HKV = 2, G = HQ / HKV, OFF = 5, CNT = 120, QS = 80, PROMPT = 90 };
    /* rows at positions 80..129: prompt rows, rows after the prompt, rows past the last valid key */
    static float q[HQ * LQ * D], k[HKV * LK * D], v[HKV * LK * D], o[HQ * LQ * D], lse[HQ * LQ];
    float inv[D / 2];
    for (int i = 0; i < HQ * LQ * D; i++) q[i] = (float)urand() * 2.0f;
    for (int i = 0; i < HKV * LK * D; i++) k[i] = (float)urand() * 2.0f, v[i] = (float)urand();
    for (int h = 0; h < HKV; h++) /* never-attended slots hold values that would dominate any softmax */
        for (int j = 0; j < LK; j++)
            if (j < OFF || j >= OFF + CNT)
                for (int d = 0; d < D; d++) k[(h * LK + j) * D + d] = v[(h * LK + j) * D + d] = 1e4f;
    for (int i = 0; i < D / 2; i++) inv[i] = (float)pow(10000.0, -2.0 * i / D);
    int64_t m[PROMPT];
    lampe_plan plan;
    CHECK(lampe_plan_make(&plan, PROMPT, 12, 4, 30, 0, 0, m) == LAMPE_OK, "plan");
    const uint32_t mask = lampe_isa_available_mask();
    for (int isa = 0; isa < LAMPE_ISA_COUNT; isa++) {
        if (!(mask & (1u << isa))) continue;
        lampe_set_isa((lampe_isa)isa);
        for (int variant = 0; variant < 3; variant++) { /* LaMPE, LaMPE + softcap, plain + softcap */
            const int use_plan = variant < 2;
            const double cap = variant ? 1.5 : 0.0;
            lampe_attn_seq seq = {OFF, CNT, QS, use_plan ? &plan : NULL};
            lampe_attn_params p;
            memset(&p, 0, sizeof p);
            p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse; p.dtype = LAMPE_F32;
            p.batch = 1; p.q_heads = HQ; p.kv_heads = HKV; p.q_len = LQ; p.kv_len = LK; p.head_dim = D;
            int64_t qs[3] = {HQ * LQ * D, LQ * D, D}, ks[3] = {HKV * LK * D, LK * D, D}, ls[3] = {HQ * LQ, LQ, 1};
            memcpy(p.q_stride, qs, sizeof qs); memcpy(p.out_stride, qs, sizeof qs);
            memcpy(p.k_stride, ks, sizeof ks); memcpy(p.v_stride, ks, sizeof ks); memcpy(p.lse_stride, ls, sizeof ls);
            p.seqs = &seq; p.inv_freq = inv; p.rotary_dim = D; p.layout = 0;
            p.amplitude = 1.0693147f; p.scale = 1.0f / sqrtf((float)D); p.softcap = (float)cap; p.num_threads = 2;
            CHECK(lampe_attention(&p) == LAMPE_OK, "attention");
            double worst = 0;
            int64_t keys[3 * LK], qp[3 * LK], kp[3 * LK];
            double ref[D];
            for (int t = 0; t < LQ; t += 3) {
                const int64_t pos = QS + t;
                int n = 0, nr = 1;
                lampe_region r[3];
                if (use_plan) lampe_plan_regions(&plan, pos, r, &nr);
                else r[0] = (lampe_region){LAMPE_REGION_FULL, 0, 0, pos, pos, 0};
                for (int g = 0; g < nr; g++)
                    for (int64_t j = r[g].key_lo; j <= r[g].key_hi && j < CNT; j++) {
                        keys[n] = j + OFF; qp[n] = r[g].qpos;
                        kp[n] = r[g].mapped ? m[j - r[g].shift] : j;
                        n++;
                    }
                for (int h = 0; h < HQ; h++) {
                    naive_row(q + (h * LQ + t) * D, k + (h / G) * LK * D, v + (h / G) * LK * D, D, keys, qp, kp, n,
                              inv, use_plan ? 1.0693147 : 1.0, 1.0 / sqrt((double)D), cap, ref);
                    for (int d = 0; d < D; d++) worst = fmax(worst, fabs(o[(h * LQ + t) * D + d] - ref[d]));
                }
            }
            CHECK(worst < 5e-6, "isa %s variant %d: max error %g", lampe_isa_name((lampe_isa)isa), variant, worst);
        }
    }
    lampe_set_isa((lampe_isa)(31 - __builtin_clz(mask)));
}

/* NaN policy and overflow on every ISA: a NaN key poisons exactly the rows that attend it (prompt
 * rows through packed or panel keys, a decode row through directly read keys); a huge scale is
 * reported as LAMPE_ERR_OVERFLOW. */
static void test_attention_nonfinite(void)
{
    enum { L = 300, D = 16, BAD = 150 };
    static float q[L * D], k[L * D], v[L * D], o[L * D], lse[L];
    float inv[D / 2];
    for (int i = 0; i < L * D; i++) q[i] = (float)urand(), k[i] = (float)urand(), v[i] = (float)urand();
    for (int i = 0; i < D / 2; i++) inv[i] = (float)pow(10000.0, -2.0 * i / D);
    k[BAD * D + 3] = NAN;
    int64_t m[L];
    lampe_plan plan;
    CHECK(lampe_plan_make(&plan, 290, 16, 4, 40, 0, 0, m) == LAMPE_OK, "plan");
    const uint32_t mask = lampe_isa_available_mask();
    for (int isa = 0; isa < LAMPE_ISA_COUNT; isa++) {
        if (!(mask & (1u << isa))) continue;
        lampe_set_isa((lampe_isa)isa);
        for (int lq = 1; lq <= L; lq += L - 1) { /* one decode row; every row (panels) */
            lampe_attn_seq seq = {0, L, L - lq, &plan};
            lampe_attn_params p;
            memset(&p, 0, sizeof p);
            p.q = q + (L - lq) * D; p.k = k; p.v = v; p.out = o; p.lse = lse; p.dtype = LAMPE_F32;
            p.batch = 1; p.q_heads = 1; p.kv_heads = 1; p.q_len = lq; p.kv_len = L; p.head_dim = D;
            int64_t qs[3] = {L * D, L * D, D}, ls[3] = {L, L, 1};
            memcpy(p.q_stride, qs, sizeof qs); memcpy(p.out_stride, qs, sizeof qs);
            memcpy(p.k_stride, qs, sizeof qs); memcpy(p.v_stride, qs, sizeof qs); memcpy(p.lse_stride, ls, sizeof ls);
            p.seqs = &seq; p.inv_freq = inv; p.rotary_dim = D; p.amplitude = 1.0f; p.scale = 0.25f; p.num_threads = 2;
            CHECK(lampe_attention(&p) == LAMPE_OK, "attention");
            for (int t = 0; t < lq; t++) {
                const int pos = L - lq + t, attends = pos >= BAD; /* LaMPE rows cover every key <= pos */
                int nan_all = 1, finite_all = 1;
                for (int d = 0; d < D; d++) nan_all &= isnan(o[t * D + d]), finite_all &= isfinite(o[t * D + d]);
                CHECK(attends ? nan_all && isnan(lse[t]) : finite_all && isfinite(lse[t]), "isa %s row %d",
                      lampe_isa_name((lampe_isa)isa), pos);
            }
            k[BAD * D + 3] = 0.5f;
            p.scale = 3e38f;
            CHECK(lampe_attention(&p) == LAMPE_ERR_OVERFLOW, "isa %s: overflow with %d rows",
                  lampe_isa_name((lampe_isa)isa), lq);
            k[BAD * D + 3] = NAN;
        }
    }
    lampe_set_isa((lampe_isa)(31 - __builtin_clz(mask)));
}

static void sum_task(void *ctx, int tid, int nth)
{
    long *slots = ctx;
    slots[tid] = tid + 1;
    (void)nth;
}

static void test_threadpool(void)
{
    for (int rep = 0; rep < 50; rep++) {
        long slots[8] = {0};
        const int n = 1 + rep % 8;
        lampe_parallel_run(n, sum_task, slots);
        long total = 0;
        for (int i = 0; i < 8; i++) total += slots[i];
        CHECK(total == (long)n * (n + 1) / 2, "pool ran %d threads (sum %ld)", n, total);
    }
}

static void test_dispatch(void)
{
    const uint32_t mask = lampe_isa_available_mask();
    CHECK(mask & 1u, "scalar always available");
    CHECK(lampe_set_isa((lampe_isa)9) == LAMPE_ERR_ARG, "bad isa");
    for (int i = 0; i < LAMPE_ISA_COUNT; i++) {
        if (mask & (1u << i)) {
            CHECK(lampe_set_isa((lampe_isa)i) == LAMPE_OK && (int)lampe_isa_current() == i, "select %d", i);
            CHECK(lampe_kernels_active()->isa == (lampe_isa)i, "kernel table of %d", i);
        } else {
            CHECK(lampe_set_isa((lampe_isa)i) == LAMPE_ERR_UNSUPPORTED, "refuse %d", i);
        }
    }
    CHECK(lampe_isa_from_name("AVX2") == LAMPE_ISA_AVX2 && lampe_isa_from_name("nope") == -1, "names");
    lampe_set_isa((lampe_isa)(31 - __builtin_clz(mask)));
}

int main(void)
{
    test_plan_config_a();
    test_plan_errors();
    test_mapping_recipe();
    test_sigmoid();
    test_conversions();
    test_dispatch();
    test_threadpool();
    test_rope_all_isas();
    test_attention_vs_naive();
    test_attention_contract_layout();
    test_attention_nonfinite();
    if (failures) {
        fprintf(stderr, "%d C check(s) failed\n", failures);
        return 1;
    }
    printf("C core tests: all checks passed (ISAs: ");
    for (int i = 0; i < LAMPE_ISA_COUNT; i++)
        if (lampe_isa_available_mask() & (1u << i)) printf("%s ", lampe_isa_name((lampe_isa)i));
    printf(")\n");
    return 0;
}
