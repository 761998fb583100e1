"""torch custom op ``lampe::attention`` over the C kernel, traceable by torch.compile.

Importing this module registers the op (it needs torch >= 2.4 for ``torch.library.custom_op``).
The configuration travels as plain numbers so the op has a static schema:

    out, lse = torch.ops.lampe.attention(q, k, v, inv_freq, prompt_length, key_padding_mask,
                                         use_lampe, window, sink, mapping_length, preset,
                                         pretrained_window, temperature, rotary_dim, interleaved,
                                         scale, num_threads)

``use_lampe=False`` is plain causal RoPE attention; ``preset`` ("" or a preset name / "auto")
overrides ``mapping_length``; ``rotary_dim``/``scale``/``num_threads``/``pretrained_window`` use
0 for "default". It always returns (out, lse) with lse float32 [B, Hq, Lq].
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import attention
from .config import LampeConfig


def config_from_numbers(use_lampe, window, sink, mapping_length, preset, pretrained_window, temperature):
    if not use_lampe:
        return None
    return LampeConfig(window=window, sink=sink, mapping_length=preset or mapping_length, temperature=temperature,
                       pretrained_window=pretrained_window or None)


@torch.library.custom_op("lampe::attention", mutates_args=(), device_types="cpu")
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor,
                 prompt_length: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], use_lampe: bool,
                 window: int, sink: int, mapping_length: int, preset: str, pretrained_window: int,
                 temperature: float, rotary_dim: int, interleaved: bool, scale: float,
                 num_threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = config_from_numbers(use_lampe, window, sink, mapping_length, preset, pretrained_window, temperature)
    # The kernel reads any strides but needs each row contiguous.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = attention(q, k, v, config=cfg, inv_freq=inv_freq, prompt_length=prompt_length,
                         key_padding_mask=key_padding_mask, rotary_dim=rotary_dim or None,
                         layout="interleaved" if interleaved else "half", scale=scale or None, return_lse=True,
                         num_threads=num_threads or None)
    return out, lse


@attention_op.register_fake
def _(q, k, v, inv_freq, prompt_length, key_padding_mask, use_lampe, window, sink, mapping_length, preset,
      pretrained_window, temperature, rotary_dim, interleaved, scale, num_threads):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def lampe_attention(q, k, v, config: Optional[LampeConfig], inv_freq, *, prompt_length=None,
                    key_padding_mask=None, rotary_dim=None, layout="half", scale=None, num_threads=None):
    """Convenience wrapper: call ``torch.ops.lampe.attention`` with a LampeConfig."""
    c = config
    mapping_length = c.mapping_length if c is not None and isinstance(c.mapping_length, int) else 0
    preset = c.mapping_length if c is not None and isinstance(c.mapping_length, str) else ""
    if not torch.is_tensor(inv_freq):
        inv_freq = torch.as_tensor(inv_freq, dtype=torch.float32)
    if prompt_length is not None and not torch.is_tensor(prompt_length):
        prompt_length = torch.full((q.shape[0],), int(prompt_length), dtype=torch.int64)
    return torch.ops.lampe.attention(
        q, k, v, inv_freq, prompt_length, key_padding_mask, c is not None, c.window if c else 1, c.sink if c else 1,
        mapping_length or 1, preset, (c.pretrained_window or 0) if c else 0, c.temperature if c else 1.0,
        rotary_dim or 0, layout == "interleaved", float(scale or 0.0), int(num_threads or 0))


from . import cuda as _cuda  # noqa: F401,E402  (registers the CUDA kernel or the pure-torch fallback)
