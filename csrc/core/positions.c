/*
 * The LaMPE position planner: mapped ids (§1.1), extended sink (§1.2), offsets (§1.3), the
 * regions of any query row (§2.1 prompt rows, §0 rows after the prompt) and the scaled-sigmoid
 * mapping length (§4). Every kernel takes positions from here, never re-derives them.
 */
#include <math.h>
#include <string.h>

#include "lampe/lampe.h"

const char *lampe_status_string(int status)
{
    switch (status) {
    case LAMPE_OK: return "ok";
    case LAMPE_ERR_ARG: return "invalid argument";
    case LAMPE_ERR_SINK: return "sink: the extended sink R must satisfy 1 <= R <= L - window";
    case LAMPE_ERR_LENGTH:
        return "a length above the supported maximum: prompts (plans) of up to 2^24 tokens, where the float32 mapping "
               "is exact, and positions below 2^25";
    case LAMPE_ERR_DECODE_RANGE: return "decode='authors' is defined only for the first `window` steps after the prompt";
    case LAMPE_ERR_NOMEM: return "out of memory";
    case LAMPE_ERR_UNSUPPORTED: return "not supported on this CPU or build";
    case LAMPE_ERR_OVERFLOW: return "scale: a logit overflows float32 (scale * <q, k> beyond 3.4e38)";
    default: return "unknown error";
    }
}

int lampe_mapped_ids(int64_t length, int64_t mapping_length, int64_t *m)
{
    if (length < 1 || mapping_length < 0 || !m) return LAMPE_ERR_ARG;
    if (length > LAMPE_MAX_LENGTH || mapping_length > LAMPE_MAX_LENGTH) return LAMPE_ERR_LENGTH;
    if (length == 1) { /* the authors' guard: a single position maps to 0 */
        m[0] = 0;
        return LAMPE_OK;
    }
    /* torch evaluates `U / tensor` as reciprocal(tensor) * U, all in binary32; the volatile
     * stores keep each product rounded to float even if a compiler would fuse or widen. */
    volatile float inv = 1.0f / (float)(length - 1);
    volatile float r = inv * (float)mapping_length;
    for (int64_t p = 0; p < length; p++) {
        float v = r * (float)p;
        m[p] = (int64_t)floorf(v);
    }
    return LAMPE_OK;
}

int lampe_plan_make(lampe_plan *plan, int64_t L, int64_t H, int64_t T, int64_t U, int mode,
                    int decode, int64_t *m)
{
    if (!plan || !m) return LAMPE_ERR_ARG;
    if (L < 1 || H < 1 || T < 1 || U < 1) return LAMPE_ERR_ARG;
    if (mode != LAMPE_MODE_LAMPE && mode != LAMPE_MODE_SELFEXTEND && mode != LAMPE_MODE_REROPE)
        return LAMPE_ERR_ARG;
    if (decode != LAMPE_DECODE_SHIFTED && decode != LAMPE_DECODE_AUTHORS) return LAMPE_ERR_ARG;
    if (L > LAMPE_MAX_LENGTH || U > LAMPE_MAX_LENGTH || H > LAMPE_MAX_LENGTH ||
        T > LAMPE_MAX_LENGTH)
        return LAMPE_ERR_LENGTH;
    memset(plan, 0, sizeof(*plan));
    plan->length = L;
    plan->window = H;
    plan->sink = T;
    plan->mapping_length = U;
    plan->mode = mode;
    plan->decode = decode;
    plan->mapped_ids = m;
    if (mode != LAMPE_MODE_LAMPE) { /* baselines: fixed position maps, no sink, no offsets */
        for (int64_t p = 0; p < L; p++) m[p] = mode == LAMPE_MODE_SELFEXTEND ? p / U : 0;
        return LAMPE_OK;
    }
    int st = lampe_mapped_ids(L, U, m);
    if (st != LAMPE_OK) return st;
    plan->fallback = L < 2 * H;

    /* §1.2: R is the last index of the chunk holding index T, then used as a count. */
    int64_t R = T;
    while (R + 1 < L && m[R] == m[R + 1]) R++;
    plan->sink_size = R;

    /* §1.3, only when L > H. In a fallback plan L-1-R may be negative: no b2 then. */
    if (L > H) {
        plan->bias_map = H - (m[H] + 1);
        int64_t idx = L - 1 - R;
        plan->bias_sink = (idx >= 0) ? idx - m[idx] - plan->bias_map : 0;
    }
    if (!plan->fallback && (R < 1 || R > L - H)) return LAMPE_ERR_SINK;
    return LAMPE_OK;
}

static void put(lampe_region *out, int *n, int kind, int mapped, int64_t lo, int64_t hi,
                int64_t qpos, int64_t shift)
{
    if (lo > hi) return;
    lampe_region *r = &out[(*n)++];
    r->kind = kind;
    r->mapped = mapped;
    r->key_lo = lo;
    r->key_hi = hi;
    r->qpos = qpos;
    r->shift = shift;
}

int lampe_plan_regions(const lampe_plan *pl, int64_t i, lampe_region *out, int *count)
{
    if (!pl || !out || !count || i < 0) return LAMPE_ERR_ARG;
    if (i >= LAMPE_MAX_POSITIONS) return LAMPE_ERR_LENGTH;
    *count = 0;
    const int64_t L = pl->length, H = pl->window, R = pl->sink_size;
    const int64_t b1 = pl->bias_map, b2 = pl->bias_sink;
    const int64_t *m = pl->mapped_ids;

    if (pl->mode != LAMPE_MODE_LAMPE) {
        if (i >= L) return LAMPE_ERR_ARG; /* baselines plan the total length: no rows after it */
        const int64_t lo = i - H + 1;
        put(out, count, LAMPE_REGION_LOCAL, 0, lo > 0 ? lo : 0, i, i, 0);
        const int64_t q = pl->mode == LAMPE_MODE_SELFEXTEND ? i / pl->mapping_length + H - H / pl->mapping_length : H;
        put(out, count, LAMPE_REGION_MAP, 1, 0, i - H, q, 0);
        return LAMPE_OK;
    }
    if (pl->fallback) { /* §2.2 / §2.4 */
        put(out, count, LAMPE_REGION_FULL, 0, 0, i, i, 0);
        return LAMPE_OK;
    }
    if (i < L) { /* §2.1: duplicated keys at d = H and d = L - R are deliberate */
        put(out, count, LAMPE_REGION_LOCAL, 0, i - H > 0 ? i - H : 0, i, i, 0);
        if (i >= H) {
            int64_t lo = i - (L - R);
            put(out, count, LAMPE_REGION_MAP, 1, lo > 0 ? lo : 0, i - H, m[i] + b1, 0);
        }
        if (i >= L - R) put(out, count, LAMPE_REGION_SINK, 0, 0, i - (L - R), i - b2, 0);
        return LAMPE_OK;
    }
    /* §0 / §2.3: a row after the prompt, step D; an exact partition of 0..i. */
    const int64_t D = i - L + 1;
    int64_t shift = D;
    if (pl->decode == LAMPE_DECODE_AUTHORS) {
        if (D > H) { /* the authors' kpos = m[j] would read past m[L-1] */
            *count = 0;
            return LAMPE_ERR_DECODE_RANGE;
        }
        shift = 0;
    }
    put(out, count, LAMPE_REGION_LOCAL, 0, i - H + 1, i, i, 0);
    put(out, count, LAMPE_REGION_MAP, 1, R + D, i - H, m[L - 1] + b1, shift);
    put(out, count, LAMPE_REGION_SINK, 0, 0, R + D - 1, i - b2, 0);
    return LAMPE_OK;
}

/* ------------------------------------------------------------------ §4 mapping length */

int lampe_sigmoid_preset(const char *name, lampe_sigmoid *s)
{
    if (!name || !s) return LAMPE_ERR_ARG;
    /* The authors' constants (their remap_uselen; docs/mapping_length.md), digit for digit. */
    if (!strcmp(name, "llama2")) {
        *s = (lampe_sigmoid){8.673006440952035e-05, -0.648012322406978, 2489.1055552214357, 8192, 1536};
    } else if (!strcmp(name, "llama3")) {
        *s = (lampe_sigmoid){0.00010493097327094324, -2.466638011138158, 6204.409324666837, 8192, 1536};
    } else if (!strcmp(name, "mistral")) {
        *s = (lampe_sigmoid){0.00010493097327094324, -2.466638011138158, 24576.0, 8192, 1536};
    } else if (!strcmp(name, "llama3.1")) {
        *s = (lampe_sigmoid){4.505261149632588e-05, -2.788576860718702, 82358.52413056031, 0, 0};
    } else {
        return LAMPE_ERR_ARG;
    }
    return LAMPE_OK;
}

int64_t lampe_sigmoid_eval(const lampe_sigmoid *s, int64_t length)
{
    if (s->threshold > 0 && length < s->threshold) return s->below;
    double u = s->lmax / (1.0 + exp(-(s->a * (double)length + s->b)));
    if (!(u >= 1.0)) return 1; /* never map onto nothing (and no NaN cast) */
    if (u > (double)LAMPE_MAX_LENGTH) return LAMPE_MAX_LENGTH;
    return (int64_t)u;
}

/*
 * Generic rule: the llama3 preset expressed in units of the pretrained window W (llama3's W is
 * 8192): a = 0.8596 / W, b unchanged, Lmax = 0.7574 W. It is continuous (no threshold), gives
 * U(W) ~ 0.127 W at the window and approaches 0.757 W for inputs many windows long, so the
 * largest relative position H + U + R stays inside the pretrained window whenever
 * H + R <= 0.24 W. See docs/mapping_length.md.
 */
int lampe_sigmoid_generic(int64_t W, lampe_sigmoid *s)
{
    if (!s || W < 16) return LAMPE_ERR_ARG;
    if (W > LAMPE_MAX_LENGTH) return LAMPE_ERR_LENGTH;
    const double a3 = 0.00010493097327094324, b3 = -2.466638011138158, l3 = 6204.409324666837;
    s->a = a3 * 8192.0 / (double)W;
    s->b = b3;
    s->lmax = l3 / 8192.0 * (double)W;
    s->threshold = 0;
    s->below = 0;
    return LAMPE_OK;
}
