"""describe(model_config): what lampe.patch would do to a model with this config, in words,
without building the model (the CLI's ``python -m lampe plan --model-config`` prints it)."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..config import LampeConfig
from . import compat
from .families import FAMILIES, ROPE_TYPES, SCALED_ROPE_TYPES, UNSUPPORTED
from .patching import _growth_threshold, mapping_preset, pretrained_window, resolve_config


def load_model_config(model_config):
    """A transformers config from a config object, a dict, a config.json path or a local model
    directory (never the network)."""
    import transformers
    if isinstance(model_config, transformers.PretrainedConfig):
        return model_config
    if isinstance(model_config, (str, os.PathLike)):
        path = os.fspath(model_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_config: no config.json at {model_config!r}")
        with open(path) as f:
            model_config = json.load(f)
    if isinstance(model_config, dict):
        d = dict(model_config)
        model_type = d.pop("model_type", None)
        if not model_type:
            raise ValueError("model_config: the config has no model_type")
        return transformers.AutoConfig.for_model(model_type, **d)
    raise TypeError(f"model_config must be a transformers config, a dict or a path, got {type(model_config).__name__}")


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _attention_scaling(cfg, rtype) -> Optional[float]:
    if rtype == "default":
        return 1.0
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        return float(ROPE_INIT_FUNCTIONS[rtype](cfg, None)[1])
    except Exception:  # the rope parameters of this config cannot be evaluated without the model
        return None


def describe(model_config, config=None, *, disable_sliding_window: bool = False, **overrides) -> str:
    """What ``lampe.patch(model, config, disable_sliding_window=..., **overrides)`` would choose for
    a model with this config: whether it is supported, the pretrained window, where LaMPE starts,
    window, sink, mapping length, temperature, rotary layout and which layers it serves."""
    cfg = load_model_config(model_config)
    family = getattr(cfg, "model_type", "?")
    version = ".".join(map(str, compat.VERSION))
    lines = [f"lampe.patch on a {family} model (transformers {version}):"]
    if family in UNSUPPORTED:
        return "\n".join(lines + [f"  not supported: lampe does not handle {UNSUPPORTED[family]} yet"])
    if family not in FAMILIES:
        return "\n".join(lines + [f"  not supported: the {family} family is not among {', '.join(FAMILIES)}"])
    fam = FAMILIES[family]
    if compat.VERSION < fam.min_version:
        return "\n".join(lines + [f"  not supported with this transformers: {fam.name} needs >= "
                                  f"{'.'.join(map(str, fam.min_version))} ({fam.note})"])
    rtype = compat.rope_type(cfg)
    if rtype not in ROPE_TYPES:
        return "\n".join(lines + [f"  not supported: rope type {rtype!r} (supported: {', '.join(ROPE_TYPES)})"])
    if getattr(cfg, "no_rope_layers", None) and not all(cfg.no_rope_layers):
        return "\n".join(lines + ["  not supported: NoPE layers (no_rope_layers)"])
    W = pretrained_window(cfg)
    c: LampeConfig = resolve_config(cfg, config, **overrides)
    source = "original_max_position_embeddings" if rtype in SCALED_ROPE_TYPES else "max_position_embeddings"
    lines.append(f"  family: {fam.name}" + (f" ({fam.note})" if fam.note else ""))
    lines.append(f"  pretrained window W = {W} (rope type {rtype!r}: {source})")
    grow = _growth_threshold(c)
    if not c.active_from:
        lines.append("  LaMPE runs on every row (active_from = 0)")
    elif grow > c.active_from:
        lines.append(f"  LaMPE runs on a prompt longer than active_from = {c.active_from} tokens, and on a row grown by "
                     f"generation from a shorter prompt once its total length exceeds growth_from = {grow}; below "
                     "that the model's own attention runs, bit for bit")
    else:
        lines.append(f"  LaMPE runs on a row once its total length exceeds active_from = {c.active_from} tokens; "
                     "below that the model's own attention runs, bit for bit")
    u = c.mapping_length
    if isinstance(u, str):
        lengths = [n for n in (W + 1, 2 * W, 4 * W, 8 * W) if n <= 2 ** 24]
        values = ", ".join(f"U({n})={c.mapping_length_for(n)}" for n in lengths)
        rule = f"preset {u!r}" if u != "auto" else f"generic rule 'auto' from W={c.pretrained_window}"
        if u == mapping_preset(cfg) and u != "auto":
            rule += " (the authors' fit for this model)"
        lines.append(f"  mapping length: {rule}: {values}")
    elif isinstance(u, int):
        lines.append(f"  mapping length: fixed {u}")
    else:
        lines.append(f"  mapping length: scaled sigmoid a={u.a:.6g} b={u.b:.6g} lmax={u.lmax:.6g}")
    lines.append(f"  mode {c.mode!r}, window H = {c.window}, sink T = {c.sink}, decode {c.decode!r}")
    mscale = _attention_scaling(cfg, rtype)
    scaled = "" if mscale in (None, 1.0) else f" x the rope type's attention_scaling {mscale:.6g}"
    lines.append(f"  temperature s = {c.temperature:.6g}{scaled}")
    D = _head_dim(cfg)
    rd = int(D * compat.partial_rotary_factor(cfg))
    freqs = "original (in-window) frequencies" if rtype in ("dynamic", "longrope") else "the model's frequencies"
    lines.append(f"  rotary: head_dim {D}, rotary_dim {rd}, {fam.layout} pairs, {freqs}")
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    n_local = sum(t == "sliding_attention" for t in types)
    if fam.local_layers:
        lines.append(f"  layers: {len(types) - n_local} global layers use LaMPE; {n_local} sliding-window layers keep "
                     "their own attention")
    else:
        lines.append(f"  layers: all {len(types)} use LaMPE")
        if compat.uses_sliding_window(cfg):
            lines.append("  sliding window: on in this config; patch() refuses unless disable_sliding_window=True "
                         + ("(given: turned off while patched, restored on remove)" if disable_sliding_window else
                            "(not given)"))
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        lines.append(f"  attention-logit soft-capping {softcap} on every row, LaMPE rows included")
    return "\n".join(lines)
