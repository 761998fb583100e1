"""Build and run-time configuration: ISAs, threads, compiler, CUDA status."""
from __future__ import annotations

import os
import sys

from . import _C
from ._version import __version__


def available_isas() -> list:
    """ISA paths compiled in and supported by this CPU (CPUID + XGETBV), lowest first."""
    return list(_C.available_isas())


def set_cpu_isa(name: str) -> None:
    """Cap the kernels at ISA ``name`` in this process (scalar, avx2, avx512, avx512bf16): the best
    available path not above it runs. Mostly for tests; ``LAMPE_CPU_ISA`` does the same at start."""
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    _C.set_cpu_isa(name)


def current_isa() -> str:
    return _C.current_isa()


def show_config(print_it: bool = True) -> dict:
    """Version, ISAs (available and chosen), threads, compiler and flags, CUDA status."""
    build = _C.build_info()
    torch = sys.modules.get("torch")
    cfg = {
        "version": __version__,
        "isa_available": available_isas(),
        "isa_chosen": current_isa(),
        "isa_cap_env": os.environ.get("LAMPE_CPU_ISA"),
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

