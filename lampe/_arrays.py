"""NumPy / torch interop for the kernels: zero-copy views, dtype codes, clear argument errors.

torch tensors reach the C core as NumPy views of their memory; bfloat16 (which NumPy lacks)
travels as uint16 bits with a flag. torch is imported only if the caller already uses it.
"""
from __future__ import annotations

import math
import sys

import numpy as np

KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def _torch():
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def kernel_view(x, name: str):
    """(ndarray view, is_bf16, dtype name) of a float32/float16/bfloat16 array or CPU tensor."""
    if is_torch(x):
        t = _torch()
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU for the C kernel, got device {x.device}")
        if x.dtype == t.bfloat16:
            return x.detach().view(t.int16).numpy().view(np.uint16), True, "bfloat16"
        if x.dtype in (t.float32, t.float16):
            return x.detach().numpy(), False, str(x.dtype).replace("torch.", "")
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(x, np.ndarray):
        if x.dtype in (np.float32, np.float16):
            return x, False, str(x.dtype)
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {x.dtype}")
    raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")


def refuse_grad(fn: str, differentiable: str, **tensors):
    """Raise when a tensor needs a gradient: the C kernels have no backward, and returning a
    detached result would silently lose the gradient."""
    t = _torch()
    if t is None or not t.is_grad_enabled():
        return
    for name, x in tensors.items():
        if isinstance(x, t.Tensor) and x.requires_grad:
            raise RuntimeError(f"{name} requires grad, but {fn} has no backward (its result would carry no "
                               f"gradient); use {differentiable}, or call it under torch.no_grad()")


def kernel_ready(a: np.ndarray) -> bool:
    """Whether the C kernels can read or write ``a`` in place: rows contiguous (unit stride on the
    last axis), every stride a whole number of elements, aligned."""
    if a.size == 0:
        return True
    if not a.flags.aligned or (a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.itemsize):
        return False
    return all(st % a.itemsize == 0 for st in a.strides)


def kernel_input(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels read it: itself when :func:`kernel_ready`, else a contiguous copy (a
    reversed or strided last axis, for example)."""
    return a if kernel_ready(a) else np.ascontiguousarray(a)


def has_internal_overlap(a: np.ndarray) -> bool:
    """True unless the elements of ``a`` provably occupy distinct memory (an expanded array with a
    zero stride, for example, repeats its elements). Axes sorted by stride must each step over
    everything the smaller ones span."""
    if a.size <= 1:
        return False
    span = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < span:
            return True
        span += (n - 1) * stride
    return False


def same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """The same elements at the same indices (an in-place call)."""
    return (a.shape == b.shape and a.dtype == b.dtype and
            a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and
            all(sa == sb for sa, sb, n in zip(a.strides, b.strides, a.shape) if n > 1))


def _bounds(a: np.ndarray):
    from numpy.lib.array_utils import byte_bounds
    return byte_bounds(a)


def extents_disjoint(a: np.ndarray, b: np.ndarray) -> bool:
    if a.size == 0 or b.size == 0:
        return True
    (al, ah), (bl, bh) = _bounds(a), _bounds(b)
    return ah <= bl or bh <= al


def check_out(out: np.ndarray, name: str, inputs: dict, in_place_of: str = None) -> None:
    """Refuse an ``out`` whose elements overlap each other, or an input's (other than the input
    named ``in_place_of``, which it may be exactly: an in-place call)."""
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    if has_internal_overlap(out):
        raise ValueError(f"{name} has overlapping elements (an expanded or zero-stride array?): every element "
                         "must be written once; pass an array whose elements are distinct")
    for iname, x in inputs.items():
        if extents_disjoint(out, x) or not np.shares_memory(out, x):
            continue
        if iname == in_place_of and same_view(out, x):
            continue
        what = f"be {iname} itself or not overlap it" if iname == in_place_of else f"not overlap {iname}"
        raise ValueError(f"{name} must {what}")


def empty_like_kernel(x, shape):
    """A new array/tensor of x's kind and dtype, plus its kernel view."""
    if is_torch(x):
        t = _torch()
        out = t.empty(shape, dtype=x.dtype)
        return out, kernel_view(out, "out")[0]
    out = np.empty(shape, dtype=x.dtype)
    return out, out


def as_float64(x, name: str) -> np.ndarray:
    """Any real array or tensor as float64 NumPy (for the reference)."""
    if is_torch(x):
        if x.is_complex():
            raise TypeError(f"{name} must be real")
        x = x.detach().to("cpu").double().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def inv_freq_array(inv_freq, rotary_dim: int) -> np.ndarray:
    """inv_freq as a contiguous float32 array of rotary_dim / 2 entries."""
    if is_torch(inv_freq):
        inv_freq = inv_freq.detach().to("cpu").float().numpy()
    f = np.asarray(inv_freq)
    if f.dtype.kind not in "fiu":
        raise TypeError(f"inv_freq must be real, got dtype {f.dtype}")
    if f.ndim != 1:
        raise ValueError(f"inv_freq must be 1-D [rotary_dim/2], got shape {f.shape}")
    f = np.ascontiguousarray(f, dtype=np.float32)
    if f.shape[0] != rotary_dim // 2:
        raise ValueError(f"inv_freq must have rotary_dim/2 = {rotary_dim // 2} entries, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError("inv_freq must be finite")
    return f


def resolve_rotary_dim(rotary_dim, head_dim: int) -> int:
    if rotary_dim is None:
        return head_dim
    if isinstance(rotary_dim, bool) or not hasattr(rotary_dim, "__index__"):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    rotary_dim = int(rotary_dim)
    if rotary_dim < 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    return rotary_dim


def resolve_softcap(softcap) -> float:
    """Logit soft-capping value for the kernels: None or 0 = none, else a finite number > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    cap = float(softcap)
    if not (math.isfinite(cap) and 0.0 <= cap <= 3.4e38):  # float32 in the kernels
        raise ValueError(f"softcap must be a finite number > 0 (or None / 0 for none), got {softcap}")
    return cap


LAYOUTS = {"half": 0, "interleaved": 1}


def layout_code(layout) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    return LAYOUTS[layout]


def resolve_threads(num_threads) -> int:
    """0 lets the C core decide: LAMPE_NUM_THREADS, torch's setting when torch is loaded, else
    the affinity count."""
    if num_threads is None:
        import os
        if os.environ.get("LAMPE_NUM_THREADS"):
            return 0
        t = _torch()
        if t is not None:
            return max(1, int(t.get_num_threads()))
        return 0
    if isinstance(num_threads, bool) or not hasattr(num_threads, "__index__"):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    n = int(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return n
