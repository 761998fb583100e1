/* The avx512 kernels: the shared bodies compiled with this unit's ISA flags (see setup.py). */
#define LAMPE_LEVEL 2
#include "../core/internal.h"
#include "simd.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_avx512 = {LAMPE_ISA_AVX512, rope_tokens, attn_item, attn_pack};
