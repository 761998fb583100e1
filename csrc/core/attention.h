/* Internal: the work decomposition shared by the attention driver and the per-ISA bodies. */
#ifndef LAMPE_ATTENTION_H
#define LAMPE_ATTENTION_H

#include <stdatomic.h>

#include "internal.h"

#define LAMPE_ATTN_BK 64      /* keys per block                                */
#define LAMPE_ATTN_LDK 80     /* row stride of packed key panels (BK + 16: no set aliasing) */
#define LAMPE_ATTN_MAX_BQ 64  /* query positions per tile                      */
#define LAMPE_ATTN_ROW_PAD 8  /* rows added so any micro-kernel height fits    */

typedef struct lampe_attn_tile {
    int64_t b, kvh, t0, t1; /* query rows t0..t1-1 of batch b, all heads of KV head kvh */
    int64_t panel;          /* 1: prompt rows reading the prefill panels of batch row b  */
} lampe_attn_tile;

typedef struct lampe_attn_plan {
    const lampe_attn_params *p;
    int64_t group;      /* Hq / Hkv                                   */
    int64_t max_rows;   /* group * max positions per tile             */
    int64_t n_tiles;
    lampe_attn_tile *tiles;
    int32_t nchunks;    /* key chunks per tile (split-KV); 1: no split */
    float *part_o;      /* [n_tiles * nchunks][max_rows][Dh] when nchunks > 1 */
    float *part_ml;     /* [n_tiles * nchunks][max_rows][2] (max, sum) in log2 units */
    int64_t scratch_floats;
    /* Prefill panels: every key rotated once per call instead of once per query tile. Keys at
     * true positions and at mapped positions m[j], as [Hkv][nblk][D][BK] float32, for batch row
     * panel_b; vconv holds float32 values [Hkv][Lk][D] when the inputs are 16-bit. */
    int64_t nblk, panel_b;
    int64_t ldv; /* row stride of float32 value blocks: head_dim rounded up to 16, plus 16 */
    float *panel_id, *panel_map, *vconv;
    const lampe_kernels *kern;
} lampe_attn_plan;

#endif
