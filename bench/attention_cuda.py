"""CUDA attention benchmark (`python bench/attention_cuda.py`, or `bench/attention.py --device cuda`,
which forwards its other flags here): Llama-3-8B attention shape (Hq=32, Hkv=8, D=128, bf16).

Prompt, L in {8K, 32K, 128K} (--quick: 8K, 32K): lampe LaMPE vs lampe plain causal vs torch SDPA
causal (flash backend) vs LaMPE as peers write it - one flash SDPA call per region with its
log-sum-exp (torch.ops.aten._scaled_dot_product_flash_attention), then a merge - and the
pure-torch backend at 8K only. Decode at cache 32K and 128K, batch 1 and 8, vs torch SDPA.
Ceilings measured in the same run: a large bf16 matmul (TFLOP/s) and a device-to-device copy
(GB/s). Timings are medians of CUDA-event-timed repeats after a warm-up; nothing is asserted.

Peer baseline note: torch's flash SDPA has no sliding window and no lower key bound, so the local
region is two calls (diagonal blocks, and the reversed off-diagonal blocks), and the map call also
covers the sink keys it should cut off - the same cost as the exact region, not the same value.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lampe  # noqa: E402
from lampe.config import MODES  # noqa: E402

HQ, HKV, D = 32, 8, 128


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def ceilings():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ a, reps=5)
    mm = 2 * n ** 3 / t / 1e12
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint16 if hasattr(torch, "uint16") else torch.int16)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=10)
    copy = 2 * x.numel() * 2 / t / 1e9  # read + write
    return mm, copy


def inv_freq():
    return (1.0 / 500000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def rot(x, pos, f):
    """HF-style rotate-half RoPE of x [B, H, n, D] at integer positions pos [n] (float32 angles)."""
    ang = pos.to(torch.float32)[:, None] * f[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * c + torch.cat([-x2, x1], -1) * s


def flash(q, k, v, causal, scale):
    k = k.repeat_interleave(HQ // HKV, dim=1) if k.shape[1] != q.shape[1] else k
    v = v.repeat_interleave(HQ // HKV, dim=1) if v.shape[1] != q.shape[1] else v
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def merge(parts):
    """One softmax over regions from (out, lse) pairs: out = sum_g exp(lse_g - lse) out_g."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    out = sum(torch.exp(p[1] - lse)[..., None].to(p[0].dtype) * p[0] for p in parts)
    return out


def peer_lampe(q, k, v, cfg, f, L):
    """LaMPE as peers write it: per-region rotations, one flash call per region, an LSE merge."""
    pl = lampe.plan(L, cfg)
    H, R, b1, b2 = cfg.window, pl.sink_size, pl.bias_map, pl.bias_sink
    m = torch.as_tensor(np.array(pl.mapped_ids), device=q.device)  # a copy: Plan arrays are read-only
    pos = torch.arange(L, device=q.device)
    s = cfg.temperature
    scale = 1.0 / math.sqrt(D)
    qt, kt = rot(q, pos, f) * s, rot(k, pos, f) * s
    n = L // H * H
    # local: diagonal H x H blocks (causal) and the reversed off-diagonal blocks
    qb = qt[:, :, :n].reshape(1, HQ, n // H, H, D).transpose(1, 2).reshape(n // H, HQ, H, D)
    kb = kt[:, :, :n].reshape(1, HKV, n // H, H, D).transpose(1, 2).reshape(n // H, HKV, H, D)
    vb = v[:, :, :n].reshape(1, HKV, n // H, H, D).transpose(1, 2).reshape(n // H, HKV, H, D)
    diag = flash(qb, kb, vb, True, scale)
    off = flash(qb[1:].flip(2), kb[:-1].flip(2), vb[:-1].flip(2), True, scale)
    # map: queries H.. at m[i] + b1, keys 0..L-H-1 at m[j]
    qm = rot(q[:, :, H:], m[H:] + b1, f) * s
    km = rot(k[:, :, : L - H], m[: L - H], f) * s
    mp = flash(qm, km, v[:, :, : L - H], True, scale)
    # sink: the last R queries at i - b2, the first R keys at j
    qs = rot(q[:, :, L - R:], pos[L - R:] - b2, f) * s
    sk = flash(qs, kt[:, :, :R], v[:, :, :R], True, scale)
    return merge([place(diag, 0, n, L, H), place(off, H, n, L, H, flipped=True), place_rows(mp, H, L),
                  place_rows(sk, L - R, L)])


def place(part, start, n, L, H, flipped=False):
    """Chunked (out, lse) [chunks, HQ, H, ...] back to rows start.. of a full [1, HQ, L] layout."""
    o, l = part
    if flipped:
        o, l = o.flip(2), l.flip(2)
    out = torch.zeros(1, HQ, L, D, device=o.device, dtype=o.dtype)
    lse = torch.full((1, HQ, L), -math.inf, device=o.device)
    rows = o.shape[0] * H
    out[:, :, start: start + rows] = o.transpose(0, 1).reshape(1, HQ, rows, D)
    lse[:, :, start: start + rows] = l.transpose(0, 1).reshape(1, HQ, rows)
    return out, lse


def place_rows(part, start, L):
    o, l = part
    out = torch.zeros(1, HQ, L, D, device=o.device, dtype=o.dtype)
    lse = torch.full((1, HQ, L), -math.inf, device=o.device)
    out[:, :, start:] = o
    lse[:, :, start:] = l
    return out, lse


def prompt_rows(L, out):
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    f = inv_freq()
    fd = torch.as_tensor(f, device="cuda")
    cfg = lampe.LampeConfig(window=512, sink=200, mapping_length="llama3", mode=MODES[0])
    causal_flops = 4 * D * HQ * L * (L + 1) / 2
    reps = 3 if L >= 65536 else 5
    case = {"case": "prompt", "L": L, "batch": 1}
    unit = lambda t: {"tflops": causal_flops / t / 1e12}  # noqa: E731
    # inv_freq on the device, as a patched model passes it (a NumPy array would add a copy per call)
    measure(out, case, "lampe LaMPE", lambda: lampe.attention(q, k, v, config=cfg, inv_freq=fd), reps, unit)
    measure(out, case, "lampe causal", lambda: lampe.attention(q, k, v, config=None, inv_freq=fd), reps, unit)
    qr, kr = rot(q, torch.arange(L, device="cuda"), fd), rot(k, torch.arange(L, device="cuda"), fd)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        kk, vv = kr.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        measure(out, case, "torch SDPA causal (flash)",
                lambda: torch.nn.functional.scaled_dot_product_attention(qr, kk, vv, is_causal=True), reps, unit)
    del kk, vv, qr, kr
    measure(out, case, "LaMPE per-region flash + merge", lambda: peer_lampe(q, k, v, cfg, fd, L), reps, unit)
    if L <= 8192:
        from lampe import torch_backend
        measure(out, case, "pure-torch backend",
                lambda: torch_backend.attention(q, k, v, config=cfg, inv_freq=f), 1, unit, warmup=1)


def measure(rows, case, impl, fn, reps, unit, warmup=2):
    """Time fn, append a row and print it at once; a failure is reported and the run goes on (one
    broken case must not hide the others' figures)."""
    try:
        t = timed(fn, reps, warmup)
    except Exception as exc:  # noqa: BLE001  reported, not hidden: the row says FAILED
        torch.cuda.empty_cache()
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append({**case, "impl": impl, "error": msg})
        print(f"{case['case']:7} {case['L']:>7} {case['batch']:>2}  {impl:32} FAILED {msg}", flush=True)
        return
    rows.append({**case, "impl": impl, "seconds": t, **unit(t)})
    print(f"{case['case']:7} {case['L']:>7} {case['batch']:>2}  {impl:32} {t * 1e3:9.2f} ms", flush=True)


def decode_rows(L, B, out):
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    f = torch.as_tensor(inv_freq(), device="cuda")
    cfg = lampe.LampeConfig(window=512, sink=200, mapping_length="llama3", mode=MODES[0])
    nbytes = 2 * B * HKV * L * D * 2
    case = {"case": "decode", "L": L, "batch": B}
    unit = lambda t: {"gbps": nbytes / t / 1e9}  # noqa: E731
    measure(out, case, "lampe LaMPE",
            lambda: lampe.attention(q, k, v, config=cfg, inv_freq=f, prompt_length=L - 1), 20, unit)
    measure(out, case, "lampe causal", lambda: lampe.attention(q, k, v, config=None, inv_freq=f), 20, unit)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        measure(out, case, "torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv), 20,
                unit)


def profile(L_prompt=32768, L_decode=32768):
    """Kernel times of one LaMPE prompt call and one decode step (torch.profiler): what the GPU
    spends, against the CUDA-event times above, which also hold the host's planning and launches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cfg = lampe.LampeConfig(window=512, sink=200, mapping_length="llama3", mode=MODES[0])
    f = torch.as_tensor(inv_freq(), device="cuda")
    for name, Lq, L in (("prompt", L_prompt, L_prompt), ("decode B=1", 1, L_decode)):
        q = torch.randn(1, HQ, Lq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
        kw = {} if Lq == L else {"prompt_length": L - 1}
        for _ in range(2):
            lampe.attention(q, k, v, config=cfg, inv_freq=f, **kw)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                lampe.attention(q, k, v, config=cfg, inv_freq=f, **kw)
            torch.cuda.synchronize()
        print(f"profile: {name}, L = {L} (3 calls)")
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60), flush=True)
                break
            except (AttributeError, KeyError, ValueError, RuntimeError):
                continue


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="prompt at 8K and 32K only")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--profile", action="store_true", help="also print kernel times of one prompt and one decode call")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    dev = torch.cuda.get_device_name(0)
    mm, copy = ceilings()
    print(f"device: {dev}; torch {torch.__version__}; lampe._cuda: {lampe.show_config(False)['cuda']}")
    print(f"ceilings (same run): bf16 matmul {mm:.0f} TFLOP/s, device copy {copy:.0f} GB/s", flush=True)
    rows = []
    for L in ([8192, 32768] if args.quick else [8192, 32768, 131072]):
        prompt_rows(L, rows)
    for L in (32768, 131072):
        for B in (1, 8):
            decode_rows(L, B, rows)
    print(f"{'case':7} {'L':>7} {'B':>2}  {'impl':32} {'ms':>9}  {'rate':>12}  {'of ceiling':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:7} {r['L']:>7} {r['batch']:>2}  {r['impl']:32} FAILED {r['error']}")
            continue
        if r["case"] == "prompt":
            rate, frac = f"{r['tflops']:.1f} TFLOP/s", r["tflops"] / mm
        else:
            rate, frac = f"{r['gbps']:.0f} GB/s", r["gbps"] / copy
        print(f"{r['case']:7} {r['L']:>7} {r['batch']:>2}  {r['impl']:32} {r['seconds'] * 1e3:9.2f}  {rate:>12}  "
              f"{frac:10.0%}")
    for L in sorted({r["L"] for r in rows if r["case"] == "prompt"}):
        t = {r["impl"]: r["seconds"] for r in rows if r["case"] == "prompt" and r["L"] == L and "seconds" in r}
        if not {"lampe LaMPE", "torch SDPA causal (flash)", "LaMPE per-region flash + merge"} <= set(t):
            continue
        print(f"prompt {L}: LaMPE / SDPA causal = {t['lampe LaMPE'] / t['torch SDPA causal (flash)']:.2f}x; "
              f"per-region flash + merge / LaMPE = {t['LaMPE per-region flash + merge'] / t['lampe LaMPE']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "torch": torch.__version__, "matmul_tflops": mm, "copy_gbps": copy,
                       "rows": rows}, fh, indent=1)
    if args.profile:
        profile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
