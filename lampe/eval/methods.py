"""Context-extension methods, applied to a loaded model for the length being evaluated.

- ``original``: the model as is (its own attention, SDPA or eager).
- ``linear`` (position interpolation), ``dynamic`` (dynamic NTK) and ``yarn``: transformers'
  own RoPE scaling, by swapping in a rotary embedding built from a modified config.
- ``selfextend`` (Jin et al. 2024, arXiv:2401.01325) and ``rerope`` (Su 2023, "ReRoPE",
  kexue.fm/archives/9708): position policies over lampe's fused kernel (LampeConfig.selfextend /
  .rerope), patched in with lampe.patch.
- ``lampe``: lampe.patch with its defaults for the model; ``lampe-paper``: the authors' settings
  (LampeConfig.paper: window 512, sink 200, active from 2H, scaled for small windows);
  ``lampe-calibrated``: the defaults with the mapping-length sigmoid that lampe.calibrate fitted
  for this model (:data:`CALIBRATED`).
- ``lampe:FIELD=VALUE:...``: the defaults with LampeConfig fields changed, e.g.
  ``lampe:mapping_length=4096`` or ``lampe:mapping_length=smollm2:temperature=1.0`` (a name of
  :data:`CALIBRATED` stands for its sigmoid).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

from ..config import LampeConfig, MappingSigmoid
from ..hf import compat
from ..hf.patching import patch, pretrained_window

METHODS = ("original", "linear", "dynamic", "yarn", "selfextend", "rerope", "lampe", "lampe-paper",
           "lampe-calibrated")

#: Mapping-length sigmoids fitted with lampe.calibrate, with the model configs they belong to
#: (docs/results.md, "Calibration", has the scan and the command).
CALIBRATED = {
    "smollm2": dict(
        match=dict(model_type="llama", max_position_embeddings=8192, hidden_size=576, num_hidden_layers=30),
        # lampe.calibrate on Emma, 512 scored tokens per point, best U of {0.1..0.9} W at 12K, 16K
        # and 24K: 0.9 W = 7373 at every length, so the fit is that constant (a = 0)
        sigmoid=MappingSigmoid(a=0.0, b=4.568357029858506, lmax=7450.0),  # U = 7373 at every L
    ),
}


def calibrated_for(config):
    """(name, MappingSigmoid) fitted for a model with this config, or None."""
    for name, entry in CALIBRATED.items():
        if entry["sigmoid"] is not None and all(getattr(config, k, None) == v for k, v in entry["match"].items()):
            return name, entry["sigmoid"]
    return None


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text in CALIBRATED:
        if CALIBRATED[text]["sigmoid"] is None:
            raise ValueError(f"no calibrated sigmoid recorded for {text!r}")
        return CALIBRATED[text]["sigmoid"]
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse(method: str):
    """(base name, LampeConfig field overrides) of a method spec such as ``lampe:window=256``."""
    name, *pairs = method.split(":")
    if pairs and name != "lampe":
        raise ValueError(f"method {method!r}: only 'lampe' takes FIELD=VALUE settings")
    fields = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"method {method!r}: expected FIELD=VALUE after ':', got {p!r}")
        k, v = p.split("=", 1)
        if k not in LampeConfig.__dataclass_fields__:
            raise ValueError(f"method {method!r}: {k!r} is not a LampeConfig field")
        fields[k] = _value(v)
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS} or lampe:FIELD=VALUE[:...]")
    return name, fields


@contextlib.contextmanager
def rope_scaling(model, rope_type: str, factor: float):
    """Temporarily rebuild the model's rotary embedding with transformers' ``rope_type`` scaling."""
    rot = compat.rotary_modules(model)
    if len(rot) != 1:
        raise NotImplementedError("rope scaling methods need exactly one rotary embedding module")
    rot = rot[0]
    parent = [m for m in model.modules() if any(c is rot for c in m.children())][0]
    name = [n for n, c in parent.named_children() if c is rot][0]
    W = pretrained_window(model.config)
    cfg = copy.deepcopy(model.config)
    params = dict(compat.rope_parameters(cfg))
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params.update(rope_type=rope_type, factor=float(factor), original_max_position_embeddings=W, rope_theta=theta)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = params
    if compat.VERSION < (5, 0):
        cfg.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    new = type(rot)(config=cfg).to(rot.inv_freq.device)
    setattr(parent, name, new)
    try:
        yield new
    finally:
        setattr(parent, name, rot)


def selfextend_config(W: int, length: int) -> LampeConfig:
    """Neighbour window W/4 and the smallest group size that fits ``length`` into W positions."""
    w = max(1, W // 4)
    group = max(1, math.ceil((length - w) / max(1, W - w)))
    return LampeConfig.selfextend(window=w, group=group)


def backend_of(model, handle=None) -> str:
    """Which attention code computes a patched or unpatched model's attention, for the records."""
    dev = next(model.parameters()).device.type
    if handle is None:
        return f"transformers {compat.get_attn_implementation(model) or 'eager'} ({dev})"
    if dev == "cpu" and handle.backend in ("auto", "c"):
        return "lampe C kernel (cpu)"
    return f"lampe pure-torch backend ({dev})"


@contextlib.contextmanager
def apply(model, method: str, length: int):
    """Set ``model`` up for ``method`` at input length ``length`` for the duration of the block;
    yields a dict describing what runs (``backend``, and ``config`` for lampe's policies)."""
    name, fields = parse(method)
    W = pretrained_window(model.config)
    factor = max(1.0, length / W)
    if name == "original":
        yield dict(backend=backend_of(model))
    elif name in ("linear", "yarn"):
        with rope_scaling(model, name, factor):
            yield dict(backend=backend_of(model))
    elif name == "dynamic":
        with rope_scaling(model, "dynamic", 2.0):  # NTK base grows with the running length
            yield dict(backend=backend_of(model))
    elif name == "selfextend":
        with _patched(model, selfextend_config(W, length)) as info:
            yield info
    elif name == "rerope":
        with _patched(model, LampeConfig.rerope(window=max(1, W // 2))) as info:
            yield info
    elif name == "lampe-paper":
        with _patched(model, "paper") as info:
            yield info
    else:  # lampe, lampe-calibrated, lampe:FIELD=VALUE
        if name == "lampe-calibrated":
            found = calibrated_for(model.config)
            if found is None:
                raise ValueError("lampe-calibrated: no calibrated mapping length is recorded for this model "
                                 "(run lampe.calibrate and add it to lampe.eval.methods.CALIBRATED)")
            fields = dict(fields, mapping_length=found[1])
        with _patched(model, None, **fields) as info:
            yield info


@contextlib.contextmanager
def _patched(model, config, **overrides):
    h = patch(model, config, **overrides)
    try:
        yield dict(backend=backend_of(model, h), config=describe(h.config))
    finally:
        h.remove()


def describe(cfg: LampeConfig) -> dict:
    """A LampeConfig as plain JSON values (a MappingSigmoid as its constants)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out
