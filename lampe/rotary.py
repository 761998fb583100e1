"""Rotary position embedding applied by the C kernel, with per-token integer positions."""
from __future__ import annotations

import numpy as np

from . import _C
from ._arrays import (check_out, extents_disjoint, inv_freq_array, is_torch, kernel_ready, kernel_view, layout_code,
                      refuse_grad, resolve_rotary_dim, resolve_threads, same_view)


def _shape4d(a: np.ndarray, batch_axis: bool):
    """x [..., L, Dh] as [B, M, L, Dh] (B = first axis when positions are per batch row)."""
    L, D = a.shape[-2], a.shape[-1]
    if batch_axis:
        return (a.shape[0], int(np.prod(a.shape[1:-2], dtype=np.int64)), L, D)
    return (1, int(np.prod(a.shape[:-2], dtype=np.int64)), L, D)


def _view4d(a: np.ndarray, shape):
    """a reshaped without a copy, or None when its strides do not allow it."""
    try:
        return np.reshape(a, shape, copy=False)
    except ValueError:
        return None


def rope(x, positions, inv_freq, layout: str = "half", rotary_dim=None, amplitude: float = 1.0, out=None,
         num_threads=None):
    """Rotate x [..., L, head_dim] by integer ``positions`` ([L], or [B, L] with B = x.shape[0]).

    The angle of pair k at position p is f32(f32(p) * inv_freq[k]) (as transformers computes it);
    cos and sin are multiplied by ``amplitude``. Only the first ``rotary_dim`` dims (default all)
    rotate; ``layout`` "half" pairs dim k with k + rotary_dim/2, "interleaved" pairs 2k with 2k+1.
    float32, float16 and bfloat16 (torch) in and out, float32 arithmetic. Returns a new array or
    tensor unless ``out`` is given (``out`` may be ``x`` itself, for an in-place rotation, or any
    array of x's shape and dtype whose elements are distinct and do not overlap x). No backward:
    a tensor that requires grad is refused."""
    refuse_grad("lampe.rope", "a torch rotation (e.g. transformers' apply_rotary_pos_emb)", x=x)
    if is_torch(x) and x.device.type == "cuda":  # lampe._cuda, or the pure-torch backend (lampe/cuda.py)
        from .cuda import rope as cuda_rope
        return cuda_rope(x, positions, inv_freq, layout=layout, rotary_dim=rotary_dim, amplitude=amplitude, out=out)
    xa, bf16, _ = kernel_view(x, "x")
    if xa.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., L, head_dim], got shape {tuple(xa.shape)}")
    if xa.shape[-1] < 1:
        raise ValueError("x: head_dim must be >= 1")
    if is_torch(positions):
        positions = positions.detach().to("cpu").numpy()
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    if pos.ndim not in (1, 2):
        raise ValueError(f"positions must be [L] or [B, L], got shape {pos.shape}")
    if pos.dtype.kind == "u" and pos.size and pos.max() > np.iinfo(np.int64).max:
        raise ValueError("positions overflow int64")
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    L = xa.shape[-2]
    if pos.shape[-1] != L:
        raise ValueError(f"positions must have {L} entries on its last axis (the token axis of x), got {pos.shape}")
    per_batch = pos.ndim == 2
    if per_batch and (xa.ndim < 3 or pos.shape[0] != xa.shape[0]):
        raise ValueError(f"positions [B, L] needs x of shape [B, ..., L, head_dim] with B = {pos.shape[0]}")
    rd = resolve_rotary_dim(rotary_dim, xa.shape[-1])
    freq = inv_freq_array(inv_freq, rd)
    if isinstance(amplitude, bool) or not isinstance(amplitude, (int, float, np.floating)):
        raise TypeError(f"amplitude must be a float, got {type(amplitude).__name__}")
    if not np.isfinite(amplitude):
        raise ValueError("amplitude must be finite")
    lay = layout_code(layout)
    nth = resolve_threads(num_threads)

    if out is None:
        if is_torch(x):
            import torch
            out = torch.empty(tuple(x.shape), dtype=x.dtype)
        else:
            out = np.empty(xa.shape, dtype=xa.dtype)
    oa, obf16, _ = kernel_view(out, "out")
    if obf16 != bf16 or oa.dtype != xa.dtype:
        raise TypeError("out must have the dtype of x")
    if tuple(oa.shape) != tuple(xa.shape):
        raise ValueError(f"out must have the shape of x {tuple(xa.shape)}, got {tuple(oa.shape)}")
    check_out(oa, "out", {"x": xa}, in_place_of="x")
    shape = _shape4d(xa, per_batch)
    src4 = _view4d(xa, shape) if kernel_ready(xa) else None
    if src4 is None:  # strides the kernel cannot walk (x[..., ::-1], say): read a copy
        src4 = np.ascontiguousarray(xa).reshape(shape)
    dst4 = _view4d(oa, shape) if kernel_ready(oa) else None
    if dst4 is not None and not (same_view(src4, dst4) or extents_disjoint(src4, dst4)):
        dst4 = None  # distinct elements, interleaved memory: write through a temporary
    tmp = None
    if dst4 is None:
        tmp = np.empty(shape, oa.dtype)
        dst4 = tmp
    _C.rope(src=src4, dst=dst4, positions=pos, inv_freq=freq, rotary_dim=rd, layout=lay, amplitude=float(amplitude),
            bf16=bf16, num_threads=nth)
    if tmp is not None:
        oa[...] = tmp.reshape(oa.shape)
    return out
