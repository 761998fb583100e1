"""Build and run-time configuration: ISAs, threads, compiler, CUDA status."""
from __future__ import annotations

import os
import sys

from . import _C
from ._version import __version__


#: Kernel levels in cap order (docs/kernels.md, "CPU levels"). Above avx512 they differ only for
#: bfloat16 inputs: avx512bf16 computes its products with VDPBF16PS, amx on AMX tiles.
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
#: Test levels: the avx512bf16 / amx kernels with VDPBF16PS and the AMX tiles emulated exactly in
#: plain AVX-512, so their layouts and loops run on any AVX-512 CPU (slow; never chosen by a cap).
TEST_ISAS = ("avx512bf16-emu", "amx-emu")


def available_isas() -> list:
    """Levels compiled in and supported by this CPU and OS (CPUID + XGETBV, and for amx the
    kernel's permission to use the tile state), lowest first; the last is the default."""
    return list(_C.available_isas())


def test_isas() -> list:
    """The emulated test levels this CPU can run (both need avx512), for tests."""
    return list(TEST_ISAS) if "avx512" in available_isas() else []


def set_cpu_isa(name: str) -> None:
    """Cap the kernels at level ``name`` in this process: one of ISA_LEVELS available here (the
    best available level not above it runs, i.e. that level), or a test level of TEST_ISAS
    (selected as such). ``LAMPE_CPU_ISA`` does the same at start, and there a level the CPU lacks
    caps too (``LAMPE_CPU_ISA=amx`` on a CPU without AMX runs avx512bf16 or below). Mostly for
    tests and benchmarks."""
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    if name.lower() not in ISA_LEVELS + TEST_ISAS:
        raise ValueError(f"isa: unknown level {name!r} (expected one of {', '.join(ISA_LEVELS + TEST_ISAS)})")
    _C.set_cpu_isa(name)


def current_isa() -> str:
    """The level the kernels use now."""
    return _C.current_isa()


def _isa_flags() -> dict:
    """Compiler flags of each kernel unit, from the one place setup.py read them."""
    from . import _buildflags
    return {unit: " ".join(flags) for unit, flags in _buildflags.ISA_UNITS.items()}


def show_config(print_it: bool = True) -> dict:
    """Version, ISAs (available and chosen), threads, compiler and flags, CUDA status."""
    build = _C.build_info()
    torch = sys.modules.get("torch")
    cfg = {
        "version": __version__,
        "isa_available": available_isas(),
        "isa_chosen": current_isa(),
        "isa_cap_env": os.environ.get("LAMPE_CPU_ISA"),
        "isa_test_levels": test_isas(),
        "isa_flags": _isa_flags(),
        "threads": int(torch.get_num_threads()) if torch is not None and not os.environ.get("LAMPE_NUM_THREADS")
        else _C.default_threads(),
        "threads_source": "LAMPE_NUM_THREADS" if os.environ.get("LAMPE_NUM_THREADS")
        else ("torch" if torch is not None else "affinity"),
        "compiler": build["compiler"],
        "cflags": build["cflags"],
        "cuda": _cuda_info(),
    }
    if print_it:
        width = max(len(k) for k in cfg)
        for key, val in cfg.items():
            print(f"{key:<{width}} : {val}")
    return cfg


def _cuda_info() -> str:
    """lampe._cuda: built or not (and why), its architectures, the device torch sees."""
    try:
        from .cuda import info
    except Exception as exc:  # noqa: BLE001  show_config must always print
        return f"unavailable ({exc})"
    d = info()
    if not d["built"]:
        return f"{d['status']}; device: {d['device']}"
    return f"built for {d['archs']} (torch {d['built_against_torch']}); device: {d['device']}"

