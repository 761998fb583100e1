"""Fused multi-grained attention on the CPU: the front end of the C kernel (csrc/cpu/attn_impl.h).

Same arguments and semantics as :func:`lampe.reference.attention`; NumPy arrays or torch CPU
tensors (zero-copy), float32 / float16 / bfloat16 with float32 accumulation.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import _C
from ._arrays import (inv_freq_array, is_torch, kernel_view, layout_code, resolve_rotary_dim, resolve_threads)
from .config import LampeConfig
from .positions import batch_layout, plan

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


def attention(q, k, v, *, config, inv_freq, prompt_length=None, key_padding_mask=None, rotary_dim=None,
              layout="half", scale=None, return_lse=False, num_threads=None, out=None):
    """LaMPE attention (spec §0-§2) in one fused pass with an online softmax.

    q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], un-rotated; query head h uses KV head
    h // (Hq / Hkv) (never repeated in memory); queries are the last Lq positions. A row is a
    prompt row iff its position < prompt_length (int or [B]; default Lk): a decode step after a
    prompt of length L passes prompt_length=L. ``key_padding_mask`` [B, Lk] bool, True = valid,
    left padding only. ``config=None`` is ordinary causal RoPE attention. Returns out in the
    input dtype (and lse [B, Hq, Lq] float32 when ``return_lse``)."""
    if is_torch(q) and q.device.type == "cuda":  # lampe._cuda, or the pure-torch backend (lampe/cuda.py)
        from .cuda import attention as cuda_attention
        return cuda_attention(q, k, v, config=config, inv_freq=inv_freq, prompt_length=prompt_length,
                              key_padding_mask=key_padding_mask, rotary_dim=rotary_dim, layout=layout, scale=scale,
                              return_lse=return_lse, out=out)
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
        raise NotImplementedError("decode='reference' is supported only by plan.table() / plan.regions()")
    rd = resolve_rotary_dim(rotary_dim, D)
    freq = inv_freq_array(inv_freq, rd)
    lay = layout_code(layout)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale must be finite")
    nth = resolve_threads(num_threads)
    if ka.shape[0] != B or ka.shape[3] != D or tuple(va.shape) != tuple(ka.shape):
        raise ValueError(f"k and v must have shape [B={B}, Hkv, Lk, D={D}] and match each other; got "
                         f"{tuple(ka.shape)} and {tuple(va.shape)}")
    off, own = batch_layout(B, Lq, Lk, prompt_length, key_padding_mask)
    if config is not None and config.mode != "reference" and np.any((own < Lk - off) & (off < Lk)):
        raise ValueError(f"prompt_length: mode={config.mode!r} has no rows after the prompt; every row is planned "
                         "with the total length, so leave prompt_length at its default (Lk)")

    plans, umax = [], 0
    for b in range(B):
        if config is None or off[b] >= Lk:
            plans.append(None)
            continue
        pl = plan(int(own[b]), config)
        plans.append(pl._ctuple)
        umax = max(umax, pl.mapping_length)
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
    _C.attention(qa, ka, va, oa, lse, off, plans, freq, rd, lay, config.temperature if config else 1.0, scale,
                 bf16, cos_t, sin_t, nth)
    if not return_lse:
        return out
    if is_torch(q):
        import torch
        lse = torch.from_numpy(lse)
    return out, lse
