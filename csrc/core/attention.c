/*
 * Driver of the fused attention: validates parameters, cuts the work into (batch, KV head,
 * query tile[, key chunk]) items, sizes the per-thread scratch (lampe_attn_scratch) and the
 * shared buffers (prefill panels, split-KV partials), and runs the items on the pool (most
 * expensive first, claimed dynamically). The per-ISA kernel body (csrc/cpu/attn_impl.h) does
 * the arithmetic, the split-KV merge included.
 */
#include <stdlib.h>
#include <string.h>

#include "attention.h"

typedef struct {
    lampe_attn_work *work;
    int pack;               /* 1: panel blocks, 0: attention items */
    int64_t lo, hi;         /* item range of this phase            */
    atomic_llong next;
    atomic_int failed;
} attn_phase;

static void attn_task(void *ctx, int tid, int nth)
{
    (void)tid;
    (void)nth;
    attn_phase *ph = (attn_phase *)ctx;
    lampe_attn_work *work = ph->work;
    float *scratch = NULL;
    for (;;) {
        const int64_t item = ph->lo + atomic_fetch_add(&ph->next, 1);
        if (item >= ph->hi) break;
        if (!scratch) {
            scratch = (float *)aligned_alloc(64, work->scratch_bytes);
            if (!scratch) {
                atomic_store(&ph->failed, 1);
                atomic_store(&ph->next, ph->hi - ph->lo + (1LL << 40)); /* stop everyone */
                break;
            }
        }
        if (ph->pack)
            work->kern->attn_pack(work, item, scratch);
        else
            work->kern->attn_item(work, item, scratch);
    }
    free(scratch);
}

static int run_phase(lampe_attn_work *work, int nth, int pack, int64_t lo, int64_t hi)
{
    if (hi <= lo) return LAMPE_OK;
    attn_phase ph;
    ph.work = work;
    ph.pack = pack;
    ph.lo = lo;
    ph.hi = hi;
    atomic_init(&ph.next, 0);
    atomic_init(&ph.failed, 0);
    if (nth > hi - lo) nth = (int)(hi - lo);
    lampe_parallel_run(nth, attn_task, &ph);
    return atomic_load(&ph.failed) ? LAMPE_ERR_NOMEM : LAMPE_OK;
}

/* Rows whose tiles read prefill panels: prompt rows when they make at least two tiles. */
static int64_t panel_rows(const lampe_attn_params *p, int64_t b, int64_t own, int64_t bq)
{
    if (p->seqs[b].key_count == 0) return 0;
    return own >= 2 * bq ? own : 0;
}

/* A tile of prompt rows shares one key rotation per slot; a row after the prompt of an active
 * plan has its own map shift, so it gets a tile of its own. */
static int64_t first_own_tile_row(const lampe_attn_params *p, int64_t b)
{
    const lampe_plan *pl = p->seqs[b].plan;
    if (!pl || pl->fallback) return p->q_len;
    /* tensor row t has position query_start + t: rows at or past the prompt length */
    int64_t t = pl->length - p->seqs[b].query_start;
    if (t < 0) t = 0;
    return t < p->q_len ? t : p->q_len;
}

static int check_seq(const lampe_attn_params *p, const lampe_attn_seq *s)
{
    if (s->key_offset < 0 || s->key_offset > p->kv_len) return LAMPE_ERR_ARG;
    if (s->key_count < 0 || s->key_count > p->kv_len - s->key_offset) return LAMPE_ERR_ARG;
    if (s->query_start <= -LAMPE_MAX_POSITIONS || s->query_start > LAMPE_MAX_POSITIONS - p->q_len)
        return LAMPE_ERR_LENGTH;
    if (!s->plan) return LAMPE_OK;
    if (!s->plan->mapped_ids || s->plan->length < 1) return LAMPE_ERR_ARG;
    if (s->plan->decode != LAMPE_DECODE_SHIFTED) return LAMPE_ERR_UNSUPPORTED;
    /* the baselines have no rows after their plan: it must cover every query row */
    if (s->plan->mode != LAMPE_MODE_LAMPE && s->plan->length < s->query_start + p->q_len) return LAMPE_ERR_ARG;
    return LAMPE_OK;
}

int lampe_attention(const lampe_attn_params *p)
{
    if (!p || !p->q || !p->k || !p->v || !p->out || !p->seqs) return LAMPE_ERR_ARG;
    if (p->dtype < LAMPE_F32 || p->dtype > LAMPE_F16) return LAMPE_ERR_ARG;
    if (p->batch < 0 || p->q_len < 0 || p->kv_len < 0 || p->head_dim < 1 || p->q_heads < 1 || p->kv_heads < 1)
        return LAMPE_ERR_ARG;
    if (p->q_heads % p->kv_heads || p->q_len > p->kv_len) return LAMPE_ERR_ARG;
    if (p->q_heads / p->kv_heads > LAMPE_MAX_GROUP) return LAMPE_ERR_ARG;
    if (p->rotary_dim < 0 || p->rotary_dim > p->head_dim || p->rotary_dim % 2) return LAMPE_ERR_ARG;
    if (p->rotary_dim > 0 && !p->inv_freq) return LAMPE_ERR_ARG;
    if (p->layout != LAMPE_LAYOUT_HALF && p->layout != LAMPE_LAYOUT_INTERLEAVED) return LAMPE_ERR_ARG;
    if (!(p->softcap >= 0.0f && p->softcap <= 3.4e38f)) return LAMPE_ERR_ARG; /* finite, >= 0 */
    if (p->kv_len > LAMPE_MAX_POSITIONS) return LAMPE_ERR_LENGTH;
    if (p->rope_table_len > 0 && (!p->rope_cos || !p->rope_sin)) return LAMPE_ERR_ARG;
    for (int64_t b = 0; b < p->batch; b++) {
        const int st = check_seq(p, &p->seqs[b]);
        if (st != LAMPE_OK) return st;
    }
    if (p->batch == 0 || p->q_len == 0) return LAMPE_OK;

    const int64_t G = p->q_heads / p->kv_heads;
    int64_t bq = LAMPE_ATTN_TILE_ROWS / G;
    if (bq < 1) bq = 1;
    if (bq > LAMPE_ATTN_MAX_BQ) bq = LAMPE_ATTN_MAX_BQ;

    int64_t n_tiles = 0;
    for (int64_t b = 0; b < p->batch; b++) {
        const int64_t own = first_own_tile_row(p, b);
        n_tiles += p->kv_heads * ((own + bq - 1) / bq + (p->q_len - own));
    }
    lampe_attn_work work;
    memset(&work, 0, sizeof(work));
    work.p = p;
    work.group = G;
    work.max_rows = G * bq;
    work.n_tiles = n_tiles;
    work.kern = lampe_kernels_active();
    work.nblk = (p->kv_len + LAMPE_ATTN_BK - 1) / LAMPE_ATTN_BK;
    work.tiles = (lampe_attn_tile *)malloc((size_t)n_tiles * sizeof(lampe_attn_tile));
    if (!work.tiles) return LAMPE_ERR_NOMEM;
    /* Order: per batch row, its panel tiles (run right after that row's panels are packed);
     * then every other tile. Within a group later query tiles come first (they see more keys),
     * so the dynamic claim balances. */
    int64_t n = 0, any_panels = 0;
    int64_t *group_end = (int64_t *)calloc((size_t)p->batch + 1, sizeof(int64_t));
    if (!group_end) {
        free(work.tiles);
        return LAMPE_ERR_NOMEM;
    }
    for (int64_t b = 0; b < p->batch; b++) {
        const int64_t own = first_own_tile_row(p, b), pr = panel_rows(p, b, own, bq);
        for (int64_t t0 = (pr - 1) / bq * bq; pr > 0 && t0 >= 0; t0 -= bq)
            for (int64_t h = 0; h < p->kv_heads; h++)
                work.tiles[n++] = (lampe_attn_tile){b, h, t0, t0 + bq < pr ? t0 + bq : pr, 1};
        any_panels |= pr > 0;
        group_end[b] = n;
    }
    for (int64_t b = 0; b < p->batch; b++) {
        const int64_t own = first_own_tile_row(p, b), pr = panel_rows(p, b, own, bq);
        for (int64_t t = p->q_len - 1; t >= own; t--)
            for (int64_t h = 0; h < p->kv_heads; h++) work.tiles[n++] = (lampe_attn_tile){b, h, t, t + 1, 0};
        if (pr == 0)
            for (int64_t t0 = (own - 1) / bq * bq; own > 0 && t0 >= 0; t0 -= bq)
                for (int64_t h = 0; h < p->kv_heads; h++)
                    work.tiles[n++] = (lampe_attn_tile){b, h, t0, t0 + bq < own ? t0 + bq : own, 0};
    }

    int nth = lampe_resolve_threads(p->num_threads);
    const int64_t flops = p->batch * p->q_heads * p->q_len * p->kv_len * p->head_dim;
    if (flops < (1 << 16)) nth = 1;
    /* Split-KV: too few tiles to feed the threads and enough keys to share. */
    work.nchunks = 1;
    if (nth > 1 && n_tiles < 2 * nth && p->kv_len >= 4 * LAMPE_ATTN_BK) {
        int64_t c = (2 * nth + n_tiles - 1) / n_tiles;
        work.nchunks = (int32_t)(c > 16 ? 16 : c);
    }
    const int64_t D = p->head_dim;
    work.ldv = (D + 15) / 16 * 16 + 16;
    lampe_attn_scratch layout;
    work.scratch_bytes = lampe_attn_scratch_carve(&layout, NULL, lampe_attn_scratch_rows(work.max_rows), D, work.ldv);
    atomic_int overflow;
    atomic_init(&overflow, 0);
    work.overflow = &overflow;
    int rc = LAMPE_OK;
    if (work.nchunks > 1) {
        const size_t items = (size_t)(n_tiles * work.nchunks);
        work.part_o = (float *)malloc(items * (size_t)(work.max_rows * D) * 4);
        work.part_ml = (float *)malloc(items * (size_t)work.max_rows * 2 * 4);
        work.tile_done = (atomic_int *)malloc((size_t)n_tiles * sizeof(atomic_int));
        if (!work.part_o || !work.part_ml || !work.tile_done) rc = LAMPE_ERR_NOMEM;
        for (int64_t t = 0; rc == LAMPE_OK && t < n_tiles; t++) atomic_init(&work.tile_done[t], 0);
    }
    if (rc == LAMPE_OK && any_panels) {
        /* one key block per lampe_attn_kblock_floats(D), one value block per BK * ldv floats: room
         * for every level's tile layout (attn_tiles.h) */
        const size_t panel = (size_t)(p->kv_heads * work.nblk) * (size_t)lampe_attn_kblock_floats(D);
        work.panel_id = (float *)malloc(panel * 4);
        work.panel_map = (float *)malloc(panel * 4);
        work.vconv = (float *)malloc((size_t)(p->kv_heads * work.nblk * LAMPE_ATTN_BK * work.ldv) * 4);
        work.key_bad = (uint8_t *)malloc((size_t)(p->kv_heads * p->kv_len));
        work.block_bad = (uint8_t *)malloc((size_t)(p->kv_heads * work.nblk));
        if (!work.panel_id || !work.panel_map || !work.vconv || !work.key_bad || !work.block_bad) rc = LAMPE_ERR_NOMEM;
    }
    const int64_t C = work.nchunks, per_kind = p->kv_heads * work.nblk;
    int64_t start = 0;
    for (int64_t b = 0; b < p->batch && rc == LAMPE_OK; b++) {
        if (group_end[b] == start) continue;
        work.panel_b = b;
        /* kinds: 0 keys at true positions, 1 keys at mapped positions, 2 values as float32 */
        const int mapped = p->seqs[b].plan && !p->seqs[b].plan->fallback;
        rc = run_phase(&work, nth, 1, 0, per_kind);
        if (rc == LAMPE_OK && mapped) rc = run_phase(&work, nth, 1, per_kind, 2 * per_kind);
        if (rc == LAMPE_OK) rc = run_phase(&work, nth, 1, 2 * per_kind, 3 * per_kind);
        if (rc == LAMPE_OK) rc = run_phase(&work, nth, 0, start * C, group_end[b] * C);
        start = group_end[b];
    }
    if (rc == LAMPE_OK) rc = run_phase(&work, nth, 0, start * C, n_tiles * C);
    if (rc == LAMPE_OK && atomic_load(&overflow)) rc = LAMPE_ERR_OVERFLOW;
    free(group_end);
    free(work.key_bad);
    free(work.block_bad);
    free(work.panel_id);
    free(work.panel_map);
    free(work.vconv);
    free(work.part_o);
    free(work.part_ml);
    free(work.tile_done);
    free(work.tiles);
    return rc;
}
