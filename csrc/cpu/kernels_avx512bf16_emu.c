/* The avx512bf16-emu test level: the avx512bf16 kernels with VDPBF16PS emulated in plain AVX-512
 * (bf16_ops.h), so the bf16 layouts run on any AVX-512 CPU. Compiled with this unit's ISA flags
 * (lampe/_buildflags.py). */
#define LAMPE_LEVEL 3
#define LAMPE_BF16_EMU 1
#include "../core/internal.h"
#include "simd.h"
#include "bf16_ops.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_avx512bf16_emu = {LAMPE_ISA_AVX512BF16_EMU, rope_tokens, attn_item, attn_pack};
