"""The torch custom op ``lampe::attention``: LaMPE attention that torch.compile can trace and
autograd can differentiate.

Schema (docs/patching.md; the same on every device)::

    lampe::attention(Tensor q, Tensor k, Tensor v, Tensor inv_freq, Tensor? prompt_length,
                     Tensor? key_padding_mask, Tensor? query_start, str mode, int window, int sink,
                     int mapping_length, float[] sigmoid, float temperature, float softcap,
                     int rotary_dim, bool interleaved, float scale, int num_threads) -> (Tensor, Tensor)

It returns (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32, natural log). The
configuration travels as plain numbers so the op has a static schema:

- ``mode``: "causal" (plain causal RoPE attention, amplitude 1), "lampe", "selfextend" or "rerope".
- ``mapping_length`` > 0 is a fixed U (SelfExtend: the group size); 0 means U(L) from ``sigmoid``
  = [a, b, lmax, threshold, below] (a :class:`~lampe.config.MappingSigmoid`; presets and "auto"
  are resolved to these five numbers in Python before the call).
- ``temperature`` is the amplitude s, already multiplied by the model's rotary attention_scaling.
- ``softcap`` 0.0 = none; ``rotary_dim`` 0 = head dim; ``scale`` 0.0 = 1/sqrt(D); ``num_threads``
  0 = default. Rows after the prompt always use the "shifted" decode rule.
- ``prompt_length`` and ``query_start`` are int64 [B] CPU tensors (plans are made on the host from
  these lengths) or None; ``key_padding_mask`` is bool [B, Lk] on q's device.

Registered here: the CPU kernel (the C kernel; float64 inputs run the float64 reference, so
``torch.autograd.gradcheck`` can check the backward), the fake (meta) implementation, and the
autograd formula. The backward is its own op, ``lampe::attention_backward``, which recomputes the
forward with the differentiable pure-torch backend (lampe.torch_backend) and differentiates it;
being an op keeps it opaque to torch.compile's tracing of training graphs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch

from . import _C, torch_backend
from . import config as _config
from . import reference as _reference
from .attention import attention as _kernel_attention
from .config import LampeConfig, MappingSigmoid

#: The op's modes; "causal" is config=None (plain causal RoPE attention).
OP_MODES = ("causal", "lampe", "selfextend", "rerope")
#: Query rows per recomputation in the backward (bounds its memory).
_BACKWARD_CHUNK = 128


# ------------------------------------------------------------------------------ config <-> numbers


def sigmoid_numbers(config: LampeConfig) -> list:
    """The five numbers [a, b, lmax, threshold, below] of the config's length-aware mapping length
    (a preset, "auto" or a MappingSigmoid)."""
    u = config.mapping_length
    if isinstance(u, MappingSigmoid):
        return [float(u.a), float(u.b), float(u.lmax), float(u.threshold), float(u.below)]
    if u == "auto":
        if config.pretrained_window is None:
            raise ValueError("mapping_length='auto' needs pretrained_window (the model's pretraining context)")
        p = _C.sigmoid_params("auto", int(config.pretrained_window))
    else:
        p = _C.sigmoid_params(u)
    return [float(p["a"]), float(p["b"]), float(p["lmax"]), float(p["threshold"]), float(p["below"])]


def op_numbers(config: Optional[LampeConfig]) -> tuple:
    """(mode, window, sink, mapping_length, sigmoid, temperature) of the op for a LampeConfig."""
    if config is None:
        return "causal", 1, 1, 1, [], 1.0
    if not isinstance(config, LampeConfig):
        raise TypeError(f"config must be a LampeConfig or None, got {type(config).__name__}")
    if config.decode != "shifted":
        raise NotImplementedError("lampe::attention supports decode='shifted' only")
    u = config.mapping_length
    if isinstance(u, int):
        mapping_length, sigmoid = u, []
    else:
        mapping_length, sigmoid = 0, sigmoid_numbers(config)
    return config.mode, config.window, config.sink, mapping_length, sigmoid, config.temperature


def config_from_numbers(mode: str, window: int, sink: int, mapping_length: int, sigmoid: Sequence[float],
                        temperature: float) -> Optional[LampeConfig]:
    """The LampeConfig the op's numbers stand for (None for mode "causal"). Memoised: a model
    calls the op with the same numbers in every layer and step, and building a validated config
    took ~20 us of each call (a short decode kernel takes ~100 us)."""
    return _config_from_numbers(str(mode), int(window), int(sink), int(mapping_length),
                                tuple(float(x) for x in sigmoid), float(temperature))


@functools.lru_cache(maxsize=64)
def _config_from_numbers(mode: str, window: int, sink: int, mapping_length: int, sigmoid: tuple,
                         temperature: float) -> Optional[LampeConfig]:
    if mode not in OP_MODES:
        raise ValueError(f"mode must be one of {OP_MODES}, got {mode!r}")
    if mode == "causal":
        return None
    if mapping_length > 0:
        u = int(mapping_length)
    else:
        if len(sigmoid) != 5:
            raise ValueError(f"sigmoid must hold 5 numbers [a, b, lmax, threshold, below] when mapping_length is 0, "
                             f"got {len(sigmoid)}")
        a, b, lmax, threshold, below = (float(x) for x in sigmoid)
        u = MappingSigmoid(a, b, lmax, int(threshold), int(below))
    return LampeConfig(window=int(window), sink=int(sink), mapping_length=u, mode=mode,
                       temperature=float(temperature))


def _keywords(prompt_length, key_padding_mask, query_start, softcap, rotary_dim, interleaved, scale):
    """Keyword arguments shared by lampe.attention, lampe.reference.attention and the torch backend.
    query_start and softcap are passed only when set (the kernel contract extension)."""
    kw = dict(prompt_length=prompt_length, key_padding_mask=key_padding_mask, rotary_dim=rotary_dim or None,
              layout="interleaved" if interleaved else "half", scale=scale or None)
    if query_start is not None:
        kw["query_start"] = query_start
    if softcap:
        kw["softcap"] = float(softcap)
    return kw


# ------------------------------------------------------------------------------ forward


@torch.library.custom_op("lampe::attention", mutates_args=(), device_types="cpu")
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                 prompt_length: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 query_start: Optional[torch.Tensor], mode: str, window: int, sink: int, mapping_length: int,
                 sigmoid: list[float], temperature: float, softcap: float, rotary_dim: int, interleaved: bool,
                 scale: float, num_threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = config_from_numbers(mode, window, sink, mapping_length, sigmoid, temperature)
    kw = _keywords(prompt_length, key_padding_mask, query_start, softcap, rotary_dim, interleaved, scale)
    if q.dtype == torch.float64:  # no float64 kernel: the float64 reference (for gradcheck and checks)
        out, lse = _reference.attention(q, k, v, cfg, inv_freq, return_lse=True, **kw)
        return torch.from_numpy(out), torch.from_numpy(lse).float()
    # The kernel reads any strides but needs each row contiguous.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _kernel_attention(q, k, v, config=cfg, inv_freq=inv_freq, return_lse=True, num_threads=num_threads or None,
                             **kw)


@attention_op.register_fake
def _(q, k, v, inv_freq, prompt_length, key_padding_mask, query_start, mode, window, sink, mapping_length, sigmoid,
      temperature, softcap, rotary_dim, interleaved, scale, num_threads):
    _check_shapes(q, k, v)
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D: [B, H, L, head_dim]")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must have shape [B={q.shape[0]}, Hkv, Lk, D={q.shape[3]}] and match each other")


# ------------------------------------------------------------------------------ backward


@contextlib.contextmanager
def _autograd_inside_op():
    """Let autograd record inside an op implementation: the dispatcher excludes the autograd keys
    below an op's own autograd kernel, and the backward differentiates a recomputed forward."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in dir(torch._C.DispatchKey):
        if name.startswith("Autograd") or name == "ADInplaceOrView":
            exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("lampe::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                          prompt_length: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                          query_start: Optional[torch.Tensor], mode: str, window: int, sink: int,
                          mapping_length: int, sigmoid: list[float], temperature: float, softcap: float,
                          rotary_dim: int, interleaved: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of lampe::attention: the pure-torch backend's forward, recomputed and
    differentiated (any device), _BACKWARD_CHUNK query rows at a time so that memory stays
    O(chunk x Lk) per head, never O(Lq x Lk)."""
    cfg = config_from_numbers(mode, window, sink, mapping_length, sigmoid, temperature)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    if Lq > _BACKWARD_CHUNK and query_start is None:  # each chunk needs its own first position
        off = torch.zeros(B, dtype=torch.int64)
        if key_padding_mask is not None:
            m = key_padding_mask.detach().to("cpu")
            off = torch.where(m.any(dim=1), m.to(torch.int8).argmax(dim=1), Lk).to(torch.int64)
        query_start = Lk - Lq - off
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    with _autograd_inside_op():
        kl, vl = (x.detach().requires_grad_(True) for x in (k, v))
        for t0 in range(0, Lq, _BACKWARD_CHUNK):
            t1 = min(Lq, t0 + _BACKWARD_CHUNK)
            ql = q[:, :, t0:t1].detach().requires_grad_(True)
            qs = None if query_start is None else query_start + t0
            kw = _keywords(prompt_length, key_padding_mask, qs, softcap, rotary_dim, interleaved, scale)
            out, lse = torch_backend.attention(ql, kl, vl, config=cfg, inv_freq=inv_freq, return_lse=True, **kw)
            outputs, grads = [out], [grad_out[:, :, t0:t1].to(out.dtype)]
            if grad_lse is not None:
                # Rows without keys keep lse = -inf and no graph; their gradient is zero.
                outputs.append(lse)
                grads.append(torch.where(torch.isfinite(lse), grad_lse[:, :, t0:t1].to(lse.dtype), 0.0))
            gq, gk, gv = torch.autograd.grad(outputs, (ql, kl, vl), grads, allow_unused=True)
            if gq is not None:
                dq[:, :, t0:t1] = gq.to(dq.dtype)
            if gk is not None:
                dk += gk.float()
            if gv is not None:
                dv += gv.float()
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NONTENSOR = 11  # mode .. num_threads


def _setup_context(ctx, inputs, output):
    q, k, v, inv_freq, prompt_length, key_padding_mask, query_start = inputs[:7]
    ctx.save_for_backward(q, k, v, inv_freq, prompt_length, key_padding_mask, query_start)
    ctx.numbers = inputs[7:-1]  # mode .. scale (num_threads is not needed)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, inv_freq, prompt_length, key_padding_mask, query_start = ctx.saved_tensors
    dq, dk, dv = torch.ops.lampe.attention_backward(grad_out, grad_lse, q, k, v, inv_freq, prompt_length,
                                                     key_padding_mask, query_start, *ctx.numbers)
    return (dq, dk, dv) + (None,) * (4 + _NONTENSOR)


torch.library.register_autograd("lampe::attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ Python entry point


def _host_lengths(x, B: int, name: str):
    """prompt_length / query_start as the op takes them: None or an int64 [B] CPU tensor."""
    if x is None:
        return None
    if torch.is_tensor(x):
        if x.dim() == 0:
            x = x.reshape(1).expand(B)
        return x.to(device="cpu", dtype=torch.int64)
    if isinstance(x, bool) or not hasattr(x, "__index__") and not hasattr(x, "__len__"):
        raise TypeError(f"{name} must be an int or an int64 array [B], got {type(x).__name__}")
    t = torch.as_tensor(x, dtype=torch.int64)
    return t.reshape(1).expand(B).contiguous() if t.dim() == 0 else t


def lampe_attention(q, k, v, config: Optional[LampeConfig], inv_freq, *, prompt_length=None, key_padding_mask=None,
                    query_start=None, rotary_dim=None, layout="half", scale=None, softcap=None, num_threads=None):
    """``torch.ops.lampe.attention`` called with a LampeConfig (None: plain causal RoPE attention);
    the other arguments as in :func:`lampe.attention`. Returns (out, lse)."""
    mode, window, sink, mapping_length, sigmoid, temperature = op_numbers(config)
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    if not torch.is_tensor(inv_freq):
        inv_freq = torch.as_tensor(inv_freq, dtype=torch.float32)
    B = q.shape[0]
    return torch.ops.lampe.attention(
        q, k, v, inv_freq, _host_lengths(prompt_length, B, "prompt_length"), key_padding_mask,
        _host_lengths(query_start, B, "query_start"), mode, window, sink, mapping_length, sigmoid, temperature,
        float(softcap or 0.0), int(rotary_dim or 0), layout == "interleaved", float(scale or 0.0), int(num_threads or 0))


from . import cuda as _cuda  # noqa: F401,E402  (registers the CUDA kernel or the pure-torch fallback)
