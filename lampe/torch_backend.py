"""Pure-PyTorch LaMPE attention with the semantics of lampe.attention, for devices the C kernel
does not serve (CUDA until a CUDA kernel exists, MPS) and as a CPU cross-check (backend="torch").

Per batch row it rotates the keys once per key-position rule, then processes queries in chunks:
each chunk builds its per-region logits over all keys with -inf outside the region, and one
softmax over the concatenation merges the regions exactly (duplicated keys count twice). Memory
is O(chunk x Lk) per head, never Lq x Lk.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .config import LampeConfig
from ._arrays import resolve_softcap
from .positions import batch_layout, row_plans

_CHUNK = 256


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int, layout: str,
            amp: float) -> torch.Tensor:
    """x [..., n, D] (float32 or float64) rotated by integer positions pos [n]; float32 angles
    (spec §0), whose cos and sin are taken in x's precision."""
    ang = (pos.to(torch.float32)[:, None] * inv_freq[None, :]).to(x.dtype)
    c, s = torch.cos(ang) * amp, torch.sin(ang) * amp
    out = x.clone()
    h = rotary_dim // 2
    if layout == "half":
        x1, x2 = x[..., :h], x[..., h:rotary_dim]
        out[..., :h] = x1 * c - x2 * s
        out[..., h:rotary_dim] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = x1 * c - x2 * s
        out[..., 1:rotary_dim:2] = x2 * c + x1 * s
    return out


def attention(q, k, v, *, config: Optional[LampeConfig], inv_freq, prompt_length=None, key_padding_mask=None,
              query_start=None, rotary_dim=None, layout="half", scale=None, softcap=None, return_lse=False,
              amplitude=None):
    """Same arguments and results as :func:`lampe.attention`, on any torch device, including the
    NaN policy (a row attending a NaN/inf element is NaN; unattended elements never matter) and
    ``query_start``/``softcap``/trailing slots in ``key_padding_mask``; differentiable.
    ``amplitude`` overrides the config's temperature (e.g. temperature x the model's mscale).
    Computes in float32, or in float64 when q is float64 (then lse is float64 too), so that
    gradients of this backend can be checked at float64 precision."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rd = D if rotary_dim is None else int(rotary_dim)
    dev = q.device
    f = torch.as_tensor(np.asarray(inv_freq, dtype=np.float32) if not torch.is_tensor(inv_freq) else inv_freq,
                        dtype=torch.float32, device=dev)
    if f.ndim != 1 or f.shape[0] != rd // 2:
        raise ValueError(f"inv_freq must be 1-D with rotary_dim/2 = {rd // 2} entries, got shape {tuple(f.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cap = resolve_softcap(softcap)
    amp = (config.temperature if config is not None else 1.0) if amplitude is None else float(amplitude)
    rows = batch_layout(B, Lq, Lk, prompt_length, key_padding_mask, query_start)
    plans = row_plans(config, rows, Lq)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    out = torch.zeros(B, Hq, Lq, D, dtype=cdt, device=dev)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=cdt, device=dev)
    heads = torch.arange(Hq, device=dev) // G
    for b in range(B):
        o, n = int(rows.key_offset[b]), int(rows.key_count[b])
        if n <= 0:
            continue
        qs = int(rows.query_start[b])
        kb, vb = kf[b, :, o:o + n][heads], vf[b, :, o:o + n][heads]  # [Hq, n, D]: the valid keys
        # NaN policy (as the reference): a row attending a NaN/inf element outputs NaN; zeros stand
        # in for such elements so that they never reach other rows through 0 * NaN
        key_bad = ~(torch.isfinite(kb).all(-1) & torch.isfinite(vb).all(-1))  # [Hq, n]
        kb, vb = (torch.where(torch.isfinite(x), x, torch.zeros((), device=dev)) for x in (kb, vb))
        qb = qf[b]
        q_bad = ~torch.isfinite(qb).all(-1)  # [Hq, Lq]
        qb = torch.where(torch.isfinite(qb), qb, torch.zeros((), device=dev))
        pl = plans[b]
        keypos = torch.arange(n, device=dev)
        rot = {}

        def keys(mapped, shift):
            if (mapped, shift) not in rot:
                if mapped:
                    src = (keypos - shift).clamp(0, pl.length - 1)
                    kpos = torch.tensor(pl.mapped_ids, device=dev)[src]
                else:
                    kpos = keypos
                rot[(mapped, shift)] = _rotate(kb, kpos, f, rd, layout, amp)
            return rot[(mapped, shift)]

        rows_b = [t for t in range(Lq) if qs + t >= 0]
        # Rows sharing every key rule (prompt rows; any row without a plan) go in chunks; a row
        # after the prompt has its own map shift and goes alone.
        groups, cur = [], []
        for t in rows_b:
            pos = qs + t
            alone = pl is not None and not pl.fallback and pos >= pl.length
            if alone:
                groups.append([t])
            else:
                cur.append(t)
                if len(cur) == _CHUNK:
                    groups.append(cur)
                    cur = []
        if cur:
            groups.append(cur)
        for grp in groups:
            ts = torch.tensor(grp, device=dev)
            pos = [qs + t for t in grp]
            regs = [pl.regions(p) if pl is not None else None for p in pos]
            names = ["full"] if pl is None else ["local", "map", "sink", "full"]
            parts = []
            attended = torch.zeros(len(grp), n, dtype=torch.bool, device=dev)
            for name in names:
                spec = []
                for i, p in enumerate(pos):
                    if regs[i] is None:  # plain causal RoPE attention
                        spec.append((0, p, p, (False, 0)) if name == "full" else None)
                    else:
                        r = next((r for r in regs[i] if r.name == name), None)
                        spec.append(None if r is None else (r.key_lo, r.key_hi, r.qpos, (r.mapped, r.shift)))
                if all(x is None for x in spec):
                    continue
                rule = next(x[3] for x in spec if x is not None)
                lo = torch.tensor([x[0] if x else 1 for x in spec], device=dev)
                hi = torch.tensor([x[1] if x else 0 for x in spec], device=dev)
                qp = torch.tensor([x[2] if x else 0 for x in spec], device=dev)
                kr = keys(*rule)                                        # [Hq, n, D]
                qr = torch.stack([_rotate(qb[:, t][:, None, :], qp[i:i + 1], f, rd, layout, amp)[:, 0]
                                  for i, t in enumerate(grp)], dim=1)   # [Hq, rows, D]
                s = torch.einsum("hrd,hnd->hrn", qr, kr) * scale
                if cap:
                    s = cap * torch.tanh(s / cap)
                # keypos covers the valid keys only, so hi is clamped to them here
                inside = (keypos[None, :] >= lo[:, None]) & (keypos[None, :] <= hi[:, None])
                attended |= inside
                parts.append((s.masked_fill(~inside[None], -math.inf), vb))
            s_all = torch.cat([p[0] for p in parts], dim=-1)
            v_all = torch.cat([p[1] for p in parts], dim=1)
            m = s_all.amax(dim=-1, keepdim=True)
            w = torch.exp(s_all - m)
            tot = w.sum(dim=-1, keepdim=True)
            bad = q_bad[:, ts] | (attended[None] & key_bad[:, None, :]).any(-1)  # [Hq, rows]
            nan = torch.full((), math.nan, device=dev)
            out[b, :, ts] = torch.where(bad[..., None], nan, torch.einsum("hrn,hnd->hrd", w / tot, v_all))
            lse[b, :, ts] = torch.where(bad, nan, (m + torch.log(tot))[..., 0])
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
