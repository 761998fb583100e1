/* The amx kernels: for bf16 prompt tiles both products on AMX tiles (TDPBF16PS), P rounded with
 * VCVTNE2PS2BF16; float32/float16 inputs and decode rows as avx512. Compiled with this unit's ISA
 * flags (lampe/_buildflags.py). */
#define LAMPE_LEVEL 4
#include "../core/internal.h"
#include "simd.h"
#include "bf16_ops.h"
#include "amx_ops.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_amx = {LAMPE_ISA_AMX, rope_tokens, attn_item, attn_pack};
