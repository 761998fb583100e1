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

typedef struct lampe_attn_work {
    const lampe_attn_params *p;
    int64_t group;      /* Hq / Hkv                                   */
    int64_t max_rows;   /* group * max positions per tile             */
    int64_t n_tiles;
    lampe_attn_tile *tiles;
    int32_t nchunks;    /* key chunks per tile (split-KV); 1: no split */
    float *part_o;      /* [n_tiles * nchunks][max_rows][Dh] when nchunks > 1 */
    float *part_ml;     /* [n_tiles * nchunks][max_rows][2] (max, sum) in log2 units; max NaN: the row is NaN */
    size_t scratch_bytes; /* per thread, laid out by lampe_attn_scratch_carve */
    /* Prefill panels: every key rotated once per call instead of once per query tile. Keys at
     * true positions and at mapped positions m[j], as [Hkv][nblk][D][BK] float32, for batch row
     * panel_b; vconv holds float32 values [Hkv][Lk][D]. Keys or values that are not finite are
     * stored as zeros and flagged in key_bad ([Hkv][Lk], bit 0 key, bit 1 value) and block_bad
     * ([Hkv][nblk]: any flagged key in the block). */
    int64_t nblk, panel_b;
    int64_t ldv; /* row stride of float32 value blocks: head_dim rounded up to 16, plus 16 */
    float *panel_id, *panel_map, *vconv;
    uint8_t *key_bad, *block_bad;
    atomic_int *overflow; /* set when a logit of finite inputs overflows float32 */
    const lampe_kernels *kern;
} lampe_attn_work;

/*
 * Per-thread scratch of one attention work item. The driver sizes it and each work item lays it
 * out with the same function, so the two cannot disagree. Mp = max_rows + LAMPE_ATTN_ROW_PAD.
 */
typedef struct lampe_attn_scratch {
    float *q_slot[3]; /* [Mp][D] queries rotated per slot, times scale * log2(e) (and s^2)   */
    float *q_direct;  /* [Mp][D] direct mode: one slot's queries rotated back by a key position */
    float *k_block;   /* [D][LDK] one block of rotated keys, transposed (pack mode)           */
    float *v_block;   /* [BK][ldv] one block of values as float32                              */
    float *scores;    /* [Mp][BK] logits in log2 units, then probabilities                     */
    float *o;         /* [Mp][D] unnormalised output rows                                      */
    float *m, *l;     /* [Mp] running max (log2 units) and sum of the online softmax           */
    float *cos, *sin; /* [D] cos/sin of one position                                          */
    float *row;       /* [D] one converted row                                                 */
    int32_t *active;  /* [Mp] rows the current key block updates                               */
    int32_t *poisoned;/* [Mp] 1: the row attends a NaN or inf input; its output is NaN         */
    int64_t *bad;     /* [2 BK] keys of the current block whose key or value is not finite     */
} lampe_attn_scratch;

/* Lay the scratch out from `base` (64-byte aligned, or NULL to measure); returns its size in
 * bytes. Every array starts on a 64-byte boundary. */
static inline size_t lampe_attn_scratch_carve(lampe_attn_scratch *s, void *base, int64_t Mp, int64_t D, int64_t ldv)
{
    char *at = (char *)base;
    size_t off = 0;
#define LAMPE_CARVE(field, type, count)                               \
    do {                                                              \
        s->field = (type *)(void *)(at ? at + off : NULL);            \
        off += ((size_t)(count) * sizeof(type) + 63) / 64 * 64;       \
    } while (0)
    for (int i = 0; i < 3; i++) LAMPE_CARVE(q_slot[i], float, Mp * D);
    LAMPE_CARVE(q_direct, float, Mp * D);
    LAMPE_CARVE(k_block, float, D * LAMPE_ATTN_LDK);
    LAMPE_CARVE(v_block, float, LAMPE_ATTN_BK * ldv);
    LAMPE_CARVE(scores, float, Mp * LAMPE_ATTN_BK);
    LAMPE_CARVE(o, float, Mp * D);
    LAMPE_CARVE(m, float, Mp);
    LAMPE_CARVE(l, float, Mp);
    LAMPE_CARVE(cos, float, D);
    LAMPE_CARVE(sin, float, D);
    LAMPE_CARVE(row, float, D);
    LAMPE_CARVE(active, int32_t, Mp);
    LAMPE_CARVE(poisoned, int32_t, Mp);
    LAMPE_CARVE(bad, int64_t, 2 * LAMPE_ATTN_BK);
#undef LAMPE_CARVE
    return off;
}

#endif
