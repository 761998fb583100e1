"""The executable specification: float64 NumPy multi-grained attention, slow and obviously
correct. Every query row materialises its (region, key) visits with explicit positions, rotates
query and keys by those positions, and takes one softmax over the multiset of visits.

The C kernels (lampe.attention) are tested against this module.
"""
from __future__ import annotations

import math

import numpy as np

from ._arrays import as_float64, inv_freq_array, layout_code, resolve_rotary_dim, resolve_softcap
from .config import LampeConfig
from .positions import batch_layout, row_plans


def rotate(x: np.ndarray, pos, inv_freq: np.ndarray, rotary_dim: int, layout: str, amplitude: float):
    """float64 rotation of x [..., n, D] by integer positions pos [n] (float32 angles, spec §0)."""
    pos = np.asarray(pos, dtype=np.int64)
    ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32)  # f32(f32(p) * f)
    c = np.cos(ang.astype(np.float64)) * amplitude
    s = np.sin(ang.astype(np.float64)) * amplitude
    out = np.array(x, dtype=np.float64, copy=True)
    h = rotary_dim // 2
    if layout == "half":
        x1, x2 = x[..., :h], x[..., h:rotary_dim]
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    r1 = x1 * c - x2 * s
    r2 = x2 * c + x1 * s
    if layout == "half":
        out[..., :h], out[..., h:rotary_dim] = r1, r2
    else:
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = r1, r2
    return out


def attention(q, k, v, config, inv_freq, *, prompt_length=None, key_padding_mask=None, query_start=None,
              rotary_dim=None, layout="half", scale=None, softcap=None, return_lse=False):
    """LaMPE attention in float64 (spec §0-§2). q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], all
    un-rotated; query head h uses KV head h // (Hq / Hkv). ``key_padding_mask``, ``query_start``
    and ``prompt_length`` place each row's keys and queries as in :func:`lampe.attention`: query
    row t has position query_start + t and attends the valid keys at positions <= its own, through
    its plan's regions. ``softcap`` turns every logit x into softcap * tanh(x / softcap).
    ``config=None`` is ordinary causal RoPE attention (amplitude 1). Returns out [B, Hq, Lq, D]
    float64 (and lse [B, Hq, Lq], natural log, when ``return_lse``). A row without valid keys
    gives zeros and lse = -inf. A row that attends a NaN or +-inf element (its own query, or the
    key or value of a key it attends) gives NaN in every component and lse = NaN; elements of
    keys it does not attend (padding, slots past the valid keys, the future) never affect it."""
    q = as_float64(q, "q")
    k = as_float64(k, "k")
    v = as_float64(v, "v")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must be 4-D: [B, H, L, head_dim]")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must have shape [B={B}, Hkv, Lk, D={D}] and match each other")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    if config is not None and not isinstance(config, LampeConfig):
        raise TypeError(f"config must be a LampeConfig or None, got {type(config).__name__}")
    layout_code(layout)
    rd = resolve_rotary_dim(rotary_dim, D)
    freq = inv_freq_array(inv_freq, rd)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cap = resolve_softcap(softcap)
    amp = config.temperature if config is not None else 1.0
    rows = batch_layout(B, Lq, Lk, prompt_length, key_padding_mask, query_start)
    plans = row_plans(config, rows, Lq)
    G = Hq // Hkv
    heads = np.arange(Hq) // G

    out = np.zeros((B, Hq, Lq, D))
    lse = np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        o, n = int(rows.key_offset[b]), int(rows.key_count[b])
        kb, vb = k[b, :, o:o + n], v[b, :, o:o + n]  # the row's valid keys, positions 0..n-1
        if n == 0:
            continue
        pl = plans[b]
        rot_cache = {}
        # NaN policy: a row that attends a NaN or inf element of q, k or v outputs NaN (lse NaN)
        key_bad = ~(np.isfinite(kb).all(axis=-1) & np.isfinite(vb).all(axis=-1))  # [Hkv, n]

        def rotated_keys(mapped, shift):
            # Keys rotated once per key-position rule, then sliced per row.
            key = (mapped, shift)
            if key not in rot_cache:
                if mapped:
                    src = np.arange(n) - shift
                    ok = (src >= 0) & (src < pl.length)  # keys outside never enter the region
                    kpos = np.zeros(n, dtype=np.int64)
                    kpos[ok] = pl.mapped_ids[src[ok]]
                else:
                    kpos = np.arange(n)
                rot_cache[key] = rotate(kb, kpos, freq, rd, layout, amp)
            return rot_cache[key]

        for t in range(Lq):
            pos = int(rows.query_start[b]) + t
            if pos < 0:
                continue
            if pl is None:
                regions = [("full", 0, pos, pos, False, 0)]
            else:
                regions = [(r.name, r.key_lo, r.key_hi, r.qpos, r.mapped, r.shift) for r in pl.regions(pos)]
            logits, values = [], []
            attended = np.zeros(n, dtype=bool)
            with np.errstate(invalid="ignore", over="ignore"):
                for _, lo, hi, qpos, mapped, shift in regions:
                    hi = min(hi, n - 1)  # keys past the valid ones are never attended
                    if lo > hi:
                        continue
                    attended[lo:hi + 1] = True
                    kr = rotated_keys(mapped, shift)[:, lo:hi + 1]           # [Hkv, n_r, D]
                    qr = rotate(q[b, :, t][:, None, :], [qpos], freq, rd, layout, amp)[:, 0]  # [Hq, D]
                    x = np.einsum("hd,hnd->hn", qr, kr[heads]) * scale
                    logits.append(cap * np.tanh(x / cap) if cap else x)
                    values.append(vb[heads][:, lo:hi + 1])
                if not logits:
                    continue
                s = np.concatenate(logits, axis=1)
                vals = np.concatenate(values, axis=1)
                mx = s.max(axis=1, keepdims=True)
                p = np.exp(s - mx)
                tot = p.sum(axis=1, keepdims=True)
                out[b, :, t] = np.einsum("hn,hnd->hd", p / tot, vals)
                lse[b, :, t] = (mx + np.log(tot))[:, 0]
            bad = ~np.isfinite(q[b, :, t]).all(axis=-1) | key_bad[heads][:, attended].any(axis=-1)  # [Hq]
            out[b, bad, t] = np.nan
            lse[b, bad, t] = np.nan
    return (out, lse) if return_lse else out
