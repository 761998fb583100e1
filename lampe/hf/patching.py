"""lampe.patch(model): LaMPE inside Hugging Face transformers models.

How it hooks in (see docs/patching.md for the reasons):
- a "lampe" attention function (and a pass-through mask function) is registered with
  transformers' AttentionInterface / AttentionMaskInterface and selected with
  set_attn_implementation; the previous implementation is remembered and restored;
- a forward hook makes the model's rotary embedding return the identity rotation, so the stock
  attention forward hands un-rotated q and k to lampe and the cache stores un-rotated keys;
  lampe rotates with the model's own inv_freq and attention_scaling;
- a forward pre-hook on each attention module picks up the Cache, where per-row plans live.
Nothing is stored at module level except the two registered names: two patched models do not
share state.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from ..attention import attention as kernel_attention
from .. import torch_backend
from ..config import LampeConfig, paper_sizes
from . import compat

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_NAME = {"sdpa": "lampe", "eager": "lampe_eager"}

_UNSUPPORTED_REASON = {
    "gemma3": "per-layer-type rotary embeddings (local and global RoPE bases)",
    "gemma3_text": "per-layer-type rotary embeddings (local and global RoPE bases)",
    "llama4": "NoPE layers (layers without rotary embeddings) and chunked attention",
    "smollm3": "NoPE layers (layers without rotary embeddings)",
    "phi": "partial rotary embeddings in its attention",
    "phi3": "partial rotary embeddings",
    "gptj": "interleaved rotary embeddings",
    "gpt_neox": "partial rotary embeddings",
    "qwen3_next": "linear-attention layers and partial rotary embeddings",
}


# ---------------------------------------------------------------------------------------- defaults


def pretrained_window(config) -> int:
    """W: the context the model was pretrained with (spec of issue 4's table)."""
    rtype = compat.rope_type(config)
    rp = compat.rope_parameters(config)
    if rtype in ("yarn", "linear", "dynamic", "longrope"):
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
    # Do no harm (docs/results.md): LaMPE from prompts of 1.25 W; a shorter prompt's sequence keeps
    # the model's own attention while generating, up to 1.5 W.
    base = dict(window=window, sink=sink, mapping_length=mapping_preset(model_config), pretrained_window=W,
                active_from=W + W // 4, growth_from=W + W // 2)
    base.update(overrides)
    return LampeConfig(**base)


# ---------------------------------------------------------------------------------------- checks


def _check_family(model):
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family in _UNSUPPORTED_REASON:
        raise NotImplementedError(f"lampe.patch: {family} models are not supported: lampe does not handle "
                                  f"{_UNSUPPORTED_REASON[family]} yet")
    if family not in SUPPORTED_FAMILIES:
        raise NotImplementedError(f"lampe.patch: the {family} family is not supported (supported: "
                                  f"{', '.join(SUPPORTED_FAMILIES)})")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise NotImplementedError(f"lampe.patch: {family} with partial_rotary_factor="
                                  f"{config.partial_rotary_factor}: partial rotary is not supported in patching yet")
    if getattr(config, "no_rope_layers", None) and not all(getattr(config, "no_rope_layers")):
        raise NotImplementedError(f"lampe.patch: {family} with NoPE layers (no_rope_layers) is not supported")
    if compat.rope_type(config) not in ("default", "llama3", "yarn", "linear", "dynamic", "longrope"):
        raise NotImplementedError(f"lampe.patch: rope type {compat.rope_type(config)!r} is not supported")
    rot = compat.rotary_modules(model)
    if len(rot) != 1:
        raise NotImplementedError(f"lampe.patch: {family} has {len(rot)} rotary embedding modules; per-layer-type "
                                  "rotary embeddings are not supported")
    if not compat.attention_modules(model):
        raise NotImplementedError(f"lampe.patch: found no attention modules in this {family} model")
    return rot[0]


def is_patched(model) -> bool:
    return getattr(model, "_lampe_handle", None) is not None


# ---------------------------------------------------------------------------------------- handle


class LampeHandle:
    """What :func:`patch` did to a model, and how to undo it (``remove()``)."""

    def __init__(self, model, config: LampeConfig, backend: str, rotary, previous_impl: str):
        self._model = weakref.ref(model)
        self.config = config
        self.backend = backend
        self.rotary = rotary
        self.previous_impl = previous_impl
        self.active = False
        self._hooks = []
        self._restore = []
        self._modules = []

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
        backends = {d: ("C kernel" if d == "cpu" and self.backend in ("auto", "c") else "torch") for d in sorted(dev)}
        state = "active" if self.active else "removed"
        return (f"LampeHandle({state}: window={c.window}, sink={c.sink}, mapping_length={rule}, "
                f"temperature={c.temperature:.6g}, active_from={c.active_from}, growth_from={c.growth_from}, "
                f"decode={c.decode!r}, "
                f"previous attention={self.previous_impl!r}, backend={backends})")

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
            for name in ("_lampe_handle", "_lampe_cache"):
                if name in m.__dict__:
                    delattr(m, name)
        for obj, name, value in reversed(self._restore):
            setattr(obj, name, value)
        if model is not None:
            compat.set_attn_implementation(model, self.previous_impl)
            if "_lampe_handle" in model.__dict__:
                delattr(model, "_lampe_handle")
        self.active = False

    # -- hooks

    def _identity_rotary(self, module, args, output):
        cos, sin = output
        return torch.ones_like(cos), torch.zeros_like(sin)

    def _pre_attention(self, module, args, kwargs):
        cache = compat.cache_from_kwargs(kwargs)
        if cache is not None:
            self._adopt_cache(cache)
        module._lampe_cache = cache
        return None

    def _adopt_cache(self, cache):
        tag = cache.__dict__.get("_lampe_handle")
        if tag is self:
            return
        if tag is not None:
            raise RuntimeError("this cache was filled by a lampe patch that has since been removed (it holds "
                               "un-rotated keys); start a new cache")
        if cache.get_seq_length() > 0:
            raise RuntimeError("this cache was filled by the model before lampe.patch (it holds rotated keys); "
                               "lampe needs a cache with un-rotated keys: start a new cache")
        handle = self
        original_update = cache.update

        def update(*args, **kwargs):
            # The check lives on the cache, so remove() can restore the model untouched.
            if not handle.active:
                raise RuntimeError("this cache holds un-rotated keys written by a lampe-patched model; it cannot "
                                   "be used after handle.remove(): start a new cache")
            return original_update(*args, **kwargs)

        cache.update = update
        cache._lampe_handle = self
        cache._lampe_plans = {}  # batch row -> prompt length its plan was made from

    # -- attention

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        B, Hq, Tq, D = query.shape
        Tk = key.shape[2]
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(Tk - Tq, Tk, device=query.device)[None]
        pos = pos.to(torch.long)
        if pos.dim() == 1:
            pos = pos[None]
        pos = pos.expand(B, Tq)
        valid = self._valid_keys(attention_mask, B, Tk, query.device)
        n_valid = valid.sum(dim=-1)
        last = pos[:, -1]
        if not torch.equal(n_valid, last + 1):
            raise NotImplementedError(
                "lampe: the number of valid keys does not match the query positions (a static or sliding cache, "
                "packed sequences or custom position_ids); lampe supports dynamic caches with left padding")
        suffix = torch.arange(Tk, device=query.device)[None] >= (Tk - n_valid)[:, None]
        if not torch.equal(valid, suffix):
            raise NotImplementedError("lampe: only left padding is supported (valid keys must be a suffix)")
        totals = (last + 1).tolist()
        cache = module.__dict__.get("_lampe_cache")
        plans = cache._lampe_plans if cache is not None else {}
        threshold = self.config.active_from if self.config.active_from is not None else 0
        # A row whose prompt ran on the model's own attention (it has no plan and this pass does
        # not start at position 0) waits for growth_from before switching.
        growth = max(threshold, self.config.growth_from if self.config.growth_from is not None else 0)
        prompt = []
        if self.config.mode != "reference":  # baseline policies: every row plans its total length
            threshold, growth, plans = 0, 0, {}
        first_pass = (pos.min(dim=1).values == 0).tolist()
        for b in range(B):
            if b in plans and self.config.mode == "reference":
                prompt.append(plans[b])
            elif totals[b] > (threshold if first_pass[b] else growth):
                prompt.append(totals[b])
                if cache is not None:
                    plans[b] = totals[b]
            else:
                prompt.append(None)
        active = [p is not None for p in prompt]
        if not any(active):
            return self._previous(module, query, key, value, attention_mask, dropout, scaling, kwargs, pos, last)
        if all(active):
            out = self._lampe(query, key, value, valid, n_valid, prompt, scaling, Tk)
        else:  # rows on both sides of active_from: each row on its own path
            outs = []
            for b in range(B):
                sl = slice(b, b + 1)
                m = attention_mask[sl] if attention_mask is not None and attention_mask.shape[0] == B else attention_mask
                kw = dict(kwargs, position_ids=pos[sl])
                if active[b]:
                    outs.append(self._lampe(query[sl], key[sl], value[sl], valid[sl], n_valid[sl], prompt[sl],
                                            scaling, Tk))
                else:
                    outs.append(self._previous(module, query[sl], key[sl], value[sl], m, dropout, scaling, kw,
                                               pos[sl], last[sl])[0].transpose(1, 2))
            out = torch.cat(outs, dim=0)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _valid_keys(mask, B, Tk, device):
        if mask is None:
            return torch.ones(B, Tk, dtype=torch.bool, device=device)
        if mask.dim() != 4:
            raise NotImplementedError(f"lampe: expected a 4-D attention mask, got shape {tuple(mask.shape)}")
        row = mask[:, 0, -1, :]
        row = row if row.dtype == torch.bool else compat.float_mask_valid(row)
        return row.expand(B, Tk)

    def _previous(self, module, query, key, value, attention_mask, dropout, scaling, kwargs, pos, last):
        """Below active_from: rotate exactly as the model would and call its previous backend."""
        Tk = key.shape[2]
        kpos = last[:, None] - (Tk - 1 - torch.arange(Tk, device=key.device))[None]
        apply = compat.family_function(module, "apply_rotary_pos_emb")
        cos_q, sin_q = compat.rotary_cos_sin(self.rotary, value, pos)
        cos_k, sin_k = compat.rotary_cos_sin(self.rotary, value, kpos)
        q_rot = apply(query, query, cos_q, sin_q)[0]
        k_rot = apply(key, key, cos_k, sin_k)[1]
        fn = compat.previous_attention(self.previous_impl, module)
        return fn(module, q_rot, k_rot, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def _lampe(self, query, key, value, valid, n_valid, prompt, scaling, Tk):
        inv_freq = self.rotary.inv_freq.detach().float().cpu().numpy()
        mscale = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        cfg = self.config
        if mscale != 1.0:
            cfg = cfg.replace(temperature=cfg.temperature * mscale)
        off = (Tk - n_valid).cpu()
        prompt_length = torch.tensor(prompt, dtype=torch.long) + off
        kpm = valid.cpu() if bool((off > 0).any()) else None
        use_c = query.device.type == "cpu" and self.backend in ("auto", "c")
        if use_c:
            return kernel_attention(query, key, value, config=cfg, inv_freq=inv_freq, prompt_length=prompt_length,
                                    key_padding_mask=kpm, scale=scaling)
        return torch_backend.attention(query, key, value, config=cfg, inv_freq=inv_freq, prompt_length=prompt_length,
                                       key_padding_mask=kpm, scale=scaling)


def _lampe_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    handle = module.__dict__.get("_lampe_handle")
    if handle is None or not handle.active:
        raise RuntimeError(f"{type(module).__name__} selects lampe attention but is not patched by lampe.patch")
    if scaling is None:
        scaling = getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
    return handle.attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def _register():
    # Registering twice is harmless: both names always map to the same functions.
    compat.AttentionInterface.register(ATTN_NAME["sdpa"], _lampe_attention_forward)
    compat.AttentionInterface.register(ATTN_NAME["eager"], _lampe_attention_forward)

    def lampe_sdpa_mask(*args, **kwargs):
        return compat.sdpa_mask(*args, **kwargs)

    def lampe_eager_mask(*args, **kwargs):
        return compat.eager_mask(*args, **kwargs)

    compat.AttentionMaskInterface.register(ATTN_NAME["sdpa"], lampe_sdpa_mask)
    compat.AttentionMaskInterface.register(ATTN_NAME["eager"], lampe_eager_mask)


def patch(model, config: Optional[LampeConfig] = None, *, backend: str = "auto", disable_sliding_window: bool = False,
          **overrides) -> LampeHandle:
    """Make every long input of ``model`` use LaMPE. Returns a handle; ``handle.remove()`` undoes it.

    Defaults come from the model (pretrained window W, mapping-length preset, active_from = 1.25 W,
    growth_from = 1.5 W: see docs/results.md, "Do no harm");
    ``config`` replaces them (``config="paper"``: the authors' settings for this model, see
    LampeConfig.paper) and ``overrides`` (any LampeConfig field) adjust them. ``backend``:
    "auto" (C kernel on CPU tensors, pure torch elsewhere), "c" or "torch"."""
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if is_patched(model):
        raise RuntimeError("model is already patched by lampe; call handle.remove() first")
    rotary = _check_family(model)
    if config is None:
        config = default_config(model.config, **overrides)
    elif isinstance(config, str):
        if config != "paper":
            raise ValueError(f"config must be a LampeConfig, None or 'paper', got {config!r}")
        config = LampeConfig.paper(pretrained_window(model.config), mapping_length=mapping_preset(model.config),
                                   **overrides)
    else:
        if not isinstance(config, LampeConfig):
            raise TypeError(f"config must be a LampeConfig, got {type(config).__name__}")
        if overrides:
            config = config.replace(**overrides)
        if config.pretrained_window is None or config.active_from is None:
            W = pretrained_window(model.config)
            config = config.replace(pretrained_window=config.pretrained_window or W)
    if config.decode != "shifted":
        raise NotImplementedError("lampe.patch supports decode='shifted' only")
    previous = compat.get_attn_implementation(model) or "eager"
    if previous not in ATTN_NAME:
        raise NotImplementedError(f"lampe.patch: the model uses {previous!r} attention; patch a model loaded with "
                                  "attn_implementation='sdpa' or 'eager'")
    if compat.uses_sliding_window(model.config) and not disable_sliding_window:
        raise ValueError(f"this {model.config.model_type} model uses sliding-window attention, which drops the far "
                         "keys LaMPE is meant to reach; pass disable_sliding_window=True to turn it off while patched")
    _register()
    handle = LampeHandle(model, config, backend, rotary, previous)
    handle.active = True
    try:
        if disable_sliding_window:
            handle._restore.extend(compat.disable_sliding_window(model))
        handle._hooks.append(rotary.register_forward_hook(handle._identity_rotary))
        for m in compat.attention_modules(model):
            m._lampe_handle = handle
            handle._modules.append(m)
            handle._hooks.append(m.register_forward_pre_hook(handle._pre_attention, with_kwargs=True))
        model._lampe_handle = handle
        compat.set_attn_implementation(model, ATTN_NAME[previous])
    except Exception:
        handle.remove()
        raise
    return handle


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
