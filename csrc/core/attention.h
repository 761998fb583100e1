/* Internal: the work decomposition shared by the attention driver and the per-ISA bodies. */
#ifndef LAMPE_ATTENTION_H
#define LAMPE_ATTENTION_H

#include <stdatomic.h>

#include "internal.h"

#define LAMPE_ATTN_BK 64      /* keys per block                                */
#define LAMPE_ATTN_MAX_BQ 128 /* query positions per tile                      */
#define LAMPE_ATTN_TILE_ROWS 128 /* rows (positions x the G heads of a KV head) per prompt tile */

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
    atomic_int *tile_done; /* [n_tiles] chunks finished; the last one merges the tile */
    size_t scratch_bytes; /* per thread, laid out by lampe_attn_scratch_carve */
    /* Prefill panels: every key rotated once per call instead of once per query tile. Keys at
     * true positions and at mapped positions m[j], and the values, for batch row panel_b, one
     * block of BK keys every lampe_attn_kblock_floats(D) floats (keys) or BK * ldv floats (values)
     * per KV head, each in the tile layout of the kernel level (attn_tiles.h: float32, or bf16 for
     * bf16 inputs on the bf16 levels). Keys or values that are not finite are
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
 * out with the same function, so the two cannot disagree. Mp = lampe_attn_scratch_rows(max_rows).
 */
typedef struct lampe_attn_scratch {
    float *q_slot[3]; /* [Mp][D] queries rotated per slot, times scale * log2(e) (and s^2)   */
    uint16_t *q_bf16[3]; /* [Mp][D rounded up to 32] the same in bf16 (bf16 tiles)           */
    float *q_direct;  /* [Mp][D] direct mode: one slot's queries rotated back by a key position */
    float *k_block;   /* one block of rotated keys in the tile layout (pack mode)              */
    float *v_block;   /* [BK][ldv] one block of values in the tile layout                      */
    float *scores;    /* [Mp][BK] logits in log2 units, then probabilities                     */
    float *o;         /* [Mp][ldv] unnormalised output rows                                    */
    float *m;         /* [Mp] running max (log2 units)                                         */
    float *l;         /* [Mp][16] running sums, one vector per row                             */
    uint16_t *p_bf16; /* [Mp][BK] probabilities in bf16 (bf16 tiles)                           */
    uint8_t *act;     /* [Mp] rows that see keys of the current block                          */
    float *cos, *sin; /* [D] cos/sin of one position                                          */
    float *row;       /* [D] one converted row                                                 */
    int32_t *poisoned;/* [Mp] 1: the row attends a NaN or inf input; its output is NaN         */
    int64_t *bad;     /* [2 BK] keys of the current block whose key or value is not finite     */
} lampe_attn_scratch;

/* Floats one key block takes in the panels and the scratch: BK keys of D float32, or of D rounded
 * up to 32 in bf16 pairs, whichever the level uses (attn_tiles.h). */
static inline int64_t lampe_attn_kblock_floats(int64_t D) { return LAMPE_ATTN_BK * ((D + 31) / 32 * 32); }

/* Rows of the scratch: the tile rounded up to a multiple of every micro-kernel height (4, 6, 3, 2
 * and 16 rows; attn_tiles.h). */
static inline int64_t lampe_attn_scratch_rows(int64_t max_rows) { return (max_rows + 47) / 48 * 48; }

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
    const int64_t Dk = (D + 31) / 32 * 32;
    for (int i = 0; i < 3; i++) LAMPE_CARVE(q_slot[i], float, Mp * D);
    for (int i = 0; i < 3; i++) LAMPE_CARVE(q_bf16[i], uint16_t, Mp * Dk);
    LAMPE_CARVE(q_direct, float, Mp * D);
    LAMPE_CARVE(k_block, float, lampe_attn_kblock_floats(D));
    LAMPE_CARVE(v_block, float, LAMPE_ATTN_BK * ldv);
    LAMPE_CARVE(scores, float, Mp * LAMPE_ATTN_BK);
    LAMPE_CARVE(o, float, Mp * ldv);
    LAMPE_CARVE(m, float, Mp);
    LAMPE_CARVE(l, float, Mp * 16);
    LAMPE_CARVE(p_bf16, uint16_t, Mp * LAMPE_ATTN_BK);
    LAMPE_CARVE(act, uint8_t, Mp);
    LAMPE_CARVE(cos, float, D);
    LAMPE_CARVE(sin, float, D);
    LAMPE_CARVE(row, float, D);
    LAMPE_CARVE(poisoned, int32_t, Mp);
    LAMPE_CARVE(bad, int64_t, 2 * LAMPE_ATTN_BK);
#undef LAMPE_CARVE
    return off;
}

#endif
