/* The amx-emu test level: the amx kernels with the AMX tile unit and VDPBF16PS emulated in plain
 * AVX-512 (amx_ops.h, bf16_ops.h), so the tile blocking runs on any AVX-512 CPU. Compiled with
 * this unit's ISA flags (lampe/_buildflags.py). */
#define LAMPE_LEVEL 4
#define LAMPE_BF16_EMU 1
#define LAMPE_AMX_EMU 1
#include "../core/internal.h"
#include "simd.h"
#include "bf16_ops.h"
#include "amx_ops.h"
#include "rope_impl.h"
#include "attn_tiles.h"
#include "attn_impl.h"

const lampe_kernels lampe_kernels_amx_emu = {LAMPE_ISA_AMX_EMU, rope_tokens, attn_item, attn_pack};
