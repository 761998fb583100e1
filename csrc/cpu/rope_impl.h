/*
 * Rotary application, written once against simd.h and compiled per ISA. Rotation is two
 * multiplies and one add/sub per element with no fused multiply-add, so every ISA path gives
 * the same bits; only cos/sin (glibc cosf/sinf of the float32 angle) could differ, and they are
 * shared scalar code.
 */
#ifndef LAMPE_ROPE_IMPL_H
#define LAMPE_ROPE_IMPL_H

/* cos/sin of f32(f32(pos) * inv_freq[k]) for k < n2 (spec §0), scaled by amp. */
static inline void rope_angles(int64_t pos, const float *inv_freq, int64_t n2, float amp, float *c,
                               float *s)
{
    const float fp = (float)pos;
    for (int64_t k = 0; k < n2; k++) {
        const float a = fp * inv_freq[k];
        c[k] = cosf(a) * amp;
        s[k] = sinf(a) * amp;
    }
}

/* Rotate x (float32, in place) by precomputed c/s; only the first 2*n2 dims move. */
static inline void rope_row_f32(float *x, const float *c, const float *s, int64_t n2, int layout)
{
    if (layout == LAMPE_LAYOUT_HALF) {
        float *x2p = x + n2;
        int64_t k = 0;
        for (; k + VW <= n2; k += VW) {
            const vf x1 = v_load(x + k), x2 = v_load(x2p + k);
            const vf cc = v_load(c + k), ss = v_load(s + k);
            v_store(x + k, v_sub(v_mul(x1, cc), v_mul(x2, ss)));
            v_store(x2p + k, v_add(v_mul(x2, cc), v_mul(x1, ss)));
        }
        for (; k < n2; k++) {
            const float x1 = x[k], x2 = x2p[k];
            x[k] = x1 * c[k] - x2 * s[k];
            x2p[k] = x2 * c[k] + x1 * s[k];
        }
    } else {
        for (int64_t k = 0; k < n2; k++) {
            const float x1 = x[2 * k], x2 = x[2 * k + 1];
            x[2 * k] = x1 * c[k] - x2 * s[k];
            x[2 * k + 1] = x2 * c[k] + x1 * s[k];
        }
    }
}

static inline size_t dtype_size(int dtype) { return dtype == LAMPE_F32 ? 4 : 2; }

/* Tokens are taken in chunks of ROPE_TT: cos/sin of a chunk are computed once, then each
 * (batch, head) walks its chunk of rows contiguously (one head after another keeps the access
 * sequential; token-major order would touch `heads` distant pages per token). */
#define ROPE_TT 32

static void rope_tokens(const lampe_rope_params *p, int64_t t0, int64_t t1, float *scratch)
{
    const int64_t D = p->head_dim, n2 = p->rotary_dim / 2;
    const size_t es = dtype_size(p->dtype);
    float *c = scratch, *s = scratch + ROPE_TT * n2, *row = scratch + 2 * ROPE_TT * n2;
    const char *src = (const char *)p->src;
    char *dst = (char *)p->dst;
    for (int64_t c0 = t0; c0 < t1; c0 += ROPE_TT) {
        const int64_t nt = c0 + ROPE_TT <= t1 ? ROPE_TT : t1 - c0;
        for (int64_t b = 0; b < p->batch; b++) {
            if (b == 0 || p->pos_stride_b != 0)
                for (int64_t i = 0; i < nt; i++)
                    rope_angles(p->positions[b * p->pos_stride_b + c0 + i], p->inv_freq, n2, p->amplitude,
                                c + i * n2, s + i * n2);
            for (int64_t h = 0; h < p->heads; h++) {
                for (int64_t i = 0; i < nt; i++) {
                    const int64_t t = c0 + i;
                    const char *xs = src + (size_t)(b * p->src_stride_b + h * p->src_stride_h + t * p->src_stride_t) * es;
                    char *xd = dst + (size_t)(b * p->dst_stride_b + h * p->dst_stride_h + t * p->dst_stride_t) * es;
                    cvt_row_to_f32(p->dtype, xs, row, D);
                    rope_row_f32(row, c + i * n2, s + i * n2, n2, p->layout);
                    cvt_row_from_f32(p->dtype, row, xd, D);
                }
            }
        }
    }
}

#endif
