"""Machine-ceiling probes (bench/probes.c), compiled on first use and loaded with ctypes.

The benchmarks divide what they measure by these ceilings, measured in the same process on the
same CPUs, instead of by datasheet numbers: clocks under load, SMT siblings, VM throttling and
memory placement all move the real ceiling.

    >>> import _probes
    >>> _probes.fma_gflops()                 # widest fp32 FMA the CPU has, one thread
    >>> _probes.fma_gflops(threads=2)        # two threads pinned to two CPUs, aggregate
    >>> _probes.read_gbps(1 << 30)
    >>> _probes.amx_gflops()                 # TDPBF16PS, where the CPU and OS allow AMX

Every probe returns None (and keeps the reason in ``last_error()``) when it cannot run: no C
compiler, an ISA the CPU lacks, or pinning refused.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(_HERE, "probes.c")

# Probe kinds: must match the enum in probes.c.
_K = {"fma_avx2": 0, "fma_avx512": 1, "bf16_dot": 2, "read_avx2": 3, "read_avx512": 4, "fma_sse": 5, "amx_bf16": 6}
_ISA_ORDER = ("sse", "avx2", "avx512")  # lowest first

_lib = None
_lib_error: Optional[str] = None
_last_error: Optional[str] = None


def last_error() -> Optional[str]:
    """Why the last probe (or the build) returned None."""
    return _last_error or _lib_error


def _fail(msg: str):
    global _last_error
    _last_error = msg
    return None


def _build():
    """Compile probes.c into a private temp dir (never into the source tree, which may be
    read-only or shared) and load it. Cached for the life of the process."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _lib_error = "no C compiler found (cc/gcc/clang); machine-ceiling probes skipped"
        return None
    out_dir = tempfile.mkdtemp(prefix="lampe_probes_")
    so = os.path.join(out_dir, "probes.so")
    # No -march flags: ISA-specific loops carry target attributes, so the library loads anywhere.
    cmd = [cc, "-O2", "-shared", "-fPIC", "-o", so, _SRC, "-lpthread"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        _lib_error = f"probe build failed to run {cc}: {exc}"
        return None
    if res.returncode != 0:
        _lib_error = f"probe build failed ({' '.join(cmd)}):\n{res.stderr.strip()}"
        return None
    try:
        lib = ctypes.CDLL(so)
    except OSError as exc:
        _lib_error = f"probe library did not load: {exc}"
        return None
    lib.probe_has_isa.argtypes = [ctypes.c_char_p]
    lib.probe_has_isa.restype = ctypes.c_int
    lib.probe_flop_per_iter.argtypes = [ctypes.c_int]
    lib.probe_flop_per_iter.restype = ctypes.c_double
    lib.probe_run.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
    lib.probe_run.restype = ctypes.c_double
    _lib = lib
    return lib


def compiler_ok() -> bool:
    return _build() is not None


def has_isa(name: str) -> bool:
    """CPU + OS support for ``name`` ("sse", "avx2", "avx512", "avx512bf16", "amx"), from CPUID in
    C (for amx also XCR0 and the Linux permission for the tile data, which this asks for)."""
    lib = _build()
    return bool(lib and lib.probe_has_isa(name.encode()))


def widest_isa() -> Optional[str]:
    """The widest fp32 FMA vector this CPU runs: "avx512", "avx2" or "sse"."""
    if _build() is None:
        return None
    return [i for i in _ISA_ORDER if has_isa(i)][-1]


def default_cpus(threads: int) -> Optional[list]:
    """The first ``threads`` CPUs of this process's affinity mask (distinct CPUs, one per thread)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        return None
    return cpus[:threads]


def _run(kind: int, threads: int, cpus, iters: int, buf=None):
    lib = _build()
    arr = (ctypes.c_int * threads)(*cpus) if cpus is not None else None
    sink = ctypes.c_double()
    ptr = buf.ctypes.data if buf is not None else None
    n = buf.size if buf is not None else 0
    t = lib.probe_run(kind, threads, arr, int(iters), ptr, n, ctypes.byref(sink))
    return t


def _timed_rate(kind: int, threads: int, cpus, work_per_iter: float, seconds: float, buf=None,
                repeats: int = 3):
    """Best rate (work / s) over ``repeats`` runs of about ``seconds`` each. Best, not median: a
    ceiling is what the machine can do, and any interruption only lowers a run."""
    iters = 1
    # Calibrate: grow the iteration count until one run takes >= 10% of the target.
    while True:
        t = _run(kind, threads, cpus, iters, buf)
        if t < 0:
            return None, ("pinning refused by the OS" if t == -2 else "thread creation failed")
        if t >= 0.1 * seconds or iters > (1 << 40):
            break
        iters *= 4 if t < 0.01 * seconds else 2
    iters = max(1, int(iters * seconds / max(t, 1e-9)))
    best = 0.0
    for _ in range(repeats):
        t = _run(kind, threads, cpus, iters, buf)
        if t < 0:
            return None, "probe run failed"
        best = max(best, work_per_iter * iters / t)
    return best, None


def _resolve(threads: int, cpus: Optional[Sequence[int]]):
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if cpus is None:
        cpus = default_cpus(threads)
        if cpus is None:
            return None, f"{threads} threads requested but only {len(os.sched_getaffinity(0))} CPUs are available"
    elif len(cpus) != threads:
        raise ValueError("cpus must have one entry per thread")
    return list(cpus), None


def fma_gflops(isa: Optional[str] = None, seconds: float = 0.5, threads: int = 1,
               cpus: Optional[Sequence[int]] = None) -> Optional[float]:
    """Peak fp32 FMA throughput in GFLOP/s (an FMA counts 2 FLOP): 12 independent accumulator
    chains of the widest vector (or ``isa``: "sse", "avx2", "avx512"), ``threads`` pinned threads,
    aggregate."""
    if _build() is None:
        return _fail(_lib_error)
    isa = isa or widest_isa()
    if isa not in _ISA_ORDER:
        raise ValueError(f"isa must be one of {_ISA_ORDER}")
    if not has_isa(isa):
        return _fail(f"this CPU does not support {isa}")
    cpus, err = _resolve(threads, cpus)
    if err:
        return _fail(err)
    kind = _K["fma_" + isa]
    rate, err = _timed_rate(kind, threads, cpus, threads * _lib.probe_flop_per_iter(kind), seconds)
    return _fail(err) if rate is None else rate / 1e9


def bf16_dot_gflops(seconds: float = 0.5, threads: int = 1, cpus: Optional[Sequence[int]] = None) -> Optional[float]:
    """Peak VDPBF16PS throughput in GFLOP/s (64 FLOP per instruction), or None without avx512bf16."""
    if _build() is None:
        return _fail(_lib_error)
    if not has_isa("avx512bf16"):
        return _fail("this CPU has no avx512bf16 (VDPBF16PS)")
    cpus, err = _resolve(threads, cpus)
    if err:
        return _fail(err)
    kind = _K["bf16_dot"]
    rate, err = _timed_rate(kind, threads, cpus, threads * _lib.probe_flop_per_iter(kind), seconds)
    return _fail(err) if rate is None else rate / 1e9



def amx_gflops(seconds: float = 0.5, threads: int = 1, cpus: Optional[Sequence[int]] = None) -> Optional[float]:
    """Peak AMX TDPBF16PS throughput in GFLOP/s (16 x 16 x 32 multiply-adds per instruction, four
    independent accumulator tiles, operands resident in tiles), or None without AMX."""
    if _build() is None:
        return _fail(_lib_error)
    if not has_isa("amx"):
        return _fail("no usable AMX (CPUID, XCR0 tile state, OS permission, or a compiler without AMX intrinsics)")
    cpus, err = _resolve(threads, cpus)
    if err:
        return _fail(err)
    kind = _K["amx_bf16"]
    rate, err = _timed_rate(kind, threads, cpus, threads * _lib.probe_flop_per_iter(kind), seconds)
    return _fail(err) if rate is None else rate / 1e9


_read_buf = None


def read_gbps(nbytes: int = 1 << 30, seconds: float = 0.5, threads: int = 1,
              cpus: Optional[Sequence[int]] = None) -> Optional[float]:
    """Streaming read bandwidth in GB/s (1e9 bytes/s): vector-load sum over an ``nbytes`` buffer
    (far larger than the caches, so it measures DRAM), split into one contiguous slice per thread.
    The buffer is kept between calls so that page faults happen once, outside the timing."""
    global _read_buf
    if _build() is None:
        return _fail(_lib_error)
    cpus, err = _resolve(threads, cpus)
    if err:
        return _fail(err)
    n = (int(nbytes) // 4) & ~((128 * threads) - 1)
    if _read_buf is None or _read_buf.size != n:
        _read_buf = None
        _read_buf = np.ones(n, dtype=np.float32)  # written once: every page is really mapped
    kind = _K["read_avx512"] if has_isa("avx512") else _K["read_avx2"] if has_isa("avx2") else None
    if kind is None:
        return _fail("the read probe needs avx2")
    slice_bytes = ((n // threads) & ~127) * 4
    rate, err = _timed_rate(kind, threads, cpus, threads * slice_bytes, seconds, buf=_read_buf)
    return _fail(err) if rate is None else rate / 1e9


def release_buffers():
    """Drop the read-probe buffer (1 GiB by default) before a memory-hungry benchmark."""
    global _read_buf
    _read_buf = None


def measure_all(thread_counts: Sequence[int] = (1, 2), seconds: float = 0.5, read_bytes: int = 1 << 30) -> dict:
    """Every probe at every thread count (those the affinity mask allows), as a JSON-able dict."""
    out = {"compiler_ok": compiler_ok(), "error": _lib_error, "isa": widest_isa(),
           "avx512bf16": has_isa("avx512bf16") if compiler_ok() else False,
           "amx": has_isa("amx") if compiler_ok() else False, "by_threads": {}}
    if not out["compiler_ok"]:
        return out
    for n in thread_counts:
        rec = {"cpus": default_cpus(n)}
        # every vector width the CPU has: a kernel level is measured against its own width's ceiling
        rec["fma_by_isa"] = {isa: fma_gflops(isa, seconds=seconds, threads=n) for isa in _ISA_ORDER if has_isa(isa)}
        rec["fma_gflops"] = rec["fma_by_isa"].get(widest_isa())
        rec["fma_error"] = None if rec["fma_gflops"] is not None else last_error()
        rec["bf16_dot_gflops"] = bf16_dot_gflops(seconds=seconds, threads=n)
        rec["amx_gflops"] = amx_gflops(seconds=seconds, threads=n)
        rec["read_gbps"] = read_gbps(read_bytes, seconds=seconds, threads=n)
        rec["read_error"] = None if rec["read_gbps"] is not None else last_error()
        out["by_threads"][str(n)] = rec
    release_buffers()
    return out


if __name__ == "__main__":
    import json
    ns = sorted({1, len(os.sched_getaffinity(0))})
    print(json.dumps(measure_all(ns), indent=2))
