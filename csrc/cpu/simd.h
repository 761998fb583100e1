/*
 * A small SIMD vocabulary. Each ISA translation unit defines LAMPE_LEVEL (0 scalar, 1 AVX2,
 * 2 AVX-512, 3 AVX-512 + BF16) and then includes this file and the kernel bodies, which are
 * written once against these names. Everything here is static inline: it is compiled with the
 * including unit's ISA flags and never shared across units.
 */
#ifndef LAMPE_SIMD_H
#define LAMPE_SIMD_H

#include <math.h>
#include <stdint.h>

#include "convert.h"

#if LAMPE_LEVEL == 0 /* ------------------------------------------------ scalar */
#define VW 1
typedef float vf;
static inline vf v_load(const float *p) { return *p; }
static inline void v_store(float *p, vf a) { *p = a; }
static inline vf v_set1(float a) { return a; }
static inline vf v_zero(void) { return 0.0f; }
static inline vf v_add(vf a, vf b) { return a + b; }
static inline vf v_sub(vf a, vf b) { return a - b; }
static inline vf v_mul(vf a, vf b) { return a * b; }
static inline vf v_fma(vf a, vf b, vf c) { return a * b + c; }
static inline vf v_max(vf a, vf b) { return a > b ? a : b; }
static inline float v_hsum(vf a) { return a; }
static inline float v_hmax(vf a) { return a; }
static inline vf v_exp2(vf x) { return exp2f(x); }
static inline vf v_tanh(vf x) { return tanhf(x); }

#else /* ------------------------------------------------------------------ x86 */
#include <immintrin.h>

#if LAMPE_LEVEL == 1
#define VW 8
typedef __m256 vf;
static inline vf v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf v_set1(float a) { return _mm256_set1_ps(a); }
static inline vf v_zero(void) { return _mm256_setzero_ps(); }
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline float v_hsum(vf a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float v_hmax(vf a)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 2^x with Cephes' exp2f polynomial on [-0.5, 0.5] (~2 ulp); x < -126 gives exactly 0 and NaN
 * stays NaN (max/min return their second operand when one is NaN, so the clamp keeps it). */
static inline vf v_exp2(vf x)
{
    const vf lo = _mm256_set1_ps(-126.0f);
    const vf keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ);
    x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(lo, x));
    const vf n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm256_sub_ps(x, n);
    vf p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
/* tanh: Cephes' tanhf polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above (sign copied). */
static inline vf v_tanh(vf x)
{
    const vf sign = _mm256_set1_ps(-0.0f), ax = _mm256_andnot_ps(sign, x), z = _mm256_mul_ps(x, x);
    vf p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
    const vf small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    const vf e = v_exp2(_mm256_mul_ps(ax, _mm256_set1_ps(2.8853900817779268f))); /* 2 log2(e) |x| */
    const vf one = _mm256_set1_ps(1.0f);
    const vf big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    const vf use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_or_ps(big, _mm256_and_ps(sign, x)), small, use_small);
}
#define V_HAVE_F16C 1
static inline vf v_load_bf16(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf v_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void v_store_f16(uint16_t *p, vf a)
{
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#else /* LAMPE_LEVEL >= 2: AVX-512 */
#define VW 16
typedef __m512 vf;
static inline vf v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf v_set1(float a) { return _mm512_set1_ps(a); }
static inline vf v_zero(void) { return _mm512_setzero_ps(); }
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline float v_hsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float v_hmax(vf a) { return _mm512_reduce_max_ps(a); }
/* As the AVX2 version: x < -126 gives exactly 0, NaN stays NaN. */
static inline vf v_exp2(vf x)
{
    const vf lo = _mm512_set1_ps(-126.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(lo, x));
    const vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vf f = _mm512_sub_ps(x, n);
    vf p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
static inline vf v_tanh(vf x)
{
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const vf ax = _mm512_abs_ps(x), z = _mm512_mul_ps(x, x);
    vf p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    const vf small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    const vf e = v_exp2(_mm512_mul_ps(ax, _mm512_set1_ps(2.8853900817779268f)));
    const vf one = _mm512_set1_ps(1.0f);
    const vf big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
    const vf sbig = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big),
                                                        _mm512_and_si512(_mm512_castps_si512(x), sign)));
    return _mm512_mask_mov_ps(sbig, _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), small);
}
#define V_HAVE_F16C 1
static inline vf v_load_bf16(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf v_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void v_store_f16(uint16_t *p, vf a)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif
#endif

/* ------------------------------------------------------------------ row conversions */

/* dtype codes as in lampe.h: 0 f32, 1 bf16, 2 f16 */
static inline void cvt_row_to_f32(int dtype, const void *src, float *dst, int64_t n)
{
    int64_t i = 0;
    if (dtype == 0) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    if (dtype == 1) {
#ifdef V_HAVE_F16C
        for (; i + VW <= n; i += VW) v_store(dst + i, v_load_bf16(s + i));
#endif
        for (; i < n; i++) dst[i] = lampe_bf16_to_f32(s[i]);
    } else {
#ifdef V_HAVE_F16C
        for (; i + VW <= n; i += VW) v_store(dst + i, v_load_f16(s + i));
#endif
        for (; i < n; i++) dst[i] = lampe_f16_to_f32(s[i]);
    }
}

static inline void cvt_row_from_f32(int dtype, const float *src, void *dst, int64_t n)
{
    int64_t i = 0;
    if (dtype == 0) {
        memmove(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    if (dtype == 1) {
        for (; i < n; i++) d[i] = lampe_f32_to_bf16(src[i]); /* integer ops: auto-vectorised */
    } else {
#ifdef V_HAVE_F16C
        for (; i + VW <= n; i += VW) v_store_f16(d + i, v_load(src + i));
#endif
        for (; i < n; i++) d[i] = lampe_f32_to_f16(src[i]);
    }
}

#endif
