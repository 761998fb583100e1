"""Fused multi-grained attention on the CPU: the front end of the C kernel (csrc/cpu/attn_impl.h).

Same arguments and semantics as :func:`lampe.reference.attention`; NumPy arrays or torch CPU
tensors (zero-copy), float32 / float16 / bfloat16 with float32 accumulation.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import _C
from ._arrays import (inv_freq_array, is_torch, kernel_view, layout_code, resolve_rotary_dim, resolve_softcap,
                      resolve_threads)
from .config import LampeConfig
from .positions import batch_layout, row_plans

_TABLES: "OrderedDict[bytes, tuple]" = OrderedDict()
_TABLE_SLOTS = 4


def rope_table(inv_freq: np.ndarray, length: int):
    """cos/sin of f32(f32(p) * inv_freq) for p < length (evaluated in float64, stored float32),
    cached per inv_freq and grown in powers of two, so decode steps do no trigonometry."""
    key = inv_freq.tobytes()
    hit = _TABLES.get(key)
    if hit is not None and hit[0].shape[0] >= length:
        _TABLES.move_to_end(key)
        return hit
    n = 1 << max(10, int(length - 1).bit_length())
    ang = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]
    tab = (np.ascontiguousarray(np.cos(ang.astype(np.float64)), dtype=np.float32),
           np.ascontiguousarray(np.sin(ang.astype(np.float64)), dtype=np.float32))
    _TABLES[key] = tab
    while len(_TABLES) > _TABLE_SLOTS:
        _TABLES.popitem(last=False)
    return tab


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
    attention. Returns out in the input dtype (and lse [B, Hq, Lq] float32 when ``return_lse``)."""
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
    if config is not None and not isinstance(config, LampeConfig):
        raise TypeError(f"config must be a LampeConfig or None, got {type(config).__name__}")
    if config is not None and config.decode != "shifted":
        raise NotImplementedError(f"decode={config.decode!r} is supported only by plan.table() / plan.regions()")
    rd = resolve_rotary_dim(rotary_dim, D)
    freq = inv_freq_array(inv_freq, rd)
    lay = layout_code(layout)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale must be finite")
    cap = resolve_softcap(softcap)
    nth = resolve_threads(num_threads)
    if ka.shape[0] != B or ka.shape[3] != D or tuple(va.shape) != tuple(ka.shape):
        raise ValueError(f"k and v must have shape [B={B}, Hkv, Lk, D={D}] and match each other; got "
                         f"{tuple(ka.shape)} and {tuple(va.shape)}")
    rows = batch_layout(B, Lq, Lk, prompt_length, key_padding_mask, query_start)
    plans = row_plans(config, rows, Lq)
    umax = max((pl.mapping_length for pl in plans if pl is not None), default=0)
    cos_t, sin_t = rope_table(freq, max(Lk, umax + 1)) if rd else (None, None)

    if out is None:
        if is_torch(q):
            import torch
            out = torch.empty((B, Hq, Lq, D), dtype=q.dtype)
        else:
            out = np.empty((B, Hq, Lq, D), dtype=qa.dtype)
    oa, obf, oname = kernel_view(out, "out")
    if oname != dname:
        raise TypeError(f"out must have dtype {dname}, got {oname}")
    if tuple(oa.shape) != (B, Hq, Lq, D):
        raise ValueError(f"out must have shape {(B, Hq, Lq, D)}, got {tuple(oa.shape)}")
    lse = np.empty((B, Hq, Lq), dtype=np.float32) if return_lse else None
    _C.attention(qa, ka, va, oa, lse, rows.key_offset, rows.key_count, rows.query_start,
                 [pl._ctuple if pl is not None else None for pl in plans], freq, rd, lay,
                 config.temperature if config else 1.0, scale, cap, bf16, cos_t, sin_t, nth)
    if not return_lse:
        return out
    if is_torch(q):
        import torch
        lse = torch.from_numpy(lse)
    return out, lse
