"""The CUDA kernels' position logic (csrc/cuda/plan.cuh), compiled for the host with g++ and
checked against lampe.plan (the C planner): mapped ids bit for bit, the extended sink and the
offsets, the regions of prompt rows, rows after the prompt and baseline rows, clipping to the
valid keys, the row routing between the two kernels and the float32 angle. Runs without a GPU."""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

import lampe
from lampe.config import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMPE_MODE = MODES[0]  # LaMPE itself ("lampe"; "reference" before the rename)
KIND = {LAMPE_MODE: 1, "selfextend": 2, "rerope": 3}
SLOT = {"local": 0, "full": 0, "map": 1, "sink": 2}
I64P = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    out = tmp_path_factory.mktemp("cuda_host") / "host_check.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-I", f"{ROOT}/csrc/cuda",
                    f"{ROOT}/csrc/cuda/host_check.cpp", "-o", str(out)], check=True)
    so = ctypes.CDLL(str(out))
    so.lcu_host_plan.restype = ctypes.c_int
    so.lcu_host_angle.restype = ctypes.c_float
    so.lcu_host_angle.argtypes = [ctypes.c_int64, ctypes.c_float]
    so.lcu_host_is_decode.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 6 + [ctypes.c_int]
    return so


def ptr(a):
    return a.ctypes.data_as(I64P)


def host_plan(lib, cfg, L, key_count=None, positions=(), prompt_own=0, sig=None):
    U = cfg.mapping_length if isinstance(cfg.mapping_length, int) else 0
    sig_arr = None if sig is None else np.asarray(sig, dtype=np.float64)
    plan_out = np.zeros(7, dtype=np.int64)
    mapped = np.zeros(L, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64)
    regs = np.zeros((len(pos), 3, 6), dtype=np.int64)
    kc = L if key_count is None else key_count
    lib.lcu_host_plan(ctypes.c_int(KIND[cfg.mode]), ctypes.c_int64(cfg.window), ctypes.c_int64(cfg.sink),
                      ctypes.c_int64(U), None if sig_arr is None else sig_arr.ctypes.data_as(
                          ctypes.POINTER(ctypes.c_double)), ctypes.c_int64(0), ctypes.c_int64(kc),
                      ctypes.c_int64(0), ctypes.c_int64(prompt_own or (L if kc != L else 0)), ptr(plan_out),
                      ptr(mapped), ctypes.c_int64(L), ptr(pos), ctypes.c_int64(len(pos)), ptr(regs))
    return plan_out, mapped, regs


def expected_regions(pl, p, key_count):
    rows = []
    for r in pl.regions(p):
        hi = min(r.key_hi, key_count - 1)
        if r.key_lo > hi:
            continue
        rows.append((SLOT[r.name], int(r.mapped), r.key_lo, hi, r.qpos, r.shift))
    return rows


def got_regions(regs_row):
    return [tuple(int(x) for x in e) for e in regs_row if e[0] >= 0]


CASES = [  # (L, window, sink, U): spec §6 configs A, C, D, then realistic and odd ones
    (20, 4, 2, 10), (7, 4, 2, 3), (8, 4, 1, 4), (1, 4, 2, 3), (2, 1, 1, 1), (100, 8, 3, 16), (257, 32, 2, 32),
    (1000, 64, 10, 997), (4097, 512, 200, 1536), (8192, 512, 200, 1536), (12000, 512, 200, 12000),
    (16384, 512, 200, 1993), (32768, 512, 200, 4501), (65536, 512, 200, 6129), (131072, 512, 200, 6204),
    (131072, 1024, 200, 3072), (131072, 512, 200, 78864), (32768, 2048, 200, 17829), (5000, 16, 7, 1),
]


@pytest.mark.parametrize("L,H,T,U", CASES)
def test_plan_and_regions_match_the_c_planner(lib, L, H, T, U):
    cfg = lampe.LampeConfig(window=H, sink=T, mapping_length=U)
    try:
        pl = lampe.plan(L, cfg)
    except ValueError as exc:
        assert "sink" in str(exc)
        plan_out, _, _ = host_plan(lib, cfg, L)
        assert plan_out[6] == 2  # LAMPE_CUDA_ERR_SINK
        return
    rng = np.random.default_rng(L * 7 + H)
    prompt = np.unique(np.concatenate([np.arange(min(L, 300)), np.arange(max(0, L - 300), L),
                                       rng.integers(0, L, 200)]))
    after = np.arange(L, L + 40)
    positions = np.concatenate([prompt, after])
    kc = L + 40
    plan_out, mapped, regs = host_plan(lib, cfg, L, key_count=kc, positions=positions, prompt_own=L)
    assert plan_out[6] == 0
    np.testing.assert_array_equal(mapped, pl.mapped_ids)  # bit-identical float32 recipe
    assert (plan_out[0], plan_out[1], plan_out[2], plan_out[3], plan_out[4], plan_out[5]) == (
        L, U, pl.sink_size, pl.bias_map, pl.bias_sink, int(pl.fallback))
    for i, p in enumerate(positions):
        assert got_regions(regs[i]) == expected_regions(pl, int(p), kc), f"row {p}"


@pytest.mark.parametrize("preset", ["llama2", "llama3", "mistral", "llama3.1"])
def test_sigmoid_mapping_length(lib, preset):
    d = lampe._C.sigmoid_params(preset)
    sig = [d["a"], d["b"], d["lmax"], float(d["threshold"]), float(d["below"])]
    cfg = lampe.LampeConfig(window=512, sink=200, mapping_length=preset)
    for L in [1024, 4096, 8191, 8192, 8193, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072, 100003]:
        plan_out, mapped, _ = host_plan(lib, cfg, L, sig=sig)
        pl = lampe.plan(L, cfg)
        assert plan_out[1] == pl.mapping_length, L
        np.testing.assert_array_equal(mapped, pl.mapped_ids)


def test_regions_are_clipped_to_the_valid_keys(lib):
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=10)
    pl = lampe.plan(20, cfg)
    positions = np.arange(0, 30)
    for kc in (5, 12, 19, 20, 25):
        _, _, regs = host_plan(lib, cfg, 20, key_count=kc, positions=positions, prompt_own=20)
        for i, p in enumerate(positions):
            assert got_regions(regs[i]) == expected_regions(pl, int(p), kc)


@pytest.mark.parametrize("mode", ["selfextend", "rerope"])
def test_baseline_rows(lib, mode):
    cfg = (lampe.LampeConfig.selfextend(window=8, group=3) if mode == "selfextend"
           else lampe.LampeConfig.rerope(window=8))
    for L in (1, 5, 9, 40, 333):
        pl = lampe.plan(L, cfg)
        positions = np.arange(L)
        plan_out, mapped, regs = host_plan(lib, cfg, L, positions=positions)
        assert plan_out[6] == 0
        np.testing.assert_array_equal(mapped, pl.mapped_ids)
        for i, p in enumerate(positions):
            assert got_regions(regs[i]) == expected_regions(pl, int(p), L)


def test_causal_rows_and_routing(lib):
    # the row kernel owns rows after an active LaMPE prompt, or every row when asked
    assert lib.lcu_host_is_decode(1, 4, 2, 10, 30, 20, 20, 0) == 1
    assert lib.lcu_host_is_decode(1, 4, 2, 10, 30, 20, 19, 0) == 0
    assert lib.lcu_host_is_decode(1, 4, 2, 3, 30, 7, 10, 0) == 0   # L = 7 < 2H: fallback, one region
    assert lib.lcu_host_is_decode(0, 4, 2, 3, 30, 0, 25, 0) == 0   # plain causal
    assert lib.lcu_host_is_decode(0, 4, 2, 3, 30, 0, 3, 1) == 1    # all rows to the row kernel
    assert lib.lcu_host_is_decode(2, 4, 2, 3, 30, 0, 25, 0) == 0   # baselines: prompt rows only


def test_angles_are_float32_products(lib):
    f = (1.0 / 10000 ** (np.arange(0, 128, 2) / 128)).astype(np.float32)
    for pos in (0, 1, 7, 4095, 65537, 131071, 2**24 - 1, -3):
        for k in (0, 1, 17, 63):
            want = np.float32(np.float32(pos) * f[k])
            assert lib.lcu_host_angle(pos, float(f[k])) == want


def test_the_cuda_kernel_is_registered_for_the_op():
    """lampe.cuda registers a CUDA kernel for lampe::attention only when the op has the schema the
    C++ kernel implements. The op's integers became SymInt (torch.compile) and the exact string
    comparison then failed silently: patched CUDA models ran the pure-torch backend. Runs without a
    GPU: registering a CUDA kernel needs none."""
    torch = pytest.importorskip("torch")
    import lampe.cuda as lcuda
    assert lcuda._schema_matches(), torch.ops.lampe.attention.default._schema
    assert lcuda.info()["op_kernel"] in ("kernel", "fallback")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lampe::attention", "CUDA")
