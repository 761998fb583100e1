"""lampe on NVIDIA GPUs: the optional extension ``lampe._cuda`` and its fallbacks.

Importing this module never fails. It loads ``lampe._cuda`` when it was built (``LAMPE_CUDA=1``,
see docs/cuda.md) against the torch that is imported now; otherwise it warns once (a module built
for another torch) and every CUDA tensor goes through the pure-torch backend
(lampe.torch_backend), exactly as before the extension existed. It also

- defines ``lampe_cuda::attention_torch``, the pure-torch implementation of the
  ``lampe::attention`` schema, which the C++ kernel calls for what it does not cover (float32,
  head dims other than 64/128/256, rotary dims it cannot pair);
- gives ``lampe::attention`` (lampe/torch_ops.py) its CUDA kernel: the C++ one when ``_cuda``
  loaded, else that pure-torch fallback - but only when the op has the schema of
  docs/cuda.md, so an older op is left as it was;
- serves ``lampe.attention`` / ``lampe.rope`` for CUDA tensors (:func:`attention`,
  :func:`rope`) and ``lampe.show_config()`` (:func:`info`).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Optional

import numpy as np

try:
    import torch
except ImportError:  # the NumPy-only package: nothing to do here
    torch = None

_cuda = None
_reason = "torch is not installed" if torch is None else "not built (install with LAMPE_CUDA=1, docs/cuda.md)"
_warned = set()

#: The op schema lampe._cuda implements (lampe/torch_ops.py, docs/cuda.md).
SCHEMA_ARGS = ("(Tensor q, Tensor k, Tensor v, Tensor inv_freq, Tensor? prompt_length, Tensor? key_padding_mask, "
               "Tensor? query_start, str mode, int window, int sink, int mapping_length, float[] sigmoid, "
               "float temperature, float softcap, int rotary_dim, bool interleaved, float scale, int num_threads) "
               "-> (Tensor, Tensor)")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load() -> None:
    global _cuda, _reason
    if torch is None:
        return
    import importlib.util
    if importlib.util.find_spec(__name__.rsplit(".", 1)[0] + "._cuda") is None:
        return  # never built: silent until a CUDA tensor arrives
    try:
        from . import _cuda as mod
    except ImportError as exc:
        _reason = f"lampe._cuda failed to load ({exc}); it was probably built against another torch"
        _warn_once("load", f"lampe: {_reason}. CUDA tensors use the pure-torch backend; rebuild with "
                           "`LAMPE_CUDA=1 pip install --no-build-isolation --no-deps .`")
        return
    except OSError as exc:  # undefined symbols of another torch ABI, missing libcudart, ...
        _reason = f"lampe._cuda failed to load ({exc})"
        _warn_once("load", f"lampe: {_reason}. CUDA tensors use the pure-torch backend; rebuild with "
                           "`LAMPE_CUDA=1 pip install --no-build-isolation --no-deps .`")
        return
    built = str(getattr(mod, "TORCH_VERSION", "unknown"))
    if built != torch.__version__:
        _reason = f"lampe._cuda was built against torch {built}, but torch {torch.__version__} is imported"
        _warn_once("version", f"lampe: {_reason}. CUDA tensors use the pure-torch backend; rebuild with "
                              "`LAMPE_CUDA=1 pip install --no-build-isolation --no-deps .`")
        return
    _cuda = mod
    _reason = "built"
    _register_fakes()


def _register_fakes() -> None:
    """Shapes of lampe_cuda's ops for torch.compile / opcheck (the kernels allocate nothing else)."""
    try:
        @torch.library.register_fake("lampe_cuda::attention")
        def _(q, k, v, *args):
            B, Hq, Lq, D = q.shape
            return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)

        @torch.library.register_fake("lampe_cuda::rope")
        def _(x, positions, inv_freq, rotary_dim, interleaved, amplitude):
            return torch.empty_like(x, memory_format=torch.contiguous_format)
    except (AttributeError, RuntimeError):  # torch < 2.4: no fake registration, eager use only
        pass


def available() -> bool:
    """True when lampe._cuda is loaded and usable (CUDA tensors then run lampe's kernels)."""
    return _cuda is not None


# ---------------------------------------------------------------------------- op arguments


def _config_mode(name: str) -> str:
    """LampeConfig's spelling of LaMPE itself ("lampe", formerly "reference")."""
    from .config import MODES
    return name if name in MODES else ("lampe" if "lampe" in MODES else "reference")


def op_numbers(config, pretrained_window=None):
    """(mode, window, sink, mapping_length, sigmoid, temperature) of the lampe::attention schema
    for a LampeConfig or None (plain causal). Presets and "auto" become the five sigmoid numbers."""
    if config is None:
        return "causal", 1, 1, 1, [], 1.0
    from . import _C
    from .config import MappingSigmoid
    mode = "lampe" if config.mode in ("lampe", "reference") else config.mode
    u = config.mapping_length
    if isinstance(u, MappingSigmoid):
        sig, fixed = [u.a, u.b, u.lmax, float(u.threshold), float(u.below)], 0
    elif isinstance(u, str):
        if u == "auto":
            w = config.pretrained_window or pretrained_window
            if w is None:
                raise ValueError("mapping_length='auto' needs pretrained_window (the model's pretraining context)")
            d = _C.sigmoid_params("auto", int(w))
        else:
            d = _C.sigmoid_params(u)
        sig, fixed = [d["a"], d["b"], d["lmax"], float(d["threshold"]), float(d["below"])], 0
    else:
        sig, fixed = [], int(u)
    return mode, int(config.window), int(config.sink), fixed, sig, float(config.temperature)


def _config_from_numbers(mode, window, sink, mapping_length, sigmoid):
    from .config import LampeConfig, MappingSigmoid
    if mode == "causal":
        return None
    if mapping_length > 0:
        u = int(mapping_length)
    else:
        a, b, lmax, threshold, below = (float(x) for x in sigmoid)
        u = MappingSigmoid(a, b, lmax, int(threshold), int(below))
    return LampeConfig(window=int(window), sink=int(sink), mapping_length=u, mode=_config_mode(mode))


def _torch_backend_call(q, k, v, inv_freq, prompt_length, key_padding_mask, query_start, mode, window, sink,
                        mapping_length, sigmoid, temperature, softcap, rotary_dim, interleaved, scale):
    """The pure-torch backend with the op's arguments; returns (out, lse)."""
    from . import torch_backend
    cfg = _config_from_numbers(mode, window, sink, mapping_length, sigmoid)
    kwargs = dict(config=cfg, inv_freq=inv_freq, prompt_length=prompt_length, key_padding_mask=key_padding_mask,
                  rotary_dim=rotary_dim or None, layout="interleaved" if interleaved else "half",
                  scale=scale or None, return_lse=True, amplitude=temperature if cfg is not None else None)
    params = inspect.signature(torch_backend.attention).parameters
    for name, value, default in (("query_start", query_start, None), ("softcap", softcap, 0.0)):
        if value is None or (default is not None and value == default):
            continue
        if name not in params:
            raise NotImplementedError(f"{name}: the pure-torch backend of this lampe version does not support it")
        kwargs[name] = value
    return torch_backend.attention(q, k, v, **kwargs)


# ---------------------------------------------------------------------------- registration


def _define_fallback_op() -> None:
    """lampe_cuda::attention_torch: what the C++ kernel calls for shapes it does not cover."""
    if hasattr(torch.library, "custom_op") is False:
        return
    try:
        torch.ops.lampe_cuda.attention_torch  # already defined (module reloaded)
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("lampe_cuda::attention_torch", mutates_args=())
    def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                        prompt_length: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                        query_start: Optional[torch.Tensor], mode: str, window: int, sink: int, mapping_length: int,
                        sigmoid: list[float], temperature: float, softcap: float, rotary_dim: int,
                        interleaved: bool, scale: float, num_threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _torch_backend_call(q, k, v, inv_freq, prompt_length, key_padding_mask, query_start, mode, window,
                                       sink, mapping_length, sigmoid, temperature, softcap, rotary_dim, interleaved,
                                       scale)
        return out.contiguous(), lse.contiguous()

    @attention_torch.register_fake
    def _(q, k, v, *args):
        B, Hq, Lq, D = q.shape
        return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _schema_matches() -> bool:
    try:
        op = torch.ops.lampe.attention.default
    except (AttributeError, RuntimeError):
        return False
    try:
        want = torch._C.parse_schema("lampe::attention" + SCHEMA_ARGS)
    except Exception:  # noqa: BLE001  an unparsable schema is a mismatch
        return False
    # The op declares its integers SymInt (torch.compile with dynamic shapes); the C++ kernel takes
    # int64_t, which the dispatcher accepts for a SymInt argument, so int and SymInt compare equal.
    return str(want).replace("SymInt", "int") == str(op._schema).replace("SymInt", "int")


_registered = None  # "kernel", "fallback" or None


def _register() -> None:
    """Give lampe::attention its CUDA kernel (once)."""
    global _registered
    if torch is None or _registered is not None:
        return
    _define_fallback_op()
    try:
        from . import torch_ops  # noqa: F401  defines lampe::attention (it imports this module at its end)
    except Exception:  # noqa: BLE001  no op, nothing to register
        return
    if not _schema_matches():
        return
    if _cuda is not None:
        try:
            _cuda.register_attention()
            _registered = "kernel"
            return
        except RuntimeError as exc:
            _warn_once("register", f"lampe: the CUDA kernel could not be registered for lampe::attention ({exc}); "
                                   "using the pure-torch backend")

    def fallback(q, k, v, inv_freq, prompt_length, key_padding_mask, query_start, mode, window, sink, mapping_length,
                 sigmoid, temperature, softcap, rotary_dim, interleaved, scale, num_threads):
        return torch.ops.lampe_cuda.attention_torch(q, k, v, inv_freq, prompt_length, key_padding_mask,
                                                    query_start, mode, window, sink, mapping_length, sigmoid,
                                                    temperature, softcap, rotary_dim, interleaved, scale,
                                                    num_threads)

    torch.library.register_kernel("lampe::attention", "cuda", fallback)
    _registered = "fallback"


# ---------------------------------------------------------------------------- Python API


def _check_mask(mask, B, Lk):
    """False* True* False* per row; checked here (one synchronisation) outside graph capture."""
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be boolean (True = valid key), got dtype {mask.dtype}")
    if tuple(mask.shape) != (B, Lk):
        raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{B}, {Lk}], got {tuple(mask.shape)}")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    m = mask.to(torch.int8)
    rises = (m[:, 1:] - m[:, :-1] == 1).sum(dim=1) + m[:, 0]  # runs of True start here
    if bool((rises > 1).any()):
        raise ValueError("key_padding_mask must be False...False True...True False...False in every row (left "
                         "pads, valid keys, never-attended trailing slots); a row has a hole in its valid keys")


def _host_int64(x, B, name):
    if x is None:
        return None
    if torch.is_tensor(x):
        t = x.detach().to("cpu", torch.int64).reshape(-1)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.int64)).reshape(-1)
    if t.numel() == 1 and B != 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"{name} must be an int or have B = {B} entries, got {t.numel()}")
    return t.contiguous()


def attention(q, k, v, *, config, inv_freq, prompt_length=None, key_padding_mask=None, query_start=None,
              rotary_dim=None, layout="half", scale=None, softcap=None, return_lse=False, num_threads=None,
              out=None, pretrained_window=None):
    """:func:`lampe.attention` for CUDA tensors (same arguments and semantics). bf16/fp16 with
    head dim 64/128/256 run lampe's kernels when lampe._cuda is built; everything else (float32,
    other head dims) runs the pure-torch backend. ``num_threads`` is ignored on the GPU."""
    if torch is None:
        raise RuntimeError("lampe.cuda needs torch")
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    B, Lk = q.shape[0], k.shape[2]
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)
        _check_mask(key_padding_mask, B, Lk)
    if config is not None and getattr(config, "decode", "shifted") != "shifted":
        raise NotImplementedError("decode='authors' (formerly 'reference') is supported only by plan.table() / "
                                  "plan.regions()")
    mode, window, sink, fixed, sig, temp = op_numbers(config, pretrained_window)
    f = inv_freq if torch.is_tensor(inv_freq) else torch.as_tensor(np.asarray(inv_freq, dtype=np.float32))
    f = f.to(q.device, torch.float32).reshape(-1)
    pl = _host_int64(prompt_length, B, "prompt_length")
    qs = _host_int64(query_start, B, "query_start")
    sc = 0.0 if scale is None else float(scale)
    if scale is not None and not (math.isfinite(sc) and sc > 0):
        raise ValueError("scale must be finite and > 0")
    cap = 0.0 if softcap is None else float(softcap)
    args = (q, k, v, f, pl, key_padding_mask, qs, mode, window, sink, fixed, sig, temp, cap, int(rotary_dim or 0),
            layout == "interleaved", sc, 0)
    if _cuda is not None:
        res, lse = torch.ops.lampe_cuda.attention(*args)
    else:
        _warn_once("absent", f"lampe: lampe._cuda is {_reason}; CUDA tensors use the pure-torch backend")
        res, lse = _torch_backend_call(*args[:-1])
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse) if return_lse else res


def rope(x, positions, inv_freq, layout="half", rotary_dim=None, amplitude=1.0, out=None):
    """:func:`lampe.rope` for CUDA tensors: x [..., L, D] rotated by int positions [L] or [B, L]."""
    if torch is None:
        raise RuntimeError("lampe.cuda needs torch")
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., L, head_dim], got shape {tuple(x.shape)}")
    pos = positions if torch.is_tensor(positions) else torch.as_tensor(np.asarray(positions))
    if pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    if pos.dim() not in (1, 2):
        raise ValueError(f"positions must be [L] or [B, L], got shape {tuple(pos.shape)}")
    L, D = x.shape[-2], x.shape[-1]
    if pos.shape[-1] != L:
        raise ValueError(f"positions must have {L} entries on its last axis (the token axis of x)")
    rd = int(rotary_dim or D)
    f = inv_freq if torch.is_tensor(inv_freq) else torch.as_tensor(np.asarray(inv_freq, dtype=np.float32))
    f = f.to(x.device, torch.float32).reshape(-1)
    if pos.dim() == 2:
        if x.dim() < 3 or pos.shape[0] != x.shape[0]:
            raise ValueError(f"positions [B, L] needs x of shape [B, ..., L, head_dim] with B = {pos.shape[0]}")
        x4 = x.reshape(x.shape[0], -1, L, D)
    else:
        x4 = x.reshape(1, -1, L, D)
        pos = pos[None]
    pos = pos.to(x.device, torch.int64)
    if _cuda is not None:
        res = torch.ops.lampe_cuda.rope(x4, pos, f, rd, layout == "interleaved", float(amplitude))
    else:
        _warn_once("absent", f"lampe: lampe._cuda is {_reason}; CUDA tensors use the pure-torch backend")
        from .torch_backend import _rotate
        res = torch.empty_like(x4)
        for b in range(x4.shape[0]):
            p = pos[b if pos.shape[0] > 1 else 0]
            res[b] = _rotate(x4[b].float(), p, f, rd, layout, float(amplitude)).to(x.dtype)
    res = res.reshape(x.shape)
    if out is not None:
        out.copy_(res)
        return out
    return res


def info() -> dict:
    """What lampe.show_config() prints about CUDA."""
    d = {"built": _cuda is not None, "status": _reason, "archs": getattr(_cuda, "ARCHS", None),
         "built_against_torch": getattr(_cuda, "TORCH_VERSION", None), "op_kernel": _registered}
    if torch is not None and torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        d["device"] = f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"
    else:
        d["device"] = "none seen by torch"
    return d


_load()
_register()
