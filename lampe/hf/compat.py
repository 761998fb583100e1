"""Every transformers-version and model-family difference lampe.patch depends on, in one place.

Supported: transformers 5.x (newest tested 5.24) and 4.57.x.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

import torch
import transformers

VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())

try:  # 4.48+: function registries for attention and (4.53+) mask construction
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, eager_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as e:  # pragma: no cover - older transformers
    raise ImportError(f"lampe.patch needs transformers >= 4.57 (found {transformers.__version__}): {e}") from e

# The attention module's cache keyword: 5.x renamed past_key_values to cache; 4.5x used
# past_key_value (singular) inside attention modules; GPT-NeoX calls it layer_past.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


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


def is_static_cache(cache) -> bool:
    """A cache whose key tensors are preallocated (their length is not the number of keys written)."""
    return bool(getattr(cache, "is_compileable", False)) or "Static" in type(cache).__name__


def query_offset(cache, layer_idx: int, q_len: int, k_len: int, cache_position, read: bool = True):
    """Tensor index (in the keys the attention function receives) of the first query row. A static
    cache keeps it in a tensor: ``read=False`` returns that 0-d tensor unread (torch.compile would
    break the graph to read it)."""
    if cache is None or not is_static_cache(cache):
        return k_len - q_len  # dynamic caches hold exactly the keys written so far
    if cache_position is not None:  # 4.57 passes it; the static cache writes there
        at = cache_position.reshape(-1)[0]
    else:
        n = cache.get_seq_length(layer_idx)  # 5.x: called after this layer's update
        if not torch.is_tensor(n):
            return int(n) - q_len
        at = n.reshape(-1)[0] - q_len
    return int(at) if read else at


# ---------------------------------------------------------------------------------------- modules


@functools.lru_cache(maxsize=None)
def _accepts_position_embeddings(cls) -> bool:
    try:
        return "position_embeddings" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


@functools.lru_cache(maxsize=None)
def uses_attention_interface(cls) -> bool:
    """Whether the attention class calls transformers' attention interface (4.57's Qwen2-MoE and
    StableLM attention classes call torch's sdpa themselves, which no registered function reaches)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # pragma: no cover - source unavailable
        return True


def attention_modules(model):
    """The self-attention modules: they have a layer index and take the model's cos/sin as
    ``position_embeddings`` (every family lampe supports, sliding layers included)."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")
            and _accepts_position_embeddings(type(m))]


def layer_type(model, module) -> str:
    """"full_attention", "sliding_attention" (Gemma 2/3 local layers, Mistral-style windows when
    enabled per layer), or another transformers layer type."""
    types = getattr(model.config, "layer_types", None)
    if types and module.layer_idx is not None and module.layer_idx < len(types):
        return types[module.layer_idx]
    return getattr(module, "layer_type", None) or "full_attention"


def rotary_modules(model):
    return [m for m in model.modules() if "Rotary" in type(m).__name__]


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


def set_attn_implementation(model, impl: str, restoring: bool = False) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except (ImportError, ValueError):
            # Putting back what the model had (e.g. flash attention on a machine without its
            # kernels, as a model moved between machines can be) must not fail.
            if not restoring:
                raise
    model.config._attn_implementation = impl


# ---------------------------------------------------------------------------------------- rotary


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """rope_parameters (5.x) or rope_scaling (4.x) of the given layer type, as a dict (4.x plain
    RoPE: empty)."""
    rp = getattr(config, "rope_parameters", None)
    if not rp:
        rp = getattr(config, "rope_scaling", None)
    if isinstance(rp, dict) and layer_type in rp and isinstance(rp[layer_type], dict):
        rp = rp[layer_type]  # per-layer-type layout (Gemma 3 in 5.x)
    return dict(rp or {})


def rope_type(config) -> str:
    rp = rope_parameters(config)
    return rp.get("rope_type", rp.get("type", "default")) or "default"


def partial_rotary_factor(config) -> float:
    """The fraction of each head that is rotated: 5.x keeps it in rope_parameters, 4.x on the
    config (GPT-NeoX 4.x: rotary_pct)."""
    rp = rope_parameters(config)
    for value in (rp.get("partial_rotary_factor"), getattr(config, "partial_rotary_factor", None),
                  getattr(config, "rotary_pct", None)):
        if value is not None:
            return float(value)
    return 1.0


class Rotary:
    """The rotary embedding one layer uses: the module, and (5.x per-layer-type rotary) the layer
    type its forward takes."""

    def __init__(self, module, layer_type: Optional[str]):
        self.module = module
        self.layer_type = layer_type
        self._prefix = f"{layer_type}_" if layer_type else ""

    def _get(self, name, default=None):
        return getattr(self.module, self._prefix + name, default)

    @property
    def attention_scaling(self) -> float:
        return float(self._get("attention_scaling", 1.0) or 1.0)

    @property
    def rope_type(self) -> str:
        rt = getattr(self.module, "rope_type", "default")
        return rt.get(self.layer_type, "default") if isinstance(rt, dict) else rt

    def inv_freq(self) -> torch.Tensor:
        """The frequencies the model uses inside its pretrained window: "dynamic" and "longrope"
        switch to other frequencies beyond it, LaMPE keeps positions inside it."""
        if self.rope_type in ("dynamic", "longrope"):
            orig = self._get("original_inv_freq")
            if orig is not None:
                return orig
        return self._get("inv_freq")

    def cos_sin(self, x, position_ids):
        """cos/sin exactly as the model's rotary module computes them (hooks bypassed)."""
        if self.layer_type:
            return self.module.forward(x, position_ids, self.layer_type)
        return self.module.forward(x, position_ids)


def layer_rotary(model, module, ltype: str) -> Optional[Rotary]:
    """The rotary embedding of a layer of type ``ltype`` (None when none can be found)."""
    # The model-level rotary modules (4.57 Qwen2-MoE/StableLM also keep one per attention layer).
    candidates = [(n, m) for n, m in model.named_modules()
                  if "Rotary" in type(m).__name__ and n.rsplit(".", 1)[-1].startswith("rotary_emb")
                  and ".layers." not in f".{n}" and ".h." not in f".{n}"]
    if not candidates:
        return None
    for name, m in candidates:
        if hasattr(m, f"{ltype}_inv_freq"):  # 5.x: one module, buffers per layer type
            return Rotary(m, ltype)
    if ltype == "sliding_attention":  # 4.57 Gemma 3: a second module for the local layers
        local = [m for n, m in candidates if n.endswith("_local")]
        if local:
            return Rotary(local[0], None)
    main = [m for n, m in candidates if not n.endswith("_local")]
    return Rotary(main[0], None) if main and hasattr(main[0], "inv_freq") else None


def apply_rotary(module, q, cos, sin, k=None):
    """Rotate q (and k) exactly as the module's own forward does: its family's
    apply_rotary_pos_emb on the first cos.shape[-1] channels, the rest passed through."""
    apply = family_function(module, "apply_rotary_pos_emb")
    rd, D = cos.shape[-1], q.shape[-1]
    if rd == D:
        if k is None:
            return apply(q, q, cos, sin)[0]
        return apply(q, k, cos, sin)
    q_rot, k_rot = apply(q[..., :rd], (k if k is not None else q)[..., :rd], cos, sin)
    q_out = torch.cat([q_rot, q[..., rd:]], dim=-1)
    if k is None:
        return q_out
    return q_out, torch.cat([k_rot, k[..., rd:]], dim=-1)


# ---------------------------------------------------------------------------------------- windows


def sliding_window_settings(config) -> dict:
    """The config fields that enable sliding-window attention, with their values."""
    out = {}
    for name in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers"):
        if hasattr(config, name):
            out[name] = getattr(config, name)
    return out


def uses_sliding_window(config) -> bool:
    """Whether the model attends through sliding windows (some layers or all)."""
    s = sliding_window_settings(config)
    if any(t == "sliding_attention" for t in (s.get("layer_types") or [])):
        return True
    if "use_sliding_window" in s:
        return bool(s["use_sliding_window"]) and s.get("sliding_window") is not None
    return s.get("sliding_window") is not None


def disable_sliding_window(model, modules) -> list:
    """Turn sliding windows off everywhere (config, attention modules, the model's
    has_sliding_layers flag and the layers' attention_type, both set at construction); returns what to restore as (object, attribute,
    value)."""
    config = model.config
    saved = [(config, name, value) for name, value in sliding_window_settings(config).items()]
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in config.layer_types]
    for m in modules:
        if getattr(m, "sliding_window", None) is not None:
            saved.append((m, "sliding_window", m.sliding_window))
            m.sliding_window = None
    for m in model.modules():
        if getattr(m, "has_sliding_layers", False):
            saved.append((m, "has_sliding_layers", m.has_sliding_layers))
            m.has_sliding_layers = False
        for name in ("attention_type", "layer_type"):  # decoder layers pick their mask by it
            if getattr(m, name, None) == "sliding_attention":
                saved.append((m, name, "sliding_attention"))
                setattr(m, name, "full_attention")
    return saved


def float_mask_valid(mask: torch.Tensor) -> torch.Tensor:
    return mask > torch.finfo(mask.dtype).min / 2


_SDPA_MASK_PARAMS = inspect.signature(sdpa_mask).parameters


def lampe_sdpa_mask(*args, **kwargs):
    """The installed sdpa_mask, except that on 4.57 while torch.compile traces it also skips the
    purely causal mask where it skips it in eager mode (no padding mask, one query or as many
    queries as keys, plain causal): 4.57 materialises the mask while tracing, which LaMPE layers
    would have to read on the host (a graph break per layer). 5.x already skips it there."""
    if VERSION < (5, 0) and torch.compiler.is_compiling():
        a = dict(zip(_SDPA_MASK_PARAMS, args), **kwargs)
        cache_position, kv_length = a.get("cache_position"), a.get("kv_length")
        if (a.get("attention_mask") is None and a.get("allow_is_causal_skip", True)
                and a.get("local_size") is None and a.get("mask_function", causal_mask_function) is causal_mask_function
                and cache_position is not None and kv_length is not None
                and (cache_position.shape[0] == 1 or cache_position.shape[0] == kv_length)):
            return None
    return sdpa_mask(*args, **kwargs)

