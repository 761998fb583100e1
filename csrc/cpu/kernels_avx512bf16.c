/* The avx512bf16 kernels: for bf16 prompt tiles both products with VDPBF16PS; float32/float16
 * inputs and decode rows as avx512. Compiled with this unit's ISA flags (lampe/_buildflags.py). */
#define LAMPE_LEVEL 3
#include "../core/internal.h"
#include "simd.h"
#include "bf16_ops.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_avx512bf16 = {LAMPE_ISA_AVX512BF16, rope_tokens, attn_item, attn_pack};
