"""Every transformers-version difference lampe.patch depends on, in one place.

Supported: transformers 5.x (newest tested 5.24) and 4.57.x.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch
import transformers

VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())

try:  # 4.48+: function registries for attention and (4.53+) mask construction
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as e:  # pragma: no cover - older transformers
    raise ImportError(f"lampe.patch needs transformers >= 4.57 (found {transformers.__version__}): {e}") from e

# The attention module's cache keyword: 5.x renamed past_key_values to cache; 4.5x used
# past_key_value (singular) inside attention modules.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_from_kwargs(kwargs):
    for name in CACHE_KWARGS:
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for passing a cache back to ``model(...)`` or ``model.generate(...)``: 5.x
    calls it ``cache`` (``past_key_values`` is deprecated there), 4.5x ``past_key_values``."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls) -> str:
    # Per class, once: callers pass the cache on every decode step.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a forward or generate output returned, under either version's field name."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def attention_modules(model):
    """Self-attention modules that call the attention interface (Llama/Mistral/Qwen layout)."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "o_proj")]


def rotary_modules(model):
    return [m for m in model.modules() if hasattr(m, "inv_freq") and "Rotary" in type(m).__name__]


def family_function(module, name):
    """A function of the module's modeling file, e.g. its apply_rotary_pos_emb."""
    fn = getattr(sys.modules[type(module).__module__], name, None)
    if fn is None:
        raise NotImplementedError(f"{type(module).__name__}: its modeling file has no {name}()")
    return fn


def previous_attention(impl, module):
    if impl == "eager":
        return family_function(module, "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[impl]


def get_attn_implementation(model) -> str:
    return model.config._attn_implementation


def set_attn_implementation(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - very old 4.x
        model.config._attn_implementation = impl


def rope_parameters(config) -> dict:
    """rope_parameters (5.x) or rope_scaling (4.x), as a dict (empty for plain RoPE)."""
    rp = getattr(config, "rope_parameters", None)
    if not rp:
        rp = getattr(config, "rope_scaling", None)
    if isinstance(rp, dict) and "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = rp["full_attention"]  # per-layer-type layout: the full-attention entry
    return dict(rp or {})


def rope_type(config) -> str:
    rp = rope_parameters(config)
    return rp.get("rope_type", rp.get("type", "default")) or "default"


def sliding_window_settings(config) -> dict:
    """The config fields that enable sliding-window attention, with their values."""
    out = {}
    for name in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"):
        if hasattr(config, name):
            out[name] = getattr(config, name)
    return out


def uses_sliding_window(config) -> bool:
    s = sliding_window_settings(config)
    types = s.get("layer_types") or []
    if any(t == "sliding_attention" for t in types):
        return True
    if "use_sliding_window" in s:
        return bool(s["use_sliding_window"]) and s.get("sliding_window") is not None
    return s.get("sliding_window") is not None


def disable_sliding_window(model) -> list:
    """Turn sliding windows off in the config and the attention modules; returns what to restore."""
    config = model.config
    saved = [(config, name, value) for name, value in sliding_window_settings(config).items()]
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in config.layer_types]
    for m in attention_modules(model):
        if getattr(m, "sliding_window", None) is not None:
            saved.append((m, "sliding_window", m.sliding_window))
            m.sliding_window = None
    return saved


def rotary_cos_sin(rotary, x, position_ids):
    """cos/sin exactly as the model's rotary module computes them (hooks bypassed)."""
    return rotary.forward(x, position_ids)


def float_mask_valid(mask: torch.Tensor) -> torch.Tensor:
    return mask > torch.finfo(mask.dtype).min / 2
