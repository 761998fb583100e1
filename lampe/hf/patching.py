"""lampe.patch(model): LaMPE inside Hugging Face transformers models.

How it hooks in (see docs/patching.md for the reasons):
- a "lampe" attention function (and a pass-through mask function) is registered with
  transformers' AttentionInterface / AttentionMaskInterface and selected with
  set_attn_implementation; the previous implementation is remembered and restored;
- a forward pre-hook on each global attention layer hands it the identity rotation instead of the
  model's cos/sin (kept aside for the model's own path), so the cache stores un-rotated keys and
  lampe rotates with the model's own inv_freq and attention_scaling; sliding-window layers of
  families built with them (Gemma 2/3) are left untouched;
- the same pre-hook picks up the Cache, where per-row plans live.
Nothing is stored at module level except the two registered names: two patched models do not
share state.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import torch_backend
from ..config import LampeConfig, paper_sizes
from ..torch_ops import op_numbers
from . import compat, compiled
from .families import FAMILIES, ROPE_TYPES, SCALED_ROPE_TYPES, UNSUPPORTED

SUPPORTED_FAMILIES = tuple(FAMILIES)
ATTN_NAME = {"sdpa": "lampe", "eager": "lampe_eager"}
#: Implementations lampe takes over; a flash-attention model runs sdpa below active_from while
#: patched (flash kernels are not available to every device) and gets flash back on remove().
COMPUTE_IMPL = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "sdpa", "flash_attention_3": "sdpa"}
_BASELINES = ("selfextend", "rerope")


# ---------------------------------------------------------------------------------------- defaults


def pretrained_window(config) -> int:
    """W: the context the model was pretrained with."""
    rtype = compat.rope_type(config)
    rp = compat.rope_parameters(config)
    if rtype in SCALED_ROPE_TYPES:
        w = rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if w:
            return int(w)
    return int(config.max_position_embeddings)


def mapping_preset(config) -> str:
    """The authors' preset for the models they fitted, else the generic rule ("auto")."""
    family, rtype, W = config.model_type, compat.rope_type(config), pretrained_window(config)
    if family == "llama" and rtype == "default" and W == 4096:
        return "llama2"
    if family == "llama" and rtype == "default" and W == 8192:
        return "llama3"
    if family == "llama" and rtype == "llama3" and W == 131072:
        return "llama3.1"
    if family == "mistral" and W == 32768:
        return "mistral"
    return "auto"


def default_config(model_config, **overrides) -> LampeConfig:
    W = pretrained_window(model_config)
    window, sink = paper_sizes(W)
    # Do no harm (docs/results.md): LaMPE from prompts longer than 1.25 W; a sequence whose prompt
    # was shorter keeps the model's own attention while it grows by generation, up to 1.5 W.
    base = dict(window=window, sink=sink, mapping_length=mapping_preset(model_config), pretrained_window=W,
                active_from=W + W // 4, growth_from=W + W // 2)
    base.update(overrides)
    return LampeConfig(**base)


# ---------------------------------------------------------------------------------------- checks


def _check_family(model):
    """The family entry, or a NotImplementedError that names what is missing."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family in UNSUPPORTED:
        raise NotImplementedError(f"lampe.patch: {family} models are not supported: lampe does not handle "
                                  f"{UNSUPPORTED[family]} yet")
    if family not in FAMILIES:
        raise NotImplementedError(f"lampe.patch: the {family} family is not supported (supported: "
                                  f"{', '.join(SUPPORTED_FAMILIES)})")
    fam = FAMILIES[family]
    if compat.VERSION < fam.min_version:
        raise NotImplementedError(f"lampe.patch: {fam.name} needs transformers >= "
                                  f"{'.'.join(map(str, fam.min_version))} (found {'.'.join(map(str, compat.VERSION))}):"
                                  f" {fam.note}")
    if getattr(config, "no_rope_layers", None) and not all(getattr(config, "no_rope_layers")):
        raise NotImplementedError(f"lampe.patch: {family} with NoPE layers (no_rope_layers) is not supported")
    if compat.rope_type(config) not in ROPE_TYPES:
        raise NotImplementedError(f"lampe.patch: rope type {compat.rope_type(config)!r} is not supported (supported: "
                                  f"{', '.join(ROPE_TYPES)})")
    modules = compat.attention_modules(model)
    if not modules:
        raise NotImplementedError(f"lampe.patch: found no attention modules in this {family} model")
    legacy = [m for m in modules if not compat.uses_attention_interface(type(m))]
    if legacy:
        raise NotImplementedError(f"lampe.patch: {type(legacy[0]).__name__} does not use transformers' attention "
                                  f"interface in transformers {'.'.join(map(str, compat.VERSION))}; upgrade "
                                  "transformers")
    return fam, modules


def is_patched(model) -> bool:
    return getattr(model, "_lampe_handle", None) is not None


# ---------------------------------------------------------------------------------------- state


class _Call:
    """What one attention module's forward received (set by its pre-hook, read by attend)."""
    __slots__ = ("cache", "position_ids", "cache_position", "cos", "sin")

    def __init__(self, cache, position_ids, cache_position, cos, sin):
        self.cache, self.position_ids, self.cache_position, self.cos, self.sin = (
            cache, position_ids, cache_position, cos, sin)


class _CacheState:
    """lampe's state on one Cache: each row's plan (the prompt length its positions were planned
    from, 0 = none yet; an int64 CPU tensor [B], read where plans are made, on the host) and each
    key's position (for the model's own attention below active_from), both following the cache's
    reorders."""

    def __init__(self):
        self.plans: Optional[torch.Tensor] = None
        self.kpos: Optional[torch.Tensor] = None

    def select(self, index):
        """Rows ``index`` (a beam reorder or a batch selection)."""
        idx = torch.as_tensor(index).detach().to("cpu", torch.long).reshape(-1)
        if self.plans is not None:
            self.plans = self.plans[idx]
        if self.kpos is not None:
            self.kpos = self.kpos[idx.to(self.kpos.device)]

    def repeat(self, repeats: int):
        if self.plans is not None:
            self.plans = self.plans.repeat_interleave(repeats)
        if self.kpos is not None:
            self.kpos = self.kpos.repeat_interleave(repeats, dim=0)


# Cache methods wrapped on adopted caches (module-level so a deepcopied cache rebinds them).
def _cache_update(cache, *args, **kwargs):
    handle = cache._lampe_handle
    if not handle.active:
        raise RuntimeError("this cache holds un-rotated keys written by a lampe-patched model; it cannot "
                           "be used after handle.remove(): start a new cache")
    return type(cache).update(cache, *args, **kwargs)


def _cache_reorder(cache, beam_idx):
    type(cache).reorder_cache(cache, beam_idx)
    cache._lampe_state.select(beam_idx)


def _cache_select(cache, indices):
    type(cache).batch_select_indices(cache, indices)
    cache._lampe_state.select(indices)


def _cache_repeat(cache, repeats):
    type(cache).batch_repeat_interleave(cache, repeats)
    cache._lampe_state.repeat(repeats)


class _CacheMethod:
    """One of the wrappers below bound to a cache (a plain object, which torch.compile traces
    where it does not trace types.MethodType)."""

    def __init__(self, fn, cache):
        self.fn, self.cache = fn, cache

    def __call__(self, *args, **kwargs):
        return self.fn(self.cache, *args, **kwargs)


_CACHE_WRAPPERS = {"update": _cache_update, "reorder_cache": _cache_reorder,
                   "batch_select_indices": _cache_select, "batch_repeat_interleave": _cache_repeat}


class _Layout:
    """One forward pass of one batch, as every LaMPE layer of it sees it (host metadata, made once
    per forward by the first layer that needs it).

    Tensor index j of the keys is valid for row b iff the last query row's mask allows it. A row's
    own positions number its valid keys 0, 1, ... (so padding, static-cache tails and pad ids
    inside a prompt take no position); ``start[b]`` is the first query row that runs LaMPE
    (``Tq``: none), ``plan[b]`` the prompt length its plan was made from. Without a mask (no
    padding, a dynamic cache or none) every key is valid and everything is plain Python integers
    derived from shapes, which torch.compile traces without reading any tensor."""

    def __init__(self, B, Tq, Tk, q0, valid=None):
        self.B, self.Tq, self.Tk, self.q0 = B, Tq, Tk, q0
        self.valid = valid                                      # np.bool_ [B, Tk], or None: all valid
        if valid is None:
            n = min(q0 + Tq, Tk)
            self.count, self.offset, self.holes = [n] * B, [0] * B, [False] * B
            self.past = [max(q0, 0)] * B
        else:
            count = valid.sum(axis=1)
            offset = np.where(count > 0, valid.argmax(axis=1), Tk)
            last = Tk - 1 - valid[:, ::-1].argmax(axis=1)
            self.count, self.offset = count.tolist(), offset.tolist()
            self.holes = ((count > 0) & (last - offset + 1 != count)).tolist()
            self.past = (valid[:, :q0].sum(axis=1) if q0 > 0 else np.zeros(B, dtype=np.int64)).tolist()
        self.plan = [0] * B
        self.start = [Tq] * B
        self.kpos = None        # [B, Tk] key positions for the model's own attention
        self.refs = ()          # eager mode: weak refs of (mask, position_ids, cache) it was made for
        self.by_op = False      # made inside lampe::patched_layer (reused only there)
        self.stored = None      # the plans to store on the cache (None: nothing to store)
        self._device = {}

    def own_positions(self, b):
        """Own position of each query row of row b (-1 for a row whose own key is not valid)."""
        idx = self.q0 + np.arange(self.Tq)
        inside = (idx >= 0) & (idx < self.Tk)
        ranks = np.cumsum(self.valid[b]) - 1
        pos = np.full(self.Tq, -1, dtype=np.int64)
        ok = inside.copy()
        ok[inside] = self.valid[b, idx[inside]]
        pos[ok] = ranks[idx[ok]]
        return pos

    def first_row_at(self, b, position):
        """The first query row of row b whose own position is >= position (Tq: none)."""
        if self.valid is None:
            return min(max(position - self.q0, 0), self.Tq)
        later = np.flatnonzero(self.own_positions(b) >= position)
        return int(later[0]) if later.size else self.Tq

    def lampe_rows(self, b):
        """(query rows of row b from start[b] on whose key is valid, the own position of the last):
        rows as a slice when contiguous, else an index list."""
        if self.valid is None:
            lo = max(self.start[b], -self.q0)
            return (slice(lo, self.Tq) if lo < self.Tq else None), self.q0 + self.Tq - 1
        own = self.own_positions(b)
        rows = np.flatnonzero((own >= 0) & (np.arange(self.Tq) >= self.start[b]))
        if rows.size == 0:
            return None, -1
        last = int(own[rows[-1]])
        if rows[-1] - rows[0] + 1 == rows.size:
            return slice(int(rows[0]), int(rows[-1]) + 1), last
        return rows.tolist(), last

    def on(self, name, device, make):
        key = (name, str(device))
        if key not in self._device:
            self._device[key] = make()
        return self._device[key]


# ---------------------------------------------------------------------------------------- handle


class LampeHandle:
    """What :func:`patch` did to a model, and how to undo it (``remove()``)."""

    def __init__(self, model, config: LampeConfig, backend: str, family, previous_impl: str):
        self._model = weakref.ref(model)
        self.config = config
        self.backend = backend
        self.family = family
        self.previous_impl = previous_impl
        self.compute_impl = COMPUTE_IMPL[previous_impl]
        self.active = False
        self.layers = {}       # attention module -> compat.Rotary of the LaMPE (global) layers
        self._specs = {}       # attention module -> _LayerSpec
        self.local_layers = []  # sliding-window layers left to the model's own attention
        self._hooks = []
        self._restore = []
        self._modules = []
        self._layout = None
        self._prompt_index = None  # inside generate(): the input's length (its prompt)

    # -- pickling / deepcopy: a patched model copies like an unpatched one, handle included

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model"] = self._model()
        state["_layout"] = None
        state["_prompt_index"] = None
        return state

    def __setstate__(self, state):
        model = state.pop("_model")
        self.__dict__.update(state)
        self._model = weakref.ref(model) if model is not None else (lambda: None)
        # a copy's layers are new modules: they need numbers of their own for lampe::patched_layer
        self._specs = {m: spec._replace(op_layer=compiled.register_layer(m)) for m, spec in self._specs.items()}
        if self.active:
            _register()  # the names must exist in the process that unpickles the model

    # -- reporting

    def __repr__(self):
        c = self.config
        u = c.mapping_length
        if isinstance(u, str):
            rule = f"preset {u!r}" if u != "auto" else f"generic rule from W={c.pretrained_window}"
        elif isinstance(u, int):
            rule = f"fixed {u}"
        else:
            rule = f"sigmoid a={u.a:.4g} b={u.b:.4g} Lmax={u.lmax:.4g}"
        model = self._model()
        dev = {str(p.device) for p in model.parameters()} if model is not None else set()
        backends = {d: self._backend_name(torch.device(d)) for d in sorted(dev)}
        state = "active" if self.active else "removed"
        grow = _growth_threshold(c)
        if not c.active_from:
            start = "LaMPE on every row"
        elif grow > c.active_from:
            start = (f"LaMPE on prompts longer than {c.active_from} tokens and on rows grown past {grow} tokens, the "
                     "model's own attention below")
        else:
            start = f"LaMPE once a row's total length exceeds {c.active_from} tokens, the model's own attention below"
        layers = f"{len(self.layers)} LaMPE layers"
        if self.local_layers:
            layers += f", {len(self.local_layers)} sliding-window layers left as they are"
        return (f"LampeHandle({state}: {self.family.name}; {start}; {layers}; mode={c.mode!r}, window={c.window}, "
                f"sink={c.sink}, mapping_length={rule}, temperature={c.temperature:.6g}, decode={c.decode!r}, "
                f"previous attention={self.previous_impl!r}, backend={backends})")

    def _backend_name(self, device):
        if self.backend == "torch":
            return "torch"
        return "lampe::attention op" if _op_available(device) else "torch (no lampe kernel for this device)"

    # -- scoped use

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self):
        """Restore the model exactly as it was before :func:`patch`."""
        if not self.active:
            return
        model = self._model()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._modules:
            for name in ("_lampe_handle", "_lampe_call"):
                if name in m.__dict__:
                    delattr(m, name)
        for obj, name, value in reversed(self._restore):
            if value is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)
        self._restore.clear()
        if model is not None:
            compat.set_attn_implementation(model, self.previous_impl, restoring=True)
            if "_lampe_handle" in model.__dict__:
                delattr(model, "_lampe_handle")
        self.active = False
        self._layout = None

    # -- hooks

    def _pre_attention(self, module, args, kwargs):
        """Global layers: keep the model's cos/sin aside, hand the module the identity rotation."""
        cache = compat.cache_from_kwargs(kwargs)
        if cache is not None:
            self._adopt_cache(cache)
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise RuntimeError(f"{type(module).__name__} was called without position_embeddings")
        cos, sin = pe
        module._lampe_call = _Call(cache, kwargs.get("position_ids"), kwargs.get("cache_position"), cos, sin)
        kwargs = dict(kwargs)
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
        return args, kwargs

    def _adopt_cache(self, cache):
        tag = cache.__dict__.get("_lampe_handle")
        if tag is self:
            return
        if tag is not None:
            raise RuntimeError("this cache was filled by a lampe patch that has since been removed (it holds "
                               "un-rotated keys); start a new cache")
        if self.layers and int(cache.get_seq_length(min(m.layer_idx for m in self.layers))) > 0:
            raise RuntimeError("this cache was filled by the model before lampe.patch (it holds rotated keys); "
                               "lampe needs a cache with un-rotated keys: start a new cache")
        for name, fn in _CACHE_WRAPPERS.items():
            if hasattr(cache, name):
                setattr(cache, name, _CacheMethod(fn, cache))
        cache._lampe_handle = self
        cache._lampe_state = _CacheState()

    # -- the forward's layout and plans

    def _forward_layout(self, module, call, mask, B, Tq, Tk, device) -> _Layout:
        """Eager mode (and traced training): the layout, made by the first LaMPE layer of a forward
        and reused by the others (same mask, position_ids and cache)."""
        compiling = torch.compiler.is_compiling()
        lay = self._layout
        if (not compiling and lay is not None and not lay.by_op and lay.B == B and lay.Tq == Tq and lay.Tk == Tk
                and all(r() is x for r, x in zip(lay.refs, (mask, call.position_ids, call.cache)))):
            return lay
        cache = call.cache
        q0 = compat.query_offset(cache, module.layer_idx, Tq, Tk, call.cache_position)
        state = cache.__dict__.get("_lampe_state") if cache is not None else None
        lay = self._new_layout(mask, B, Tq, Tk, q0, state.plans if state is not None else None, call.position_ids,
                               check=not compiling)
        if state is not None and lay.stored is not None:
            state.plans = lay.stored
        lay.kpos = self._key_positions(B, Tq, Tk, q0, call.position_ids, state, device)
        if not compiling:  # traced code recomputes per layer (plain integers; the same answer)
            lay.refs = tuple(_weak(x) for x in (mask, call.position_ids, cache))
            self._layout = lay
        return lay

    def _op_layout(self, module, mask, B, Tq, Tk, q0, position_ids, kpos, plans) -> _Layout:
        """Inside lampe::patched_layer: the first LaMPE layer of a forward makes the layout and the
        cache's new plans (``lay.stored``), the others reuse it. Planning again would give the same
        answer (a plan made in this forward is re-made from the same lengths), only slower."""
        lay = self._layout
        if (module is not next(iter(self.layers)) and lay is not None and lay.by_op
                and (lay.B, lay.Tq, lay.Tk, lay.q0) == (B, Tq, Tk, q0)):
            return lay
        lay = self._new_layout(mask, B, Tq, Tk, q0, plans, position_ids)
        lay.kpos = kpos
        lay.by_op = True
        self._layout = lay
        return lay

    def _new_layout(self, mask, B, Tq, Tk, q0, stored, position_ids, check=True) -> _Layout:
        """A forward's layout: the valid keys (the one host read), the plans (``lay.stored``: to
        store on the cache, None for the baselines) and, unless traced, the packed-sequence check."""
        lay = _Layout(B, Tq, Tk, q0, _valid_keys(mask, B, Tk))
        lay.stored = self._plan_rows(lay, stored)
        if check:
            _check_one_sequence_per_row(lay, position_ids, mask)
        return lay

    def _plan_rows(self, lay: _Layout, stored: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Which rows and query rows run LaMPE, and from which plan; returns the plans to store on
        the cache (None: nothing to store).

        LaMPE: a row whose prompt (its first forward; inside generate() the input, without the
        candidate tokens assisted and prompt-lookup decoding append to it) exceeds active_from is
        planned from that prompt. A row that grows past its prompt (generation, later turns) is
        planned the first time its total length exceeds growth_from (active_from when unset), from
        growth_from + 1. That is exactly what token-by-token decoding does, so speculative
        decoding, which verifies several tokens per forward, plans like greedy decoding. Plans
        live on the cache; a crop (or reset) below a plan's length re-plans the row from what is
        left when that exceeds growth_from, else the row is back on the model's own attention.
        SelfExtend / ReRoPE: every forward plans each row from its total length."""
        cfg = self.config
        threshold = cfg.active_from or 0
        grow = _growth_threshold(cfg)
        total = lay.count
        if cfg.mode in _BASELINES:
            for b in range(lay.B):
                if total[b] > threshold:
                    lay.plan[b], lay.start[b] = total[b], 0
            return None
        plans = [0] * lay.B
        # A row with no keys before this forward keeps no plan (see below): the stored plans are
        # read only when some row has history (so traced prefill reads no tensor).
        if stored is not None and stored.shape[0] == lay.B and any(lay.past):
            plans = stored.tolist()
        hint = self._prompt_index
        for b in range(lay.B):
            P, past = plans[b], lay.past[b]
            if P and P > past:  # this forward re-writes keys the plan was made from (crop, reset)
                P = past if past > grow else 0  # a prompt re-planned, or a grown row back below growth_from
            if P:
                lay.start[b] = 0
            elif total[b] > threshold:
                if past == 0:  # the row's first forward: its prompt, plus any candidate tokens
                    base = total[b]
                    if hint is not None:
                        base = min(base, hint if lay.valid is None else int(lay.valid[b, :hint].sum()))
                else:
                    base = past
                if past == 0 and base > threshold:  # a long prompt: LaMPE from its first row
                    P = base
                    lay.start[b] = 0
                elif total[b] > grow:  # grown by generation past growth_from
                    P = base if base > grow else grow + 1
                    lay.start[b] = lay.first_row_at(b, P - 1)
            plans[b] = P
        lay.plan = plans
        return torch.tensor(plans, dtype=torch.int64)

    def _key_positions(self, B, Tq, Tk, q0, position_ids, state, device):
        """Positions of the keys as the model rotated them (the cache records every forward's
        position_ids), for the model's own attention."""
        pos = position_ids
        if pos is None:
            pos = torch.arange(q0, q0 + Tq, device=device)[None]
        pos = pos.to(torch.long).reshape(-1, Tq).expand(B, Tq)
        past = None
        if state is not None and state.kpos is not None and q0 > 0:
            rec = state.kpos
            if rec.shape[0] == B and rec.shape[1] >= q0:
                past = rec[:, :q0].to(pos.device)
        if past is None and q0 > 0:  # unknown history: positions one apart
            past = pos[:, :1] - torch.arange(q0, 0, -1, device=pos.device)[None]
        kpos = pos if past is None else torch.cat([past, pos], dim=1)
        if state is not None:
            state.kpos = kpos
        if kpos.shape[1] < Tk:  # a static cache's unwritten tail (never attended)
            kpos = torch.cat([kpos, kpos.new_zeros(B, Tk - kpos.shape[1])], dim=1)
        return kpos[:, :Tk]

    def _key_position_buffer(self, B, Tq, Tk, q0_at, position_ids, state, device):
        """Traced inference on a static cache: the key positions recorded so far in a [B, Tk] buffer
        (zeros where nothing is written yet), this forward's written at the cache's write index
        q0_at (a tensor: nothing read on the host)."""
        rec = state.kpos if state is not None else None
        if rec is None or rec.shape[0] != B:
            buf = torch.zeros(B, Tk, dtype=torch.long, device=device)
        elif rec.shape[1] < Tk:
            buf = torch.cat([rec.to(device), rec.new_zeros(B, Tk - rec.shape[1], device=device)], dim=1)
        else:
            buf = rec[:, :Tk].to(device)
        idx = q0_at.to(device) + torch.arange(Tq, device=device)
        pos = idx[None] if position_ids is None else position_ids.to(device, torch.long).reshape(-1, Tq)
        buf = buf.index_copy(1, idx, pos.expand(B, Tq))
        if state is not None:
            state.kpos = buf
        return buf

    # -- attention

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        if torch.compiler.is_compiling() and module in self.layers:
            if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
                return self._attend_as_op(module, query, key, value, attention_mask, dropout, scaling, kwargs)
            if attention_mask is not None:
                # Training with a padding mask: the mask is read on the host, and lampe::patched_layer
                # has no backward: this layer's attention runs outside the graph (a graph break).
                return self._attend_outside_graph(module, query, key, value, attention_mask, dropout, scaling,
                                                  kwargs)
        return self._attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)

    def _attend(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        call = module.__dict__.pop("_lampe_call", None)
        rotary = self.layers.get(module)
        if rotary is None:  # a sliding-window layer: the model's own attention, untouched
            fn = compat.previous_attention(self.compute_impl, module)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if call is None:
            raise RuntimeError(f"{type(module).__name__} {module.layer_idx}: lampe's pre-hook did not run")
        B, Hq, Tq, D = query.shape
        lay = self._forward_layout(module, call, attention_mask, B, Tq, key.shape[2], query.device)
        return self._attend_rows(module, rotary, query, key, value, attention_mask, dropout, scaling, kwargs,
                                 call.cos, call.sin, lay)

    _attend_outside_graph = torch.compiler.disable(_attend)

    def _attend_as_op(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        """Traced inference: what the op needs, from shapes and the cache's state, then one
        lampe::patched_layer call (lampe/hf/compiled.py says why)."""
        call = module.__dict__.pop("_lampe_call", None)
        if call is None:
            raise RuntimeError(f"{type(module).__name__} {module.layer_idx}: lampe's pre-hook did not run")
        B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
        cache = call.cache
        q0 = compat.query_offset(cache, module.layer_idx, Tq, Tk, call.cache_position, read=False)
        state = cache.__dict__.get("_lampe_state") if cache is not None else None
        q0_at = None
        if torch.is_tensor(q0):  # a static cache: its write index, read by the op
            q0_at, q0 = q0.reshape(1), 0
            device = query.device if call.position_ids is None else call.position_ids.device
            kpos = self._key_position_buffer(B, Tq, Tk, q0_at, call.position_ids, state, device)
        else:
            kpos = self._key_positions(B, Tq, Tk, q0, call.position_ids, state, query.device)
        plans = None
        if state is not None and self.config.mode not in _BASELINES:
            plans = state.plans
            if plans is None or plans.shape[0] != B:
                plans = torch.zeros(B, dtype=torch.int64)
        out, new_plans = compiled.patched_layer(
            query, key, value, attention_mask, call.cos, call.sin, call.position_ids, kpos, plans, q0, q0_at,
            self._specs[module].op_layer, float(dropout), float(scaling),
            *(kwargs.get(k) for k in compiled.SCALAR_KWARGS))
        if plans is not None:
            state.plans = new_plans
        return out, None

    def run_layer_op(self, module, query, key, value, mask, cos, sin, kpos, plans, q0, q0_at, dropout, scaling,
                     kwargs):
        """lampe::patched_layer's body: the eager code path on the op's arguments."""
        B, Hq, Tq, D = query.shape
        if q0_at is not None:  # a static cache's write index
            q0 = int(q0_at[0])
        lay = self._op_layout(module, mask, B, Tq, key.shape[2], q0, kwargs.get("position_ids"), kpos, plans)
        out = self._attend_rows(module, self.layers[module], query, key, value, mask, dropout, scaling, kwargs,
                                cos, sin, lay)[0]
        plans = lay.stored.clone() if lay.stored is not None else torch.zeros(B, dtype=torch.int64)
        return out, plans  # (an op's outputs are new tensors)

    def _attend_rows(self, module, rotary, query, key, value, attention_mask, dropout, scaling, kwargs, cos, sin, lay):
        B, Hq, Tq, D = query.shape
        lampe_rows = [b for b in range(B) if lay.start[b] < Tq]
        if not lampe_rows:
            return self._own(module, query, key, value, attention_mask, dropout, scaling, kwargs, cos, sin, lay)
        if dropout:
            raise NotImplementedError(f"lampe: attention dropout ({dropout}) is not supported on rows that run LaMPE; "
                                      "set the model's attention_dropout to 0 or call model.eval()")
        if (len(lampe_rows) == B and not any(lay.start) and not any(lay.holes)
                and self._specs[module].config.mode not in _BASELINES):
            # The common case: every row runs LaMPE from its first query row: one kernel call,
            # each row's valid keys, own positions and plan passed per row.
            return self._lampe_batch(module, rotary, query, key, value, scaling, lay), None
        if len(lampe_rows) < B or any(lay.start[b] > 0 for b in lampe_rows):
            # Rows (or first query rows) below active_from: the model's own attention for those.
            out = self._own(module, query, key, value, attention_mask, dropout, scaling, kwargs, cos, sin,
                            lay)[0].clone()
        else:
            out = query.new_zeros(B, Tq, Hq, D)
        for b in lampe_rows:
            self._lampe_row(module, rotary, query, key, value, scaling, lay, b, out)
        return out, None

    def _own(self, module, query, key, value, mask, dropout, scaling, kwargs, cos_q, sin_q, lay):
        """The model's own attention: rotate exactly as the model does, call its implementation."""
        if lay.q0 == 0 and lay.Tk == lay.Tq:
            q_rot, k_rot = compat.apply_rotary(module, query, cos_q, sin_q, key)
        else:
            kpos = lay.on("kpos", key.device, lambda: lay.kpos.to(key.device))
            cos_k, sin_k = self.layers[module].cos_sin(value, kpos)
            q_rot = compat.apply_rotary(module, query, cos_q, sin_q)
            k_rot = compat.apply_rotary(module, key, cos_k, sin_k)
        fn = compat.previous_attention(self.compute_impl, module)
        return fn(module, q_rot, k_rot, value, mask, dropout=dropout, scaling=scaling, **kwargs)

    def _lampe_batch(self, module, rotary, query, key, value, scaling, lay):
        """All rows in one call (kernel contract: per-row key_padding_mask, query_start, plan)."""
        kpm = qs = None
        plans = lay.plan
        if lay.valid is not None:
            kpm = lay.on("kpm", query.device, lambda: torch.from_numpy(lay.valid).to(query.device))
            qs = torch.tensor([lay.q0 - o for o in lay.offset], dtype=torch.int64)
            plans = [p + o for p, o in zip(lay.plan, lay.offset)]  # the kernel counts prompts in key indices
        elif lay.q0 + lay.Tq != lay.Tk:  # no mask, but keys past the queries (a static cache's prefill)
            kpm = (torch.arange(lay.Tk, device=query.device) < lay.q0 + lay.Tq).expand(lay.B, lay.Tk)
            qs = torch.full((lay.B,), lay.q0, dtype=torch.int64)
        res = self._kernel(module, rotary, query, key, value, plans, scaling, key_padding_mask=kpm,
                           query_start=qs)
        return res.transpose(1, 2)

    def _lampe_row(self, module, rotary, query, key, value, scaling, lay, b, out):
        """Row b's LaMPE query rows from lay.start[b] on, into out [B, Tq, Hq, D]: its valid keys
        (gathered when the padding mask has holes), its query rows with their own positions."""
        rows, last = lay.lampe_rows(b)
        if rows is None:
            return
        if lay.holes[b]:
            idx = torch.as_tensor(np.flatnonzero(lay.valid[b])[:last + 1], device=key.device)
            k, v = key[b:b + 1].index_select(2, idx), value[b:b + 1].index_select(2, idx)
        else:
            lo = lay.offset[b]
            k, v = key[b:b + 1, :, lo:lo + last + 1], value[b:b + 1, :, lo:lo + last + 1]
        if isinstance(rows, slice):
            q = query[b:b + 1, :, rows]
        else:
            rows = torch.as_tensor(rows, device=query.device)
            q = query[b:b + 1].index_select(2, rows)
        res = self._kernel(module, rotary, q, k, v, [lay.plan[b]], scaling)  # [1, Hq, n, D]
        out[b, rows] = res[0].transpose(0, 1).to(out.dtype)

    def _kernel(self, module, rotary, q, k, v, plans, scaling, key_padding_mask=None, query_start=None):
        """LaMPE attention of rows with the given plans (prompt lengths, one per row)."""
        spec = self._specs[module]
        inv_freq = rotary.inv_freq().detach().float()
        pl = None if spec.config.mode in _BASELINES else torch.tensor(plans, dtype=torch.int64)
        if self.backend != "torch" and _op_available(q.device):
            mode, window, sink, u, sigmoid, temperature = spec.numbers
            return torch.ops.lampe.attention(
                q, k, v, inv_freq.to(q.device), pl, key_padding_mask, query_start, mode, window, sink, u, sigmoid,
                temperature, spec.softcap, spec.rotary_dim, spec.layout == "interleaved", float(scaling), 0)[0]
        return torch_backend.attention(q, k, v, config=spec.config, inv_freq=inv_freq, prompt_length=pl,
                                       key_padding_mask=key_padding_mask, query_start=query_start,
                                       rotary_dim=spec.rotary_dim, layout=spec.layout, scale=scaling,
                                       softcap=spec.softcap or None)


class _LayerSpec(NamedTuple):
    """What a LaMPE layer's kernel call needs, fixed at patch time (so traced code computes none
    of it): the config with the rope type's attention_scaling folded into the temperature, the
    op's numbers for it, rotary dims, pairing, soft-capping, and the layer's number for
    lampe::patched_layer (lampe/hf/compiled.py)."""
    config: LampeConfig
    numbers: tuple
    rotary_dim: int
    layout: str
    softcap: float
    op_layer: int


def _growth_threshold(config) -> int:
    """Total length beyond which a row that grew from a shorter prompt switches to LaMPE."""
    return max(config.active_from or 0, config.growth_from if config.growth_from is not None else 0)


def _layer_spec(config, rotary, module, layout) -> _LayerSpec:
    mscale = rotary.attention_scaling
    cfg = config if mscale == 1.0 else config.replace(temperature=config.temperature * mscale)
    softcap = float(getattr(module, "attn_logit_softcapping", None) or 0.0)
    return _LayerSpec(cfg, op_numbers(cfg), 2 * int(rotary.inv_freq().shape[-1]), layout, softcap,
                      compiled.register_layer(module))


class _Absent:
    """Marks an attribute that did not exist before patch() (one object, also after a copy)."""

    def __reduce__(self):
        return "_ABSENT"

    def __deepcopy__(self, memo):
        return self


_ABSENT = _Absent()


def _weak(x):
    if x is None:
        return lambda: None
    try:
        return weakref.ref(x)
    except TypeError:  # pragma: no cover - objects without weakref support
        return lambda: x


def _valid_keys(mask, B, Tk):
    """np.bool_ [B, Tk]: which keys the last query row of each row may see (the forward's one host
    read), or None without a mask (every key up to the last query is valid: shapes say it all)."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise NotImplementedError(f"lampe: expected a 4-D attention mask, got shape {tuple(mask.shape)}")
    row = mask[:, 0, -1, :]
    row = row if row.dtype == torch.bool else compat.float_mask_valid(row)
    return row.expand(B, Tk).to("cpu").numpy().copy()


def _check_one_sequence_per_row(lay, position_ids, mask):
    """LaMPE numbers a row's valid tokens as one sequence. Packed sequences (several documents in
    a row: position_ids restarting, or a block-diagonal mask in which queries before the last
    document see keys of their own) are not that: refuse them rather than attend wrongly."""
    if lay.Tq <= 1 or all(s >= lay.Tq for s in lay.start):
        return
    before = None
    if mask is not None:
        seen = mask[:, 0]
        seen = (seen if seen.dtype == torch.bool else compat.float_mask_valid(seen)).any(dim=-1)
        before = seen.expand(lay.B, lay.Tq).to("cpu").numpy()
    pos = None
    if position_ids is not None:
        pos = position_ids.detach().reshape(-1, lay.Tq).expand(lay.B, lay.Tq).to("cpu").numpy()
    for b in range(lay.B):
        if lay.start[b] >= lay.Tq:
            continue
        idx = lay.q0 + np.arange(lay.Tq)
        if before is not None and np.any(before[b] & (idx < lay.offset[b])):
            bad = True  # queries before the row's first valid key attend keys of their own
        elif pos is not None:
            rows = np.arange(lay.Tq) if lay.valid is None else np.flatnonzero(lay.own_positions(b) >= 0)
            bad = rows.size > 1 and bool(np.any(np.diff(pos[b, rows]) != 1))
        else:
            bad = False
        if bad:
            raise NotImplementedError(
                "lampe: a row holding several sequences (packed sequences: position_ids restarting, a "
                "block-diagonal mask) reaches beyond active_from; LaMPE numbers a row's valid tokens as one "
                "sequence: pass one sequence per row (with an attention_mask for padding)")


def _op_available(device) -> bool:
    """Whether lampe::attention has a kernel for this device (CPU here; CUDA when lampe.cuda
    registers one)."""
    if device.type == "cpu":
        return True
    key = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}.get(device.type)
    return bool(key) and torch._C._dispatch_has_kernel_for_dispatch_key("lampe::attention", key)


def _lampe_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    handle = module.__dict__.get("_lampe_handle")
    if handle is None or not handle.active:
        raise RuntimeError(f"{type(module).__name__} selects lampe attention but is not patched by lampe.patch")
    if scaling is None:
        scaling = getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
    return handle.attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def _lampe_sdpa_mask(*args, **kwargs):
    return compat.lampe_sdpa_mask(*args, **kwargs)


def _lampe_eager_mask(*args, **kwargs):
    return compat.eager_mask(*args, **kwargs)


def _register():
    # Registering twice is harmless: both names always map to the same functions.
    compat.AttentionInterface.register(ATTN_NAME["sdpa"], _lampe_attention_forward)
    compat.AttentionInterface.register(ATTN_NAME["eager"], _lampe_attention_forward)
    compat.AttentionMaskInterface.register(ATTN_NAME["sdpa"], _lampe_sdpa_mask)
    compat.AttentionMaskInterface.register(ATTN_NAME["eager"], _lampe_eager_mask)


class _Generate:
    """model.generate while patched: tells the handle how long the prompt is, so a first forward
    that also carries candidate tokens (assisted / prompt-lookup decoding) plans from the prompt.
    (A class rather than a bound method so a patched model pickles.)"""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        handle = model.__dict__.get("_lampe_handle")
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if handle is None or not torch.is_tensor(inputs) or inputs.dim() != 2:
            return type(model).generate(model, *args, **kwargs)
        handle._prompt_index = int(inputs.shape[1])
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            handle._prompt_index = None


# ---------------------------------------------------------------------------------------- config saving


class _TrueToDict:
    """config.to_dict while patched, with the values lampe changed put back (so save_pretrained
    and push_to_hub write the model's true config and no lampe state)."""

    def __init__(self, config, saved: dict):
        self.config, self.saved = config, saved

    def __call__(self):
        config = self.config
        fn = config.__dict__.pop("to_dict", None)
        try:
            out = type(config).to_dict(config)
        finally:
            config.__dict__["to_dict"] = fn
        for name, value in self.saved.items():
            if name in out:
                out[name] = value
        return out


def _protect_config(handle, config, names):
    """Make to_dict report the pre-patch values of ``names``."""
    if "to_dict" in config.__dict__:
        return
    handle._restore.append((config, "to_dict", _ABSENT))
    config.to_dict = _TrueToDict(config, {n: getattr(config, n) for n in names if hasattr(config, n)})


# ---------------------------------------------------------------------------------------- patch


def patch(model, config: Optional[LampeConfig] = None, *, backend: str = "auto", disable_sliding_window: bool = False,
          **overrides) -> LampeHandle:
    """Make every long input of ``model`` use LaMPE. Returns a handle; ``handle.remove()`` undoes it.

    Defaults come from the model (pretrained window W, mapping-length preset, active_from = 1.25 W,
    growth_from = 1.5 W: see docs/patching.md, "When LaMPE switches on");
    ``config`` replaces them (``config="paper"``: the authors' settings for this model, see
    LampeConfig.paper) and ``overrides`` (any LampeConfig field) adjust them. ``backend``:
    "auto" (the lampe::attention op: the C kernel on CPU, lampe.cuda's kernel on CUDA, else
    pure torch) or "torch" (pure torch everywhere); "c" is accepted as "auto"."""
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        raise RuntimeError("model is already patched by lampe; call handle.remove() first")
    family, modules = _check_family(model)
    config = resolve_config(model.config, config, **overrides)
    previous = compat.get_attn_implementation(model) or "eager"
    if previous not in COMPUTE_IMPL:
        raise NotImplementedError(f"lampe.patch: the model uses {previous!r} attention; patch a model loaded with "
                                  f"attn_implementation={', '.join(repr(k) for k in COMPUTE_IMPL)}")
    native_local = family.local_layers
    sliding = compat.uses_sliding_window(model.config) and not native_local
    if sliding and not disable_sliding_window:
        raise ValueError(f"this {model.config.model_type} model uses sliding-window attention, which drops the far "
                         "keys LaMPE is meant to reach; pass disable_sliding_window=True to turn it off while patched")
    _register()
    handle = LampeHandle(model, config, backend, family, previous)
    handle.active = True
    try:
        if disable_sliding_window and not native_local:
            _protect_config(handle, model.config, compat.sliding_window_settings(model.config))
            handle._restore.extend(compat.disable_sliding_window(model, modules))
        for m in modules:
            m._lampe_handle = handle
            handle._modules.append(m)
            ltype = compat.layer_type(model, m)
            if ltype == "sliding_attention" and native_local:
                handle.local_layers.append(m)
                continue
            if ltype != "full_attention" and not (ltype == "sliding_attention" and disable_sliding_window):
                raise NotImplementedError(f"lampe.patch: layer {m.layer_idx} has layer type {ltype!r}")
            rot = compat.layer_rotary(model, m, "full_attention")
            if rot is None:
                raise NotImplementedError(f"lampe.patch: found no rotary embedding for layer {m.layer_idx}")
            handle.layers[m] = rot
            handle._specs[m] = _layer_spec(config, rot, m, family.layout)
            handle._hooks.append(m.register_forward_pre_hook(handle._pre_attention, with_kwargs=True))
        model._lampe_handle = handle
        handle._restore.append((model, "_lampe_handle", _ABSENT))
        if hasattr(model, "generate") and "generate" not in model.__dict__:
            model.generate = _Generate(model)
            handle._restore.append((model, "generate", _ABSENT))
        compat.set_attn_implementation(model, ATTN_NAME[handle.compute_impl])
    except Exception:
        handle.remove()
        raise
    return handle


def resolve_config(model_config, config=None, **overrides) -> LampeConfig:
    """The LampeConfig patch() uses for a model with this config (see patch)."""
    if config is None:
        config = default_config(model_config, **overrides)
    elif isinstance(config, str):
        if config != "paper":
            raise ValueError(f"config must be a LampeConfig, None or 'paper', got {config!r}")
        config = LampeConfig.paper(pretrained_window(model_config), mapping_length=mapping_preset(model_config),
                                   **overrides)
    else:
        if not isinstance(config, LampeConfig):
            raise TypeError(f"config must be a LampeConfig, got {type(config).__name__}")
        if overrides:
            config = config.replace(**overrides)
        if config.pretrained_window is None:
            config = config.replace(pretrained_window=pretrained_window(model_config))
    if config.decode != "shifted":
        raise NotImplementedError("lampe.patch supports decode='shifted' only")
    return config


class patched:
    """``with lampe.patched(model, ...) as handle:`` — patch for the block, then restore."""

    def __init__(self, model, config=None, **kwargs):
        self._args = (model, config)
        self._kwargs = kwargs
        self.handle = None

    def __enter__(self):
        self.handle = patch(*self._args, **self._kwargs)
        return self.handle

    def __exit__(self, *exc):
        self.handle.remove()
        return False
