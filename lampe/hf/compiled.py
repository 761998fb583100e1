"""How a patched model runs its LaMPE layers under torch.compile: one opaque op per layer call.

Which rows of a forward run LaMPE, and from which plan, depends on the padding mask (read on the
host) and on the plans the cache keeps per row: decisions made with Python control flow. Traced,
each host read is a graph break in every layer, and every decision is a guard (a recompilation
when it changes). Inside one custom op whose output has a fixed shape ([B, Tq, Hq, D]),
torch.compile sees a single node with a fake implementation and specialises on none of it; the
op runs the same code as eager mode (LampeHandle.run_layer_op). What the op cannot receive as a
tensor or a number, its layer, comes from a registry of patched layers: an integer baked into the
graph. The op changes no tensor it is given: the cache's plans (an int64 CPU tensor [B]) go in
and the plans after this forward come out, and the traced code stores them on the cache; that
output also orders the layers' calls. (A mutating op would make torch re-read its whole schema
on every call to bump tensor versions: ~0.2 ms a call.)

Op schema::

    lampe::patched_layer(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor cos,
                         Tensor sin, Tensor? position_ids, Tensor kpos, Tensor? plans, SymInt q0,
                         Tensor? q0_at, int layer, float dropout, float scaling, bool? is_causal,
                         float? softcap) -> (Tensor, Tensor)

query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] (un-rotated, as the cache holds them), the
model's attention mask, its cos/sin for the query rows, kpos [B, Tk] the positions the model gave
the keys, plans [B] (None without a cache), q0 the key index of the first query row, or q0_at
holding it (a static cache's write index, read inside the op), layer the registry number; the
last two are the model's scalar attention keywords its own attention function reads. Returns
the attention output [B, Tq, Hq, D] in query's dtype, as transformers' attention functions do,
and the plans [B] after this forward.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count(1)

#: The scalar keywords of transformers' attention functions the op carries, in the order of its
#: last arguments (the others a LaMPE layer's own attention, sdpa or eager, would receive are
#: tensors it passes separately or flags that change nothing there).
SCALAR_KWARGS = ("is_causal", "softcap")


def register_layer(module) -> int:
    """A number for ``module`` that the op maps back to it (the module itself is never kept alive)."""
    number = next(_NUMBERS)
    _LAYERS[number] = module
    return number


def _layer(number: int):
    module = _LAYERS.get(number)
    handle = module.__dict__.get("_lampe_handle") if module is not None else None
    if handle is None or not handle.active:
        raise RuntimeError(f"lampe::patched_layer: layer {number} is no longer patched by lampe (a compiled graph "
                           "of a model whose lampe handle was removed; recompile after patching again)")
    return module, handle


@torch.library.custom_op("lampe::patched_layer", mutates_args=())
def patched_layer(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor], kpos: torch.Tensor,
                  plans: Optional[torch.Tensor], q0: int, q0_at: Optional[torch.Tensor], layer: int, dropout: float,
                  scaling: float, is_causal: Optional[bool],
                  softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    module, handle = _layer(layer)
    kwargs = {"position_ids": position_ids}
    kwargs.update((k, x) for k, x in zip(SCALAR_KWARGS, (is_causal, softcap)) if x is not None)
    out, new_plans = handle.run_layer_op(module, query, key, value, mask, cos, sin, kpos, plans, q0, q0_at, dropout,
                                         scaling, kwargs)
    return out.contiguous(), new_plans  # the fake implementation's layout


@patched_layer.register_fake
def _(query, key, value, mask, cos, sin, position_ids, kpos, plans, q0, q0_at, layer, dropout, scaling, is_causal,
      softcap):
    B, Hq, Tq, D = query.shape
    return query.new_empty(B, Tq, Hq, D), torch.empty(B, dtype=torch.int64, device="cpu")

