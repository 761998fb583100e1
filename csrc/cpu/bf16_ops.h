/*
 * bf16 dot-product vocabulary of the AVX-512 kernel levels (include after simd.h).
 *
 * The bf16 kernels are written once against these names. A unit compiled with -mavx512bf16
 * gets the real instructions (VDPBF16PS, VCVTNE2PS2BF16); a unit that defines LAMPE_BF16_EMU
 * and is compiled with plain AVX-512 gets an emulation that follows the instructions' pseudo-code
 * in the Intel SDM bit for bit, so the bf16 layouts and loops run (and are tested) on any
 * AVX-512 CPU. Emulated levels are for tests: they are several times slower than float32.
 *
 * Layouts: a vbf holds 16 pairs of bf16 (32 values); pair i is (element 2i, element 2i + 1) of a
 * row, element 2i in the low half of the 32-bit lane, as the instructions expect.
 */
#ifndef LAMPE_BF16_OPS_H
#define LAMPE_BF16_OPS_H

#if LAMPE_LEVEL < 2
#error "bf16_ops.h needs an AVX-512 unit"
#endif
#if !defined(LAMPE_BF16_EMU) && !defined(__AVX512BF16__)
#error "bf16_ops.h: compile with -mavx512bf16, or define LAMPE_BF16_EMU for the emulated test level"
#endif

typedef __m512i vbf; /* 32 bf16 = 16 pairs */

static inline vbf vbf_load(const uint16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline void vbf_store(uint16_t *p, vbf a) { _mm512_storeu_si512((void *)p, a); }
/* The 32-bit pair at p (two consecutive bf16) in every lane. */
static inline vbf vbf_bcast_pair(const uint16_t *p)
{
    int32_t x;
    memcpy(&x, p, 4);
    return _mm512_set1_epi32(x);
}

#ifndef LAMPE_BF16_EMU /* ------------------------------------------------ the instructions */

/* acc[i] += a.bf16[2i+1] * b.bf16[2i+1], then += a.bf16[2i] * b.bf16[2i] (VDPBF16PS) */
static inline vf v_dpbf16(vf acc, vbf a, vbf b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
/* 32 bf16: lo's 16 floats in elements 0..15, hi's in 16..31, round to nearest even (VCVTNE2PS2BF16) */
static inline vbf v_cvt2_bf16(vf lo, vf hi) { return (vbf)_mm512_cvtne2ps_pbh(hi, lo); }
/* 16 bf16 from 16 floats (VCVTNEPS2BF16) */
static inline __m256i v_cvt_bf16(vf x) { return (__m256i)_mm512_cvtneps_pbh(x); }

#else /* ------------------------------------------------------------------ emulation (SDM pseudo-code) */

/* make_fp32 with DAZ: a bf16 whose exponent is 0 (zero or denormal) becomes +-0. */
static inline vf bf16_emu_daz(__m512i bits32)
{
    const __mmask16 denorm = _mm512_testn_epi32_mask(bits32, _mm512_set1_epi32(0x7f800000));
    return _mm512_castsi512_ps(_mm512_mask_and_epi32(bits32, denorm, bits32, _mm512_set1_epi32((int)0x80000000u)));
}

/* FTZ on a result: denormals become zero of the same sign. */
static inline vf bf16_emu_ftz(vf x)
{
    const __m512i b = _mm512_castps_si512(x);
    const __mmask16 denorm = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x7f800000));
    return _mm512_castsi512_ps(_mm512_mask_and_epi32(b, denorm, b, _mm512_set1_epi32((int)0x80000000u)));
}

/* VDPBF16PS: "FP32 FMA with DAZ in, FTZ out and RNE rounding; MXCSR neither consulted nor
 * updated": srcdest += a.odd * b.odd, then srcdest += a.even * b.even, each an FMA (the product
 * of two bf16 is exact in fp32, so each step rounds once). The FMAs below run under the
 * default MXCSR (RNE, no FTZ/DAZ), hence the explicit DAZ on inputs and FTZ on each result. */
static inline vf v_dpbf16(vf acc, vbf a, vbf b)
{
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const vf a_odd = bf16_emu_daz(_mm512_and_si512(a, hi)), b_odd = bf16_emu_daz(_mm512_and_si512(b, hi));
    const vf a_even = bf16_emu_daz(_mm512_slli_epi32(a, 16)), b_even = bf16_emu_daz(_mm512_slli_epi32(b, 16));
    acc = bf16_emu_ftz(_mm512_fmadd_ps(a_odd, b_odd, acc));
    return bf16_emu_ftz(_mm512_fmadd_ps(a_even, b_even, acc));
}

/* convert_fp32_to_bfloat16 of the SDM: zero or denormal -> signed zero; infinity -> truncated;
 * NaN -> truncated with the quiet bit (bit 6) set; otherwise round to nearest even by integer
 * add of 0x7fff + lsb (overflow carries into infinity, as the instruction does). Result in the
 * low 16 bits of each 32-bit lane. */
static inline __m512i bf16_emu_round(vf x)
{
    const __m512i b = _mm512_castps_si512(x);
    const __m512i expo = _mm512_and_si512(b, _mm512_set1_epi32(0x7f800000));
    const __mmask16 zero_or_denorm = _mm512_cmpeq_epi32_mask(expo, _mm512_setzero_si512());
    const __mmask16 inf_or_nan = _mm512_cmpeq_epi32_mask(expo, _mm512_set1_epi32(0x7f800000));
    const __mmask16 nan = inf_or_nan & _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x007fffff));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i trunc = _mm512_srli_epi32(b, 16);
    r = _mm512_mask_mov_epi32(r, inf_or_nan, trunc);
    r = _mm512_mask_or_epi32(r, nan, r, _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, zero_or_denorm, _mm512_and_si512(trunc, _mm512_set1_epi32(0x8000)));
    return r;
}

static inline vbf v_cvt2_bf16(vf lo, vf hi)
{
    /* pack the low halves of 32 lanes into 32 consecutive 16-bit elements */
    const __m256i l = _mm512_cvtepi32_epi16(bf16_emu_round(lo)), h = _mm512_cvtepi32_epi16(bf16_emu_round(hi));
    return _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1);
}

static inline __m256i v_cvt_bf16(vf x) { return _mm512_cvtepi32_epi16(bf16_emu_round(x)); }

#endif

/* Round n floats to bf16 (n a multiple of 32 unless tail handling below), the kernels' Q and P. */
static inline void cvt_row_f32_to_bf16(const float *src, uint16_t *dst, int64_t n)
{
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) vbf_store(dst + i, v_cvt2_bf16(v_load(src + i), v_load(src + i + VW)));
    for (; i + VW <= n; i += VW) _mm256_storeu_si256((__m256i *)(dst + i), v_cvt_bf16(v_load(src + i)));
    for (; i < n; i++) {
        const __m256i one = v_cvt_bf16(_mm512_set1_ps(src[i]));
        dst[i] = (uint16_t)_mm256_extract_epi16(one, 0);
    }
}

#endif
