#!/usr/bin/env python
"""Benchmark of lampe's fused attention against PyTorch, with machine ceilings measured in the same run.

Contenders, all fed the same un-rotated q, k, v (torch CPU tensors) in one process:

  lampe-LaMPE   lampe.attention(config=LampeConfig(window=512, sink=200, mapping_length="llama3"))
  lampe-causal  lampe.attention(config=None): plain causal RoPE attention through the same kernel
  torch-SDPA    RoPE in torch + F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
  torch-LaMPE   LaMPE written in plain PyTorch, as a user would without lampe: per-region RoPE
                copies, aten flash attention per region (is_causal where the region is a causal
                triangle, query chunks with an additive mask where it is not), log-sum-exp merge

Every timing includes the rotary embedding (lampe rotates inside its kernel, so the torch contenders
rotate q and k inside the timed region too); decode SDPA rotates only the new query, because a
KV cache holds keys already rotated. See bench/README.md for the formulas.

    PYTHONPATH=. python bench/attention.py --quick
    PYTHONPATH=. python bench/attention.py --lengths 2048 8192 --dtypes float32
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as F  # noqa: E402
except ImportError:  # pragma: no cover - the benchmark is meaningless without its contenders
    sys.exit("bench/attention.py needs PyTorch: pip install torch==2.13.0")

import lampe  # noqa: E402
import _probes  # noqa: E402
from _common import (CLEAN_PCT, ORIG_CPUS, cpu_snapshot, fmt as _fmt, foreign_pct, pin, time_interleaved,  # noqa: E402
                     wait_idle, write_json)  # noqa: E402

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ROPE_BASE = 500000.0  # Llama 3's rope_theta; the kernels' cost does not depend on it
LAMPE_CFG = lampe.LampeConfig(window=512, sink=200, mapping_length="llama3")


# ---------------------------------------------------------------- RoPE in torch

def inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def rope_torch(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor, amplitude: float = 1.0):
    """Rotate-half RoPE of x [..., n, D] at integer ``positions`` [n]: angle = f32(f32(p) * f) as
    transformers computes it; cos/sin scaled by ``amplitude`` (LaMPE's s). The arithmetic is in
    float32 and the result is cast back, so bf16 loses nothing before attention."""
    ang = positions.to(torch.float32)[:, None] * freq[None, :]
    c, s = torch.cos(ang), torch.sin(ang)
    if amplitude != 1.0:
        c, s = c * amplitude, s * amplitude
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    out = torch.empty(x.shape, dtype=x.dtype)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    return out


# ---------------------------------------------------------------- contenders

def flash_gqa(q, k, v, is_causal=False, mask=None, scale=None):
    """aten CPU flash attention with grouped KV heads: query heads are viewed as [B*Hkv, G] and
    each KV head is broadcast over its group with a stride-0 expand, so nothing is repeated in
    memory. Returns (out [B, Hq, n, D], lse [B, Hq, n] float32, natural log)."""
    B, Hq, n, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B * Hkv, G, n, D)
    kg = k.reshape(B * Hkv, 1, nk, D).expand(B * Hkv, G, nk, D)
    vg = v.reshape(B * Hkv, 1, nk, D).expand(B * Hkv, G, nk, D)
    o, lse = FLASH(qg, kg, vg, 0.0, is_causal, attn_mask=mask, scale=scale)
    return o.reshape(B, Hq, n, D), lse.reshape(B, Hq, n)


def band_mask(row0: int, nrows: int, key0: int, nkeys: int, lo_dist: int, hi_dist: int) -> torch.Tensor:
    """Additive float32 mask [nrows, nkeys] allowing lo_dist <= i - j <= hi_dist for absolute
    query rows row0.. and keys key0.. (-inf elsewhere)."""
    i = torch.arange(row0, row0 + nrows)[:, None]
    j = torch.arange(key0, key0 + nkeys)[None, :]
    d = i - j
    ok = (d >= lo_dist) & (d <= hi_dist)
    return torch.zeros(nrows, nkeys).masked_fill_(~ok, float("-inf"))


def banded_attention(q, k, v, rows: range, lo_dist: int, hi_dist: int, chunk: int, scale, masks: dict):
    """Attention of query rows ``rows`` (indices into q) to keys at distance lo_dist..hi_dist
    (indices into k/v share q's index space), one chunk of queries at a time so that no
    L x L mask or score matrix ever exists. Every row must see at least one key."""
    B, Hq, _, D = q.shape
    n = len(rows)
    out = torch.empty(B, Hq, n, D, dtype=q.dtype)
    lse = torch.empty(B, Hq, n, dtype=torch.float32)
    for c0 in range(rows.start, rows.stop, chunk):
        c1 = min(rows.stop, c0 + chunk)
        k0 = max(0, c0 - hi_dist)
        k1 = c1 - lo_dist  # exclusive
        # Interior chunks share one relative mask: build it once per shape.
        key = (c0 - k0, c1 - c0, k1 - k0, lo_dist, hi_dist)
        mask = masks.get(key)
        if mask is None:
            mask = masks[key] = band_mask(c0, c1 - c0, k0, k1 - k0, lo_dist, hi_dist)
        o, l = flash_gqa(q[:, :, c0:c1], k[:, :, k0:k1], v[:, :, k0:k1], mask=mask, scale=scale)
        out[:, :, c0 - rows.start:c1 - rows.start] = o
        lse[:, :, c0 - rows.start:c1 - rows.start] = l
    return out, lse


def merge_lse(acc, acc_lse, row0: int, o, l):
    """Fold a region's (out, lse) for rows row0.. into the float32 accumulator (acc, acc_lse):
    one softmax over the union of the regions' visits, written with the max trick."""
    a, al = acc[:, :, row0:], acc_lse[:, :, row0:]
    mx = torch.maximum(al, l)
    w1, w2 = torch.exp(al - mx), torch.exp(l - mx)
    tot = w1 + w2
    a.mul_((w1 / tot)[..., None]).add_(o.float() * (w2 / tot)[..., None])
    al.copy_(mx + torch.log(tot))


def torch_lampe_prompt(q, k, v, plan, freq, amplitude, scale=None, chunk=512):
    """LaMPE prefill (reference mode) in plain PyTorch; see region_table() for the regions.

    local: rows i, keys i-H..i, true positions          -> banded: chunked masks
    map:   rows i >= H, keys i-(L-R)..i-H, q at m[i]+b1, k at m[j]
           rows H..L-R see keys 0..i-H: a causal triangle   -> is_causal
           the last R-1 rows lose their oldest keys         -> chunked masks
    sink:  rows i >= L-R, keys 0..i-(L-R), q at i-b2, k at j -> is_causal
    Returns out in q's dtype."""
    B, Hq, L, D = q.shape
    pos = torch.arange(L)
    qt = rope_torch(q, pos, freq, amplitude)
    kt = rope_torch(k, pos, freq, amplitude)
    if plan.fallback:  # L < 2H: one causal attention at true positions (s still applies)
        return flash_gqa(qt, kt, v, is_causal=True, scale=scale)[0]
    H, R, b1, b2 = plan.window, plan.sink_size, plan.bias_map, plan.bias_sink
    m = torch.tensor(plan.mapped_ids, dtype=torch.int64)  # a copy: the plan's array is read-only
    masks: dict = {}

    out_l, lse_l = banded_attention(qt, kt, v, range(0, L), 0, H, chunk, scale, masks)
    acc = out_l.float()  # float32 accumulator; for float32 inputs this is out_l itself
    acc_lse = lse_l

    # map region, in its own index space: query row a = i - H (0..L-H-1) against keys 0..L-H-1,
    # allowed 0 <= a - j <= L-R-H.
    qm = rope_torch(q[:, :, H:], m[H:] + b1, freq, amplitude)
    km = rope_torch(k[:, :, :L - H], m[:L - H], freq, amplitude)
    vm = v[:, :, :L - H]
    span = L - R - H
    o1, l1 = flash_gqa(qm[:, :, :span + 1], km[:, :, :span + 1], vm[:, :, :span + 1], is_causal=True, scale=scale)
    if span + 1 < L - H:
        o2, l2 = banded_attention(qm, km, vm, range(span + 1, L - H), 0, span, chunk, scale, masks)
        o_map, l_map = torch.cat([o1, o2], dim=2), torch.cat([l1, l2], dim=2)
    else:
        o_map, l_map = o1, l1
    del qm, km, o1, l1
    merge_lse(acc, acc_lse, H, o_map, l_map)
    del o_map, l_map

    # sink region: query rows L-R.. against keys 0..R-1, a causal triangle.
    qs = rope_torch(q[:, :, L - R:], pos[L - R:] - b2, freq, amplitude)
    o_s, l_s = flash_gqa(qs, kt[:, :, :R], v[:, :, :R], is_causal=True, scale=scale)
    merge_lse(acc, acc_lse, L - R, o_s, l_s)
    return acc.to(q.dtype)


def region_table(L: int, plan, i: int) -> list:
    """The regions torch_lampe_prompt implements for prompt row i, as (name, lo, hi, qpos, kpos)."""
    H, R, b1, b2, m = plan.window, plan.sink_size, plan.bias_map, plan.bias_sink, plan.mapped_ids
    if plan.fallback:
        return [("full", 0, i, i, np.arange(0, i + 1))]
    out = [("local", max(0, i - H), i, i, np.arange(max(0, i - H), i + 1))]
    if i >= H:
        lo, hi = max(0, i - (L - R)), i - H
        out.append(("map", lo, hi, int(m[i]) + b1, m[lo:hi + 1]))
    if i >= L - R:
        out.append(("sink", 0, i - (L - R), i - b2, np.arange(0, i - (L - R) + 1)))
    return out


def check_regions(L: int, cfg) -> int:
    """Compare region_table with lampe.plan(L).regions() on every row; returns the mismatches."""
    plan = lampe.plan(L, cfg)
    bad = 0
    for i in range(L):
        mine = region_table(L, plan, i)
        theirs = [(r.name, r.key_lo, r.key_hi, r.qpos, r.kpos) for r in plan.regions(i)]
        same = len(mine) == len(theirs) and all(
            a[:4] == b[:4] and np.array_equal(a[4], b[4]) for a, b in zip(mine, theirs))
        if not same:
            if bad < 3:
                print(f"  region mismatch at L={L} row {i}:\n    mine   {[x[:4] for x in mine]}\n"
                      f"    lampe  {[x[:4] for x in theirs]}")
            bad += 1
    return bad


def check_pure_torch(nthreads: int, chunk: int) -> dict:
    """Validate the pure-PyTorch LaMPE before timing it: its regions against plan.regions() on
    every row, and its output against lampe.attention on small cases (one where the map is
    stretched, U > L, and one where it is compressed into chunks, U < L)."""
    pin(nthreads)
    res = {}
    for L in (2048, 4096):
        nbad = check_regions(L, LAMPE_CFG)
        g = torch.Generator().manual_seed(L)
        q = torch.randn(1, 4, L, 64, generator=g)
        k = torch.randn(1, 1, L, 64, generator=g)
        v = torch.randn(1, 1, L, 64, generator=g)
        f = inv_freq(64)
        plan = lampe.plan(L, LAMPE_CFG)
        ref = lampe.attention(q, k, v, config=LAMPE_CFG, inv_freq=f, num_threads=nthreads)
        mine = torch_lampe_prompt(q, k, v, plan, f, LAMPE_CFG.temperature, chunk=chunk)
        diff = float((ref - mine).abs().max())
        print(f"check torch-LaMPE vs lampe.attention  L={L} Hq=4 Hkv=1 D=64 float32 "
              f"(U={plan.mapping_length}, R={plan.sink_size}): region mismatches {nbad}, max|diff| {diff:.3e}")
        res[str(L)] = {"region_mismatches": nbad, "max_abs_diff": diff}
    return res


# ---------------------------------------------------------------- the grid

def timing_fields(r) -> dict:
    """The timing part of a record, from one contender's time_interleaved() result."""
    return dict(ms=r["median_s"] * 1e3, ms_samples=[t * 1e3 for t in r["samples"]],
                other_cpu_pct=r["other_pct"], other_cpu_pct_samples=r["other_pcts"], clean=r["clean"],
                n_clean=r["n_clean"])


def isa_levels(dtype_name: str, L: int, args) -> list:
    """The kernel levels lampe is timed at for this case: the default level without --isa;
    with --isa, the levels named (``all``: every available one), float32 dropping the levels
    above avx512 (they run the avx512 float32 kernels), and above --isa-max-length only the best
    level of the dtype (the full grid at 32K would outlast a session)."""
    avail = lampe.available_isas()
    if not args.isa:
        return [lampe.info.current_isa()]
    want = avail if "all" in args.isa else [lvl for lvl in avail if lvl in args.isa]
    if dtype_name != "bf16":
        want = [lvl for lvl in want if lvl not in ("avx512bf16", "amx")] or want[:1]
    if L > args.isa_max_length:
        want = want[-1:]
    return want


def lampe_name(base: str, lvl: str, levels: list, args) -> str:
    return f"{base}@{lvl}" if args.isa else base


def set_level(lvl: str):
    return lambda: lampe.set_cpu_isa(lvl)


def prompt_case(L, dtype_name, nthreads, args, peaks, records, ratios):
    dt = DTYPES[dtype_name]
    B, Hq, Hkv, D = 1, args.hq, args.hkv, args.head_dim
    g = torch.Generator().manual_seed(1234 + L)
    q = torch.randn(B, Hq, L, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dt)
    f = inv_freq(D)
    fnp = f.numpy()
    pos = torch.arange(L)
    plan = lampe.plan(L, LAMPE_CFG)
    flops = 4.0 * D * L * (L + 1) / 2 * Hq * B  # each causal (query, key) pair once
    pin(nthreads)
    note_lampe = ("fallback (L < 2H): causal with s^2" if plan.fallback
                  else f"U={plan.mapping_length} R={plan.sink_size}")
    levels = isa_levels(dtype_name, L, args)
    best = lampe.available_isas()[-1]

    contenders = []
    for lvl in levels:
        contenders += [
            (lampe_name("lampe-LaMPE", lvl, levels, args),
             lambda: lampe.attention(q, k, v, config=LAMPE_CFG, inv_freq=fnp, num_threads=nthreads), set_level(lvl)),
            (lampe_name("lampe-causal", lvl, levels, args),
             lambda: lampe.attention(q, k, v, config=None, inv_freq=fnp, num_threads=nthreads), set_level(lvl)),
        ]
    contenders += [
        ("torch-SDPA", lambda: F.scaled_dot_product_attention(
            rope_torch(q, pos, f), rope_torch(k, pos, f), v, is_causal=True, enable_gqa=True), None),
        ("torch-LaMPE", lambda: torch_lampe_prompt(q, k, v, plan, f, LAMPE_CFG.temperature, chunk=args.chunk), None),
    ]
    skip = None
    if args.skip_pure_torch or L > args.max_pure_torch_length:
        skip = ("--skip-pure-torch" if args.skip_pure_torch
                else f"L > --max-pure-torch-length {args.max_pure_torch_length}")
        contenders = [c for c in contenders if c[0] != "torch-LaMPE"]
    try:
        res = time_interleaved(contenders, args.warmup if args.warmup is not None else 1, args.reps, args.wait_idle)
    finally:
        lampe.set_cpu_isa(best)
    names = [(lampe_name(b, lvl, levels, args), lvl) for lvl in levels for b in ("lampe-LaMPE", "lampe-causal")]
    names += [("torch-SDPA", None), ("torch-LaMPE", None)]
    for name, lvl in names:
        peak_name, peak = peaks.compute(dtype_name, nthreads, lvl or best)
        rec = dict(kind="prompt", length=L, dtype=dtype_name, threads=nthreads, contender=name, isa=lvl, B=B, Hq=Hq,
                   Hkv=Hkv, D=D, useful_gflop=flops / 1e9, note=note_lampe if "LaMPE" in name else "")
        if name not in res:
            rec["skipped"] = skip
        else:
            rec.update(timing_fields(res[name]))
            gf = flops / res[name]["median_s"] / 1e9
            rec.update(gflops=gf, peak_name=peak_name, peak_gflops=peak, frac_peak=gf / peak if peak else None)
        records.append(rec)
    # Sanity: contenders that compute the same thing must agree (bf16 outputs differ by rounding).
    outs = {name: r["out"] for name, r in res.items()}
    times = {name: r["median_s"] for name, r in res.items()}
    for lvl in levels:
        lm, lc = lampe_name("lampe-LaMPE", lvl, levels, args), lampe_name("lampe-causal", lvl, levels, args)
        diffs = {"lampe-causal vs torch-SDPA": maxdiff(outs[lc], outs["torch-SDPA"])}
        if "torch-LaMPE" in outs:
            diffs["torch-LaMPE vs lampe-LaMPE"] = maxdiff(outs["torch-LaMPE"], outs[lm])
        ratios.append(dict(kind="prompt", length=L, dtype=dtype_name, threads=nthreads, isa=lvl,
                           lampe_over_causal=_ratio(times, lm, lc), lampe_over_sdpa=_ratio(times, lm, "torch-SDPA"),
                           pure_torch_over_lampe=_ratio(times, "torch-LaMPE", lm),
                           clean=all(r["clean"] for r in res.values()), max_abs_diff=diffs))


def decode_case(Lk, dtype_name, nthreads, args, peaks, records, ratios):
    dt = DTYPES[dtype_name]
    B, Hq, Hkv, D = 1, args.hq, args.hkv, args.head_dim
    g = torch.Generator().manual_seed(99 + Lk)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dt)
    f = inv_freq(D)
    fnp = f.numpy()
    P = Lk - 1
    plan = lampe.plan(P, LAMPE_CFG)
    # A KV cache stores rotated keys: SDPA's keys are rotated once, outside the timing.
    k_rot = rope_torch(k, torch.arange(Lk), f)
    last = torch.tensor([Lk - 1])
    kv_bytes = 2.0 * B * Hkv * Lk * D * q.element_size()
    flops = 4.0 * D * Lk * Hq * B
    pin(nthreads)
    # decode calls are short: every level of --isa at every length
    levels = isa_levels(dtype_name, 0, args)
    best = lampe.available_isas()[-1]
    contenders = []
    for lvl in levels:
        contenders += [
            (lampe_name("lampe-LaMPE", lvl, levels, args),
             lambda: lampe.attention(q, k, v, config=LAMPE_CFG, inv_freq=fnp, prompt_length=P, num_threads=nthreads),
             set_level(lvl)),
            (lampe_name("lampe-causal", lvl, levels, args),
             lambda: lampe.attention(q, k, v, config=None, inv_freq=fnp, num_threads=nthreads), set_level(lvl)),
        ]
    contenders.append(("torch-SDPA", lambda: F.scaled_dot_product_attention(rope_torch(q, last, f), k_rot, v,
                                                                            enable_gqa=True), None))
    try:
        res = time_interleaved(contenders, args.warmup if args.warmup is not None else 2, args.reps, args.wait_idle)
    finally:
        lampe.set_cpu_isa(best)
    read = peaks.read(nthreads)
    level_of = {lampe_name(b, lvl, levels, args): lvl for lvl in levels for b in ("lampe-LaMPE", "lampe-causal")}
    for name, r in res.items():
        lvl = level_of.get(name)
        peak_name, peak = peaks.compute(dtype_name, nthreads, lvl or best)
        med = r["median_s"]
        gbps = kv_bytes / med / 1e9
        note = (f"prompt {P}, U={plan.mapping_length} R={plan.sink_size}" if "LaMPE" in name else
                "keys pre-rotated (KV cache), query rotated in timing" if name == "torch-SDPA" else "")
        records.append(dict(kind="decode", length=Lk, dtype=dtype_name, threads=nthreads, contender=name, isa=lvl, B=B,
                            Hq=Hq, Hkv=Hkv, D=D, **timing_fields(r), useful_gflop=flops / 1e9, gflops=flops / med / 1e9,
                            peak_name=peak_name, peak_gflops=peak,
                            frac_peak=(flops / med / 1e9 / peak) if peak else None,
                            kv_bytes=kv_bytes, gbps=gbps, read_gbps_probe=read,
                            frac_read=gbps / read if read else None, note=note))
    times = {name: r["median_s"] for name, r in res.items()}
    for lvl in levels:
        lm, lc = lampe_name("lampe-LaMPE", lvl, levels, args), lampe_name("lampe-causal", lvl, levels, args)
        diffs = {"lampe-causal vs torch-SDPA": maxdiff(res[lc]["out"], res["torch-SDPA"]["out"])}
        ratios.append(dict(kind="decode", length=Lk, dtype=dtype_name, threads=nthreads, isa=lvl,
                           lampe_over_causal=_ratio(times, lm, lc), lampe_over_sdpa=_ratio(times, lm, "torch-SDPA"),
                           pure_torch_over_lampe=None, clean=all(r["clean"] for r in res.values()),
                           max_abs_diff=diffs))


def maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _ratio(times, a, b):
    return times[a] / times[b] if a in times and b in times else None


class Peaks:
    """Probe results by thread count, and the matching ceiling for each case."""

    # the vector width each kernel level computes float32 with (the levels above avx512 use
    # avx512 for float32; the scalar level is compiled for the baseline, SSE2 on x86-64)
    FMA_WIDTH = {"scalar": "sse", "avx2": "avx2", "avx512": "avx512", "avx512bf16": "avx512", "amx": "avx512"}

    def __init__(self, probes: dict):
        self.p = probes

    def _get(self, n, key):
        rec = self.p.get("by_threads", {}).get(str(n))
        return rec.get(key) if rec else None

    def compute(self, dtype_name, n, isa=None):
        """(name, GFLOP/s) of the ceiling of kernel level ``isa`` (default: the widest fp32 FMA):
        bf16 on amx: the AMX tile probe; bf16 on avx512bf16: VDPBF16PS; otherwise the fp32 FMA
        probe of the level's vector width."""
        if dtype_name != "float32" and isa == "amx" and self._get(n, "amx_gflops"):
            return "amx-bf16", self._get(n, "amx_gflops")
        if dtype_name != "float32" and isa in ("avx512bf16", "amx") and self._get(n, "bf16_dot_gflops"):
            return "bf16-dot", self._get(n, "bf16_dot_gflops")
        width = self.FMA_WIDTH.get(isa) if isa else None
        by_isa = self._get(n, "fma_by_isa") or {}
        if width and by_isa.get(width):
            return f"fp32-fma({width})", by_isa[width]
        fma = self._get(n, "fma_gflops")
        return (f"fp32-fma({self.p.get('isa')})", fma) if fma else (None, None)

    def read(self, n):
        return self._get(n, "read_gbps")


def thread_scaling(args, peaks, L):
    """lampe LaMPE prompt, float32, at 1 thread and at --threads, interleaved on identical inputs."""
    B, Hq, Hkv, D = 1, args.hq, args.hkv, args.head_dim
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    fnp = inv_freq(D).numpy()
    flops = 4.0 * D * L * (L + 1) / 2 * Hq * B
    counts = sorted({1, args.threads})

    def contender(n):
        return (str(n), lambda: lampe.attention(q, k, v, config=LAMPE_CFG, inv_freq=fnp, num_threads=n),
                lambda: pin(n))

    res = time_interleaved([contender(n) for n in counts], args.warmup if args.warmup is not None else 1,
                           args.reps, args.wait_idle)
    out = {"length": L, "dtype": "float32", "contender": "lampe-LaMPE", "by_threads": {}}
    for n in counts:
        r = res[str(n)]
        _, peak = peaks.compute("float32", n, lampe.info.current_isa())
        gf = flops / r["median_s"] / 1e9
        out["by_threads"][str(n)] = dict(**timing_fields(r), gflops=gf, peak_gflops=peak,
                                         frac_peak=gf / peak if peak else None)
    if args.threads > 1:
        t1 = out["by_threads"]["1"]["ms"]
        tn = out["by_threads"][str(args.threads)]["ms"]
        out["speedup"] = t1 / tn
        out["efficiency"] = t1 / tn / args.threads
    pin(args.threads)
    return out


# ---------------------------------------------------------------- report

def clean_mark(r) -> str:
    if r.get("n_clean") is not None:
        return f"{r['n_clean']}/{len(r['ms_samples'])}"
    return "ok" if r.get("clean") else "NOISY"


def print_isa_summary(records):
    """The per-level table of issue 10: for each case and kernel level, LaMPE and causal times,
    LaMPE over causal and over torch SDPA, the fraction of the level's ceiling, and bf16 over
    lampe's own float32 at the best float32 level (prompt: time ratio f32 / bf16, i.e. the bf16
    speed-up; decode: the same, plus K+V GB/s over the read probe)."""
    ok = [r for r in records if "skipped" not in r]
    lam = [r for r in ok if r["contender"].startswith("lampe-LaMPE") and r.get("isa")]
    if not lam:
        return
    print()
    print("Per kernel level (lampe LaMPE; ratios are time ratios; 'bf16 x' = lampe float32 at the best float32 "
          "level / this row, same kind and length):")
    hdr = (f"{'kind':<6} {'L/Lk':>6} {'dtype':<7} {'thr':>3} {'isa':<10} {'LaMPE ms':>10} {'causal ms':>10} "
           f"{'SDPA ms':>10} {'L/causal':>8} {'L/SDPA':>7} {'%peak':>6} {'peak':<16} {'%read':>6} {'bf16 x':>6}")
    print(hdr)
    print("-" * len(hdr))

    def find(kind, L, dtype, thr, contender_prefix, isa=None):
        for r in ok:
            if (r["kind"], r["length"], r["dtype"], r["threads"]) == (kind, L, dtype, thr) and \
                    r["contender"].startswith(contender_prefix) and (isa is None or r.get("isa") == isa):
                return r
        return None

    for r in lam:
        key = (r["kind"], r["length"], r["dtype"], r["threads"])
        causal = find(*key, "lampe-causal", r["isa"])
        sdpa = find(*key, "torch-SDPA")
        f32 = [x for x in lam if (x["kind"], x["length"], x["dtype"], x["threads"]) == (key[0], key[1], "float32", key[3])]
        f32_best = min((x["ms"] for x in f32), default=None)
        speed = f32_best / r["ms"] if f32_best and r["dtype"] != "float32" else None
        print(f"{key[0]:<6} {key[1]:>6} {key[2]:<7} {key[3]:>3} {r['isa']:<10} {r['ms']:>10.2f} "
              f"{_fmt(causal and causal['ms'], '.2f'):>10} {_fmt(sdpa and sdpa['ms'], '.2f'):>10} "
              f"{_fmt(causal and r['ms'] / causal['ms'], '.3f'):>8} {_fmt(sdpa and r['ms'] / sdpa['ms'], '.3f'):>7} "
              f"{_fmt(r['frac_peak'] and 100 * r['frac_peak'], '.1f'):>6} {r['peak_name'] or '-':<16} "
              f"{_fmt(r.get('frac_read') and 100 * r['frac_read'], '.1f'):>6} {_fmt(speed, '.2f'):>6}")


def print_tables(records, ratios, scaling, probes, args):
    print()
    print(f"Machine ceilings (same run, pinned threads; best of 3; other processes took "
          f"{_fmt(probes.get('other_cpu_pct'), '.0f')}% CPU meanwhile):")
    for n, rec in sorted(probes.get("by_threads", {}).items()):
        fma = ", ".join(f"{isa} {_fmt(v, '.1f')}" for isa, v in (rec.get("fma_by_isa") or {}).items())
        print(f"  {n} thread(s) on CPUs {rec['cpus']}: fp32 FMA GFLOP/s ({fma or _fmt(rec['fma_gflops'], '.1f')}), "
              f"bf16 dot {_fmt(rec['bf16_dot_gflops'], '.1f', 'n/a (no avx512bf16)')}, "
              f"AMX bf16 {_fmt(rec.get('amx_gflops'), '.1f', 'n/a (no amx)')}, "
              f"streaming read {_fmt(rec['read_gbps'], '.1f')} GB/s")
    if not probes.get("compiler_ok"):
        print(f"  probes unavailable: {probes.get('error')}")
    print()
    cw = max([12] + [len(r["contender"]) for r in records])
    hdr = (f"{'kind':<6} {'L/Lk':>6} {'dtype':<7} {'thr':>3} {'contender':<{cw}} {'ms':>10} {'GFLOP/s':>8} "
           f"{'%peak':>6} {'peak':<16} {'GB/s':>6} {'%read':>6} {'other%':>6} {'clean':>5}  note")
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        if "skipped" in r:
            print(f"{r['kind']:<6} {r['length']:>6} {r['dtype']:<7} {r['threads']:>3} {r['contender']:<{cw}} "
                  f"{'skipped':>10} {'':>8} {'':>6} {'':<16} {'':>6} {'':>6} {'':>6} {'':>5}  {r['skipped']}")
            continue
        print(f"{r['kind']:<6} {r['length']:>6} {r['dtype']:<7} {r['threads']:>3} {r['contender']:<{cw}} "
              f"{r['ms']:>10.2f} {r['gflops']:>8.1f} {_fmt(r['frac_peak'] and 100 * r['frac_peak'], '.1f'):>6} "
              f"{r['peak_name'] or '-':<16} {_fmt(r.get('gbps'), '.2f'):>6} "
              f"{_fmt(r.get('frac_read') and 100 * r['frac_read'], '.1f'):>6} {_fmt(r.get('other_cpu_pct'), '.0f'):>6} "
              f"{clean_mark(r):>5}  {r.get('note', '')}")
    print("%peak: useful GFLOP/s over the probe named in 'peak' at the same thread count; %read: decode K+V "
          "bytes/s over the streaming-read probe;\nother%: CPU time other processes took during the timed "
          f"repetitions, in % of the pinned CPUs (should be ~0); clean: samples with other% < {CLEAN_PCT:.0f} that "
          "the median is taken over\n(k/n; 'ok'/'NOISY' for calls too short to judge one by one); a NOISY row "
          "measured a shared machine, not lampe.")
    print()
    print("Time ratios (lower is better for lampe in the first two; the third is lampe's speed-up over "
          "plain PyTorch LaMPE):")
    hdr = (f"{'kind':<6} {'L/Lk':>6} {'dtype':<7} {'thr':>3} {'isa':<10} {'LaMPE/causal':>12} {'LaMPE/SDPA':>10} "
           f"{'pure/LaMPE':>10} {'clean':>5}  max|diff| checks")
    print(hdr)
    print("-" * len(hdr))
    for r in ratios:
        d = ", ".join(f"{k}: {v:.2e}" for k, v in r["max_abs_diff"].items())
        print(f"{r['kind']:<6} {r['length']:>6} {r['dtype']:<7} {r['threads']:>3} {r.get('isa') or '-':<10} "
              f"{_fmt(r['lampe_over_causal'], '.3f'):>12} {_fmt(r['lampe_over_sdpa'], '.3f'):>10} "
              f"{_fmt(r['pure_torch_over_lampe'], '.2f'):>10} {'ok' if r['clean'] else 'NOISY':>5}  {d}")
    print_isa_summary(records)
    if scaling:
        print()
        print(f"Thread scaling, lampe LaMPE prompt, L={scaling['length']} float32:")
        for n, r in sorted(scaling["by_threads"].items(), key=lambda kv: int(kv[0])):
            print(f"  {n} thread(s): {r['ms']:10.2f} ms  {r['gflops']:7.1f} GFLOP/s  "
                  f"{_fmt(r['frac_peak'] and 100 * r['frac_peak'], '.1f')}% of the {n}-thread fp32 FMA probe  "
                  f"(other processes {_fmt(r.get('other_cpu_pct'), '.0f')}% CPU, clean {clean_mark(r)})")
        if "speedup" in scaling:
            print(f"  speed-up 1 -> {args.threads} threads: {scaling['speedup']:.2f}x "
                  f"(parallel efficiency {100 * scaling['efficiency']:.0f}%)")


# ---------------------------------------------------------------- main

def main(argv=None):
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU benchmark (bench/attention_cuda.py; its own flags: --quick, --json, "
                             "--profile)")
    known, rest = device.parse_known_args(argv)
    if known.device == "cuda":  # the GPU benchmark is its own module: forward the other flags there
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from attention_cuda import main as cuda_main
        return cuda_main(rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[device])
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke run: L 1024 2048, decode 4096, Hq=8 Hkv=2, short probes")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 2048 8192 32768)")
    ap.add_argument("--decode-lengths", type=int, nargs="*",
                    help="decode cache lengths Lk (default 8192 32768 131072); the flag with no values skips decode")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bf16"], default=["float32", "bf16"])
    ap.add_argument("--isa", nargs="+", metavar="LEVEL",
                    help="time lampe at these kernel levels side by side ('all': every available one; float32 "
                         "skips avx512bf16/amx, which run the avx512 float32 kernels); default: the best level only")
    ap.add_argument("--isa-max-length", type=int, default=8192,
                    help="above this prompt length --isa times only the best level of each dtype (default 8192)")
    ap.add_argument("--threads", type=int, default=len(ORIG_CPUS),
                    help=f"threads for the grid (default: the affinity count, {len(ORIG_CPUS)})")
    ap.add_argument("--hq", type=int, help="query heads (default 32; 8 with --quick)")
    ap.add_argument("--hkv", type=int, help="key/value heads (default 8; 2 with --quick)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, help="timed repetitions per case (default: by call length)")
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (default 1, decode 2)")
    ap.add_argument("--skip-pure-torch", action="store_true", help="do not run the pure-PyTorch LaMPE")
    ap.add_argument("--max-pure-torch-length", type=int, default=8192,
                    help="skip the pure-PyTorch LaMPE above this prompt length (default 8192)")
    ap.add_argument("--chunk", type=int, default=512, help="query chunk of the pure-PyTorch masked regions")
    ap.add_argument("--scaling-length", type=int,
                    help="L of the 1-vs-N-thread run (default 8192; 2048 with --quick; 0 skips it)")
    ap.add_argument("--probe-seconds", type=float, help="seconds per probe run (default 0.5; 0.1 with --quick)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each contender, wait up to S seconds for other processes to go quiet "
                         "(< 10%% of the pinned CPUs); for shared machines")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "attention.json"))
    args = ap.parse_args(argv)

    q = args.quick
    args.lengths = args.lengths or ([1024, 2048] if q else [2048, 8192, 32768])
    if args.decode_lengths is None:
        args.decode_lengths = [4096] if q else [8192, 32768, 131072]
    args.hq = args.hq or (8 if q else 32)
    args.hkv = args.hkv or (2 if q else 8)
    if args.scaling_length is None:
        args.scaling_length = 2048 if q else 8192
    if args.quick and args.reps is None:
        args.reps = 3
    probe_s = args.probe_seconds or (0.1 if q else 0.5)
    if not 1 <= args.threads <= len(ORIG_CPUS):
        ap.error(f"--threads must be in 1..{len(ORIG_CPUS)}")
    if args.hq % args.hkv:
        ap.error("--hq must be a multiple of --hkv")
    if args.isa:
        bad = [x for x in args.isa if x != "all" and x not in lampe.info.ISA_LEVELS]
        if bad:
            ap.error(f"--isa: unknown level(s) {bad} (levels: {', '.join(lampe.info.ISA_LEVELS)}, or all)")
        if not any(x == "all" or x in lampe.available_isas() for x in args.isa):
            ap.error(f"--isa: none of {args.isa} is available here (available: {lampe.available_isas()})")

    t_start = time.perf_counter()
    thread_counts = sorted({1, args.threads})
    print(f"lampe {lampe.__version__}, torch {torch.__version__}, CPUs {ORIG_CPUS}, grid threads {args.threads}")
    print(f"probing machine ceilings ({thread_counts} threads, {probe_s}s per run) ...", flush=True)
    if args.wait_idle:
        wait_idle(args.wait_idle)
    snap = cpu_snapshot()
    probes = _probes.measure_all(thread_counts, seconds=probe_s, read_bytes=(1 << 28) if q else (1 << 30))
    probes["other_cpu_pct"] = foreign_pct(snap, cpu_snapshot())
    peaks = Peaks(probes)
    machine = lampe.show_config(print_it=False)
    machine["torch"] = torch.__version__
    machine["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()

    checks = None
    if not args.skip_pure_torch:
        checks = check_pure_torch(args.threads, args.chunk)
        worst = max(c["max_abs_diff"] for c in checks.values())
        if worst > 1e-3 or any(c["region_mismatches"] for c in checks.values()):
            print("WARNING: the pure-PyTorch LaMPE disagrees with lampe.attention; its timings are not comparable")

    records, ratios = [], []
    result = {"benchmark": "attention", "args": vars(args), "machine": machine, "probes": probes,
              "pure_torch_check": checks, "records": records, "ratios": ratios, "thread_scaling": None,
              "timing": "median of the (clean) timed repetitions after warm-up, contenders round-robin; "
                        "RoPE included for every contender", "complete": False}

    def save_partial():
        # After every case: a long grid killed at 32K still leaves everything measured before it.
        if args.json:
            result["wall_s"] = time.perf_counter() - t_start
            write_json(args.json, result)

    for dname in args.dtypes:
        for L in args.lengths:
            print(f"prompt L={L} {dname} ...", flush=True)
            prompt_case(L, dname, args.threads, args, peaks, records, ratios)
            gc.collect()  # the case's tensors die with its frame; collect cycles before the next
            save_partial()
        for Lk in args.decode_lengths:
            print(f"decode Lk={Lk} {dname} ...", flush=True)
            decode_case(Lk, dname, args.threads, args, peaks, records, ratios)
            gc.collect()
            save_partial()
    scaling = None
    if args.scaling_length:
        print(f"thread scaling L={args.scaling_length} float32 ...", flush=True)
        scaling = thread_scaling(args, peaks, args.scaling_length)
        result["thread_scaling"] = scaling

    print_tables(records, ratios, scaling, probes, args)
    elapsed = time.perf_counter() - t_start
    print(f"\nwall time {elapsed:.1f} s")
    result.update(complete=True, wall_s=elapsed)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
