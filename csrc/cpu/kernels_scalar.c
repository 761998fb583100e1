/* The scalar kernels: the shared bodies compiled with this unit's ISA flags (see setup.py). */
#define LAMPE_LEVEL 0
#include "../core/internal.h"
#include "simd.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_scalar = {LAMPE_ISA_SCALAR, rope_tokens, attn_item, attn_pack};
