"""Fused multi-grained attention on the CPU: the front end of the C kernel (csrc/cpu/attn_impl.h).

Same arguments and semantics as :func:`lampe.reference.attention`; NumPy arrays or torch CPU
tensors (zero-copy where the layout allows), float32 / float16 / bfloat16 with float32
accumulation. No backward: tensors that require grad are refused (the differentiable path is
:func:`lampe.torch_ops.lampe_attention`).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import _C
from ._arrays import (check_out, extents_disjoint, inv_freq_array, is_torch, kernel_input, kernel_ready, kernel_view,
                      layout_code, refuse_grad, resolve_rotary_dim, resolve_softcap, resolve_threads)
from .config import LampeConfig
from .positions import batch_layout, row_plans

#: The cos/sin tables kept between calls (decode steps reuse them) hold at most this many bytes.
TABLE_CACHE_BYTES = 256 << 20
_TABLES: "OrderedDict[bytes, tuple]" = OrderedDict()


def table_cache_bytes() -> int:
    return sum(c.nbytes + s.nbytes for c, s in _TABLES.values())


def rope_table(inv_freq: np.ndarray, length: int):
    """cos/sin of f32(f32(p) * inv_freq) for p < n (evaluated in float64, stored float32), n the
    power of two >= length (at least 1024), so that decode steps do no trigonometry. Tables are
    kept per inv_freq, least recently used first out, within TABLE_CACHE_BYTES; a longer table
    than that is made for the call and not kept."""
    key = inv_freq.tobytes()
    hit = _TABLES.get(key)
    if hit is not None and hit[0].shape[0] >= length:
        _TABLES.move_to_end(key)
        return hit
    n = 1 << max(10, int(length - 1).bit_length())
    ang = (np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    tab = (np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
    _TABLES.pop(key, None)
    if 2 * tab[0].nbytes <= TABLE_CACHE_BYTES:
        _TABLES[key] = tab
    while _TABLES and table_cache_bytes() > TABLE_CACHE_BYTES:
        _TABLES.popitem(last=False)
    return tab


def table_length(rows, plans, q_len: int, kv_len: int) -> int:
    """How many positions the cos/sin table covers: every position the call uses (true key
    positions, query positions, mapped positions), unless those are sparse (a mapping length far
    beyond the input: U = 2^24 on 20 tokens uses 20 mapped positions up to 2^24); positions past
    the table are computed on the fly, so capping it costs time, never correctness."""
    top = max(kv_len, int(np.max(rows.query_start, initial=0)) + q_len)
    for pl in plans:
        if pl is not None:  # the largest query position of the map region is m[L-1] + b1
            top = max(top, int(pl.mapped_ids[-1]) + max(pl.bias_map, 0) + pl.window + 1)
    return min(top, 4 * (kv_len + q_len) + 1024)


def _check_heads(B, Hq, Hkv, Lq, Lk, D, k_shape, v_shape):
    if D < 1:
        raise ValueError("q, k, v: head_dim must be >= 1, got 0")
    if k_shape[0] != B or k_shape[3] != D or tuple(v_shape) != tuple(k_shape):
        raise ValueError(f"k and v must have shape [B={B}, Hkv, Lk, D={D}] and match each other; got "
                         f"{tuple(k_shape)} and {tuple(v_shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads "
                         f"({Hkv})")
    if Hq // Hkv > _C.MAX_GROUP:
        raise ValueError(f"q has {Hq} heads for {Hkv} key/value heads: {Hq // Hkv} query heads per key/value head is "
                         f"above the supported maximum {_C.MAX_GROUP}")


def attention(q, k, v, *, config, inv_freq, prompt_length=None, key_padding_mask=None, query_start=None,
              rotary_dim=None, layout="half", scale=None, softcap=None, return_lse=False, num_threads=None,
              out=None):
    """LaMPE attention (spec §0-§2) in one fused pass with an online softmax.

    q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], un-rotated; query head h uses KV head
    h // (Hq / Hkv) (never repeated in memory). Positions count from each row's first valid key.
    ``key_padding_mask`` [B, Lk] bool, True = valid, each row False* True* False* (left pads, valid
    keys, slots never attended such as right padding or a static cache's unused tail).
    ``query_start`` (int or [B]; default: the queries are the last Lq positions) is the position
    of query row 0; a query attends the valid keys at positions <= its own. A row is a prompt row
    iff its position < prompt_length (int or [B], in key indices; default: every valid key is
    prompt): a decode step after a prompt of length L passes prompt_length=L. ``softcap`` (Gemma 2)
    caps every logit x at softcap * tanh(x / softcap). ``config=None`` is ordinary causal RoPE
    attention. A row that attends a NaN or inf element gives NaN (lse NaN); logits that overflow
    float32 raise a ValueError naming ``scale``. Returns out in the input dtype (and lse
    [B, Hq, Lq] float32 when ``return_lse``); ``out=`` may be any array or tensor of that shape and
    dtype whose elements are distinct and overlap none of q, k, v."""
    refuse_grad("lampe.attention", "lampe.torch_ops.lampe_attention (differentiable)", q=q, k=k, v=v)
    if is_torch(q) and q.device.type == "cuda":  # lampe._cuda, or the pure-torch backend (lampe/cuda.py)
        from .cuda import attention as cuda_attention
        return cuda_attention(q, k, v, config=config, inv_freq=inv_freq, prompt_length=prompt_length,
                              key_padding_mask=key_padding_mask, query_start=query_start, rotary_dim=rotary_dim,
                              layout=layout, scale=scale, softcap=softcap, return_lse=return_lse,
                              num_threads=num_threads, out=out)
    qa, bf16, dname = kernel_view(q, "q")
    ka, kbf, kname = kernel_view(k, "k")
    va, vbf, vname = kernel_view(v, "v")
    if (kname, vname) != (dname, dname):
        raise TypeError(f"q, k and v must share one dtype, got {dname}, {kname}, {vname}")
    if is_torch(q) != is_torch(k) or is_torch(q) != is_torch(v):
        raise TypeError("q, k and v must all be numpy arrays or all torch tensors")
    for name, a in (("q", qa), ("k", ka), ("v", va)):
        if a.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, head_dim], got shape {tuple(a.shape)}")
    B, Hq, Lq, D = qa.shape
    Hkv, Lk = ka.shape[1], ka.shape[2]
    _check_heads(B, Hq, Hkv, Lq, Lk, D, ka.shape, va.shape)
    if config is not None and not isinstance(config, LampeConfig):
        raise TypeError(f"config must be a LampeConfig or None, got {type(config).__name__}")
    if config is not None and config.decode != "shifted":
        raise NotImplementedError(f"decode={config.decode!r} is supported only by plan.table() / plan.regions()")
    rd = resolve_rotary_dim(rotary_dim, D)
    freq = inv_freq_array(inv_freq, rd)
    lay = layout_code(layout)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale must be finite")
    cap = resolve_softcap(softcap)
    nth = resolve_threads(num_threads)
    rows = batch_layout(B, Lq, Lk, prompt_length, key_padding_mask, query_start)
    plans = row_plans(config, rows, Lq)
    cos_t, sin_t = rope_table(freq, table_length(rows, plans, Lq, Lk)) if rd else (None, None)

    fresh = out is None  # allocated here: contiguous, overlapping nothing (no checks needed)
    if fresh:
        if is_torch(q):
            import torch
            out = torch.empty((B, Hq, Lq, D), dtype=q.dtype)
        else:
            out = np.empty((B, Hq, Lq, D), dtype=qa.dtype)
    oa, _, oname = kernel_view(out, "out")
    if oname != dname:
        raise TypeError(f"out must have dtype {dname}, got {oname}")
    if tuple(oa.shape) != (B, Hq, Lq, D):
        raise ValueError(f"out must have shape {(B, Hq, Lq, D)}, got {tuple(oa.shape)}")
    if not fresh:
        check_out(oa, "out", {"q": qa, "k": ka, "v": va})
    qa, ka, va = kernel_input(qa), kernel_input(ka), kernel_input(va)
    # the kernel writes rows with unit stride, away from every input's extent; else a temporary
    direct = fresh or (kernel_ready(oa) and all(extents_disjoint(oa, x) for x in (qa, ka, va)))
    dst = oa if direct else np.empty(oa.shape, oa.dtype)
    lse = np.empty((B, Hq, Lq), dtype=np.float32) if return_lse else None
    _C.attention(q=qa, k=ka, v=va, out=dst, lse=lse, inv_freq=freq, rope_cos=cos_t, rope_sin=sin_t,
                 key_offsets=rows.key_offset, key_counts=rows.key_count, query_starts=rows.query_start,
                 plans=plans, rotary_dim=rd, layout=lay, amplitude=config.temperature if config else 1.0,
                 scale=scale, softcap=cap, bf16=bf16, num_threads=nth)
    if not direct:
        oa[...] = dst
    if not return_lse:
        return out
    if is_torch(q):
        import torch
        lse = torch.from_numpy(lse)
    return out, lse
