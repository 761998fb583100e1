/*
 * Scalar bfloat16 / float16 <-> float32 conversions (round to nearest even), shared by every
 * ISA translation unit as static inline helpers (so no ISA-flagged code leaks across units).
 */
#ifndef LAMPE_CONVERT_H
#define LAMPE_CONVERT_H

#include <stdint.h>
#include <string.h>

static inline float lampe_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t lampe_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float lampe_bf16_to_f32(uint16_t h) { return lampe_bits_f32((uint32_t)h << 16); }

static inline uint16_t lampe_f32_to_bf16(float f)
{
    uint32_t u = lampe_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float lampe_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return lampe_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return lampe_bits_f32(sign);
        /* subnormal: value = man * 2^-24 exactly representable in float32 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return lampe_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t lampe_f32_to_f16(float f)
{
    uint32_t u = lampe_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7e00u; /* NaN */
    if (u >= 0x477ff000u) return sign | 0x7c00u; /* rounds to >= 65520: infinity */
    if (u < 0x38800000u) {                        /* below the smallest normal half: subnormal */
        if (u < 0x33000000u) return sign;         /* below half of the smallest subnormal */
        /* add 0.5 as a float: the hardware rounds man*2^-24 to nearest even for us */
        float a = lampe_bits_f32(u) + 0.5f;
        return sign | (uint16_t)(lampe_f32_bits(a) - lampe_f32_bits(0.5f));
    }
    const uint32_t odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
    return sign | (uint16_t)(u >> 13);
}

#endif
