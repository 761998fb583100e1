"""Context-extension methods, applied to a loaded model for the length being evaluated.

- ``original``: the model as is (SDPA).
- ``linear`` (position interpolation), ``dynamic`` (dynamic NTK) and ``yarn``: transformers'
  own RoPE scaling, by swapping in a rotary embedding built from a modified config.
- ``selfextend`` (Jin et al. 2024, arXiv:2401.01325) and ``rerope`` (Su 2023, "ReRoPE",
  kexue.fm/archives/9708): position policies over lampe's fused kernel (LampeConfig.selfextend /
  .rerope), patched in with lampe.patch.
- ``lampe``: lampe.patch with its defaults for the model; ``lampe-paper``: the authors' settings
  (LampeConfig.paper: window 512, sink 200, active from 2H, scaled for small windows).
"""
from __future__ import annotations

import contextlib
import copy
import math

from ..config import LampeConfig
from ..hf import compat
from ..hf.patching import patch, pretrained_window

METHODS = ("original", "linear", "dynamic", "yarn", "selfextend", "rerope", "lampe", "lampe-paper")


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


@contextlib.contextmanager
def apply(model, method: str, length: int):
    """Set ``model`` up for ``method`` at input length ``length`` for the duration of the block."""
    W = pretrained_window(model.config)
    factor = max(1.0, length / W)
    if method == "original":
        yield
    elif method in ("linear", "yarn"):
        with rope_scaling(model, method, factor):
            yield
    elif method == "dynamic":
        with rope_scaling(model, "dynamic", 2.0):  # NTK base grows with the running length
            yield
    elif method == "selfextend":
        with _patched(model, selfextend_config(W, length)):
            yield
    elif method == "rerope":
        with _patched(model, LampeConfig.rerope(window=max(1, W // 2))):
            yield
    elif method == "lampe":
        with _patched(model, None):
            yield
    elif method == "lampe-paper":
        with _patched(model, "paper"):
            yield
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


@contextlib.contextmanager
def _patched(model, config):
    h = patch(model, config)
    try:
        yield h
    finally:
        h.remove()
