#!/usr/bin/env python
"""Rotary-embedding throughput: lampe.rope against a straightforward NumPy (and, when installed,
PyTorch) rotate-half implementation on one [B, H, L, D] block.

Throughput is GB/s of 2 * nbytes (the block read once and written once), median of --reps
timed calls after one warm-up (contenders interleaved round-robin), at 1 thread and at all
threads of the affinity mask (pinned).
Every contender computes its angles f32(f32(p) * inv_freq) and cos/sin inside the timing.

    PYTHONPATH=. python bench/rope.py --quick
    PYTHONPATH=. python bench/rope.py
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

try:  # optional: bf16 and the torch contender need it
    import torch  # noqa: E402
except ImportError:
    torch = None

import lampe  # noqa: E402
import _probes  # noqa: E402
from _common import (CLEAN_PCT, ORIG_CPUS, cpu_snapshot, fmt, foreign_pct, pin, time_interleaved,  # noqa: E402
                     wait_idle, write_json)  # noqa: E402

ROPE_BASE = 500000.0


def inv_freq(dim: int) -> np.ndarray:
    return (1.0 / ROPE_BASE ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


def rope_numpy(x: np.ndarray, pos: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """The textbook rotate-half RoPE in float32 NumPy (single-threaded: NumPy ufuncs are). Its
    temporaries and its fresh output are part of its cost, as they are for anyone who writes it."""
    ang = pos.astype(np.float32)[:, None] * freq[None, :]  # f32(f32(p) * f), as transformers does
    c, s = np.cos(ang), np.sin(ang)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = np.empty_like(x)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    return out


def rope_torch(x, pos, freq):
    """The same in PyTorch eager (multi-threaded elementwise kernels), in x's dtype, as a model's
    apply_rotary_pos_emb does it (cos/sin cast to x's dtype)."""
    ang = pos.to(torch.float32)[:, None] * freq[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    out[..., :h] = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    return out


def clean_mark(r) -> str:
    if r.get("n_clean") is not None:
        return f"{r['n_clean']}/{len(r['ms_samples'])}"
    return "ok" if r.get("clean") else "NOISY"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small block [1, 8, 2048, 128] for a smoke run")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("B", "H", "L", "D"),
                    help="block shape (default 1 32 32768 128)")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 and all)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to go quiet")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "rope.json"))
    args = ap.parse_args(argv)
    shape = tuple(args.shape or ((1, 8, 2048, 128) if args.quick else (1, 32, 32768, 128)))
    threads = sorted(set(args.threads or {1, len(ORIG_CPUS)}))
    if any(not 1 <= n <= len(ORIG_CPUS) for n in threads):
        ap.error(f"--threads must be in 1..{len(ORIG_CPUS)}")
    t_start = time.perf_counter()

    if args.wait_idle:
        wait_idle(args.wait_idle)
    snap = cpu_snapshot()
    probes = _probes.measure_all(threads, seconds=0.1 if args.quick else 0.5,
                                 read_bytes=(1 << 28) if args.quick else (1 << 30))
    probes["other_cpu_pct"] = foreign_pct(snap, cpu_snapshot())

    B, H, L, D = shape
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(shape, dtype=np.float32)
    pos = np.arange(L, dtype=np.int64)
    freq = inv_freq(D)

    # "lampe.rope" returns a new array, like the baselines, so it pays the page faults of a fresh
    # output (hundreds of ms per GiB here); "lampe out=" reuses one output: the kernel alone.
    o32 = np.empty_like(x32)
    cases = [("float32", "lampe.rope", x32, lambda n: lambda: lampe.rope(x32, pos, freq, num_threads=n)),
             ("float32", "lampe out=", x32, lambda n: lambda: lampe.rope(x32, pos, freq, num_threads=n, out=o32)),
             ("float32", "numpy", x32, lambda n: lambda: rope_numpy(x32, pos, freq))]
    if torch is not None:
        xt32 = torch.from_numpy(x32)
        xbf = xt32.to(torch.bfloat16)
        obf = torch.empty_like(xbf)
        post, freqt = torch.from_numpy(pos), torch.from_numpy(freq)
        cases += [("float32", "torch", xt32, lambda n: lambda: rope_torch(xt32, post, freqt)),
                  ("bf16", "lampe.rope", xbf, lambda n: lambda: lampe.rope(xbf, pos, freq, num_threads=n)),
                  ("bf16", "lampe out=", xbf, lambda n: lambda: lampe.rope(xbf, pos, freq, num_threads=n, out=obf)),
                  ("bf16", "torch", xbf, lambda n: lambda: rope_torch(xbf, post, freqt))]

    # Correctness first: a fast wrong kernel is no result. bf16 compares against the float32
    # NumPy result, so its error is the bf16 rounding of inputs and outputs (~1e-2 here).
    ref = rope_numpy(x32, pos, freq)
    errs = {}
    for dt, name, x, make in cases:
        y = make(len(ORIG_CPUS))()
        y = y.float().numpy() if torch is not None and isinstance(y, torch.Tensor) else y
        errs[(dt, name)] = float(np.abs(y - ref).max())
        del y
    del ref
    gc.collect()

    records = []
    for n in threads:
        pin(n)
        # Interleaved: a burst of foreign load hits every contender alike, not whichever ran then.
        res = time_interleaved([(f"{dt}|{name}", make(n), None) for dt, name, _, make in cases], 1, args.reps,
                               args.wait_idle)
        read = (probes.get("by_threads", {}).get(str(n)) or {}).get("read_gbps")
        for dt, name, x, _ in cases:
            r = res[f"{dt}|{name}"]
            nbytes = x.numel() * x.element_size() if torch is not None and isinstance(x, torch.Tensor) else x.nbytes
            med = r["median_s"]
            gbps = 2 * nbytes / med / 1e9
            records.append(dict(dtype=dt, contender=name, threads=n, shape=list(shape), bytes_moved=2 * nbytes,
                                ms=med * 1e3, ms_samples=[t * 1e3 for t in r["samples"]], gbps=gbps,
                                read_gbps_probe=read, frac_read=gbps / read if read else None,
                                max_abs_err_vs_numpy_f32=errs[(dt, name)], other_cpu_pct=r["other_pct"],
                                other_cpu_pct_samples=r["other_pcts"], clean=r["clean"], n_clean=r["n_clean"],
                                note="NumPy runs on one thread" if name == "numpy" and n > 1 else ""))
        del res
        gc.collect()
    pin(len(ORIG_CPUS))

    print(f"\nlampe {lampe.__version__} rope, block {list(shape)}, ISA {lampe.show_config(False)['isa_chosen']}, "
          f"median of {args.reps}; GB/s = 2 * nbytes / time")
    for n, rec in sorted(probes.get("by_threads", {}).items()):
        print(f"streaming-read probe, {n} thread(s): {fmt(rec['read_gbps'], '.1f')} GB/s")
    if not probes.get("compiler_ok"):
        print(f"probes unavailable: {probes.get('error')}")
    hdr = (f"{'dtype':<8} {'contender':<11} {'thr':>3} {'ms':>9} {'GB/s':>7} {'%read':>6} {'speedup':>8} "
           f"{'max|err|':>9} {'other%':>6} {'clean':>5}  note")
    print(hdr)
    print("-" * len(hdr))
    base = {(r["dtype"], r["threads"]): r["ms"] for r in records if r["contender"] == "numpy"}
    base.update({(r["dtype"], r["threads"]): r["ms"] for r in records
                 if r["contender"] == "torch" and r["dtype"] != "float32"})
    for r in records:
        b = base.get((r["dtype"], r["threads"]))
        r["speedup_vs_baseline"] = b / r["ms"] if b else None
        print(f"{r['dtype']:<8} {r['contender']:<11} {r['threads']:>3} {r['ms']:>9.2f} {r['gbps']:>7.2f} "
              f"{fmt(r['frac_read'] and 100 * r['frac_read'], '.1f'):>6} {fmt(r['speedup_vs_baseline'], '.2f'):>8} "
              f"{r['max_abs_err_vs_numpy_f32']:>9.2e} {fmt(r['other_cpu_pct'], '.0f'):>6} {clean_mark(r):>5}  "
              f"{r['note']}")
    print("speedup: time of the baseline (NumPy for float32, torch for bf16) at the same thread count / this time;\n"
          "%read: GB/s over the streaming-read probe (a read+write stream cannot reach a read-only ceiling);\n"
          "other%: CPU time other processes took during the timed repetitions, % of the pinned CPUs; clean: samples "
          f"with other% < {CLEAN_PCT:.0f} the median\nis taken over (k/n; 'ok'/'NOISY' for calls too short to judge "
          "one by one); contenders are timed round-robin.")
    elapsed = time.perf_counter() - t_start
    print(f"wall time {elapsed:.1f} s")
    machine = lampe.show_config(print_it=False)
    if torch is not None:
        machine["torch"] = torch.__version__
    if args.json:
        write_json(args.json, {"benchmark": "rope", "args": vars(args), "machine": machine, "probes": probes,
                               "records": records, "wall_s": elapsed})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
