"""The fused C attention against the float64 reference (lampe.reference.attention)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import lampe
from conftest import ISAS, inv_freq

# Relative error bound (max |kernel - ref| / max |ref|). float32 matches a naive float32
# implementation (~1e-6 here); bf16/f16 outputs carry one rounding of the output (2^-9, 2^-12).
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 2e-2}


def make(rng, B, Hq, Hkv, Lq, Lk, D, dtype):
    q = rng.standard_normal((B, Hq, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    v = rng.standard_normal((B, Hkv, Lk, D))
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        q, k, v = (torch.from_numpy(x).bfloat16() for x in (q, k, v))
        as64 = lambda x: x.double().numpy()
    else:
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        as64 = lambda x: x.astype(np.float64)
    return q, k, v, as64


def check(rng, B, Hq, Hkv, Lq, Lk, D, dtype, cfg, **kw):
    q, k, v, as64 = make(rng, B, Hq, Hkv, Lq, Lk, D, dtype)
    f = inv_freq(kw.get("rotary_dim") or D)
    out, lse = lampe.attention(q, k, v, config=cfg, inv_freq=f, return_lse=True, **kw)
    ref, rlse = lampe.reference.attention(as64(q), as64(k), as64(v), cfg, f, return_lse=True, **kw)
    o = as64(out)
    assert o.shape == ref.shape
    assert np.all(np.isfinite(o))
    err = np.abs(o - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err < TOL[dtype], f"relative error {err:.3g}"
    lse = lse.numpy() if hasattr(lse, "numpy") else lse
    fin = np.isfinite(rlse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert np.abs(lse[fin] - rlse[fin]).max(initial=0) < (1e-4 if dtype == "float32" else 1e-2)
    return out, lse


C = lampe.LampeConfig

# Pairwise-style coverage: each line varies several factors at once.
GRID = [
    # B, Hq, Hkv, Lq, Lk, D, dtype, config, extra
    (1, 2, 2, 1, 1, 64, "float32", C(window=4, sink=1, mapping_length=3), {}),
    (1, 4, 1, 2, 2, 80, "bfloat16", None, {}),
    (2, 8, 1, 7, 7, 96, "float16", C(window=2, sink=1, mapping_length=3), {}),
    (1, 4, 2, 63, 63, 128, "float32", C(window=8, sink=3, mapping_length=20), {}),
    (1, 8, 2, 65, 65, 256, "bfloat16", C(window=16, sink=4, mapping_length=20), {}),
    (1, 8, 8, 17, 1000, 64, "float32", C(window=32, sink=8, mapping_length="llama3"), {"prompt_length": 990}),
    (2, 16, 2, 1, 1000, 128, "float16", C(window=100, sink=20, mapping_length=300), {"prompt_length": 999}),
    (1, 2, 2, 1000, 1000, 80, "float32", None, {}),
    (1, 4, 1, 17, 300, 64, "bfloat16", C(window=50, sink=10, mapping_length=400), {"prompt_length": 250}),
    (1, 2, 1, 129, 129, 64, "float32", C(window=64, sink=4, mapping_length=30), {}),  # L = 2H + 1
    (1, 2, 1, 128, 128, 64, "float32", C(window=64, sink=4, mapping_length=30), {}),  # L = 2H: active
    (1, 2, 1, 127, 127, 64, "float16", C(window=64, sink=4, mapping_length=30), {}),  # 2H - 1: fallback
    (1, 2, 1, 50, 50, 64, "float32", C(window=1, sink=1, mapping_length=1), {}),       # tiny window and sink
    (1, 2, 1, 300, 300, 64, "float32", C(window=100, sink=99, mapping_length=1000), {}),  # huge sink, U > L
    (1, 4, 4, 40, 40, 64, "float32", C(window=8, sink=2, mapping_length=12), {"rotary_dim": 32}),
    (1, 4, 4, 40, 40, 64, "float32", C(window=8, sink=2, mapping_length=12), {"layout": "interleaved"}),
    (1, 4, 2, 30, 30, 64, "float32", C(window=4, sink=2, mapping_length=10), {"scale": 0.3}),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,dtype,cfg,extra", GRID)
def test_attention_grid(isa, rng, B, Hq, Hkv, Lq, Lk, D, dtype, cfg, extra):
    check(rng, B, Hq, Hkv, Lq, Lk, D, dtype, cfg, **dict(extra))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_long_odd_length(rng, dtype):
    cfg = C(window=256, sink=32, mapping_length=700)
    check(rng, 1, 4, 1, 4097, 4097, 64, dtype, cfg)


def test_attention_per_row_prompt_lengths_and_padding(isa, rng):
    cfg = C(window=8, sink=3, mapping_length=12)
    B, Lk, Lq = 3, 60, 12
    mask = np.ones((B, Lk), bool)
    mask[1, :5] = False
    mask[2, :Lk] = False  # a row with no valid key at all: zeros, lse = -inf
    out, lse = check(rng, B, 4, 2, Lq, Lk, 64, "float32", cfg, prompt_length=np.array([55, 50, 40]),
                     key_padding_mask=mask)
    assert np.all(out[2] == 0) and np.all(np.isneginf(lse[2]))


def test_decode_step_equals_row_of_longer_call(rng):
    cfg = C(window=16, sink=4, mapping_length=40)
    L, steps, D = 200, 5, 64
    q = rng.standard_normal((1, 8, L + steps, D)).astype(np.float32)
    k = rng.standard_normal((1, 2, L + steps, D)).astype(np.float32)
    v = rng.standard_normal((1, 2, L + steps, D)).astype(np.float32)
    f = inv_freq(D)
    full = lampe.attention(q, k, v, config=cfg, inv_freq=f, prompt_length=L)
    for s in range(steps):
        n = L + s + 1
        one = lampe.attention(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], config=cfg, inv_freq=f, prompt_length=L)
        np.testing.assert_allclose(one[:, :, 0], full[:, :, n - 1], rtol=0, atol=2e-6)


def test_threads_agree(rng):
    cfg = C(window=32, sink=4, mapping_length=60)
    q = rng.standard_normal((1, 8, 500, 64)).astype(np.float32)
    k = rng.standard_normal((1, 2, 500, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 500, 64)).astype(np.float32)
    f = inv_freq(64)
    a = lampe.attention(q, k, v, config=cfg, inv_freq=f, num_threads=1)
    b = lampe.attention(q, k, v, config=cfg, inv_freq=f, num_threads=2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # split-KV decode (few tiles, many keys) merges by log-sum-exp: same answer within rounding
    qd = q[:, :, -1:]
    a = lampe.attention(qd, k, v, config=cfg, inv_freq=f, prompt_length=499, num_threads=1)
    b = lampe.attention(qd, k, v, config=cfg, inv_freq=f, prompt_length=499, num_threads=2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_torch_tensors_zero_copy(rng):
    torch = pytest.importorskip("torch")
    cfg = C(window=8, sink=2, mapping_length=12)
    q = torch.randn(1, 4, 40, 64)
    k = torch.randn(1, 2, 40, 64)
    v = torch.randn(1, 2, 40, 64)
    out = torch.empty(1, 4, 40, 64)
    r = lampe.attention(q, k, v, config=cfg, inv_freq=inv_freq(64), out=out)
    assert r is out
    ref = lampe.reference.attention(q, k, v, cfg, inv_freq(64))
    assert np.abs(out.numpy() - ref).max() < 1e-5


def test_attention_errors(rng):
    q = rng.standard_normal((1, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    f = inv_freq(8)
    cfg = C(window=2, sink=1, mapping_length=2)
    with pytest.raises(TypeError, match="dtype"):
        lampe.attention(q, k.astype(np.float16), k, config=cfg, inv_freq=f)
    with pytest.raises(TypeError, match="q"):
        lampe.attention(q.astype(np.float64), k, k, config=cfg, inv_freq=f)
    with pytest.raises(ValueError, match="4-D"):
        lampe.attention(q[0], k, k, config=cfg, inv_freq=f)
    with pytest.raises(ValueError, match="multiple"):
        lampe.attention(q[:, :3], k, k, config=cfg, inv_freq=f)
    with pytest.raises(ValueError, match="k and v"):
        lampe.attention(q, k, k[:, :, :4], config=cfg, inv_freq=f)
    with pytest.raises(ValueError, match="prompt_length"):
        lampe.attention(q, k, k, config=cfg, inv_freq=f, prompt_length=9)
    with pytest.raises(NotImplementedError, match="decode='reference'"):
        lampe.attention(q, k, k, config=cfg.replace(decode="reference"), inv_freq=f)
    with pytest.raises(ValueError, match="out"):
        lampe.attention(q, k, k, config=cfg, inv_freq=f, out=np.empty((1, 4, 5, 9), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        lampe.attention(q, k, k, config=cfg, inv_freq=f, out=q)
    with pytest.raises(ValueError, match="inv_freq"):
        lampe.attention(q, k, k, config=cfg, inv_freq=f[:2])
    with pytest.raises(TypeError, match="config"):
        lampe.attention(q, k, k, config={"window": 2}, inv_freq=f)
    # empty batch and zero queries are fine
    assert lampe.attention(q[:0], k[:0], k[:0], config=cfg, inv_freq=f).shape == (0, 4, 5, 8)
    assert lampe.attention(q[:, :, :0], k, k, config=cfg, inv_freq=f).shape == (1, 4, 0, 8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss semantics (KiB) are Linux's")
def test_long_prompt_memory_is_linear(tmp_path):
    """L = 65536 float32, one head, Dh = 128: an L x L score matrix would need 16 GiB."""
    code = r"""
import resource, numpy as np, lampe
L, D = 65536, 128
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 1, L, D), dtype=np.float32)
k = rng.standard_normal((1, 1, L, D), dtype=np.float32)
v = rng.standard_normal((1, 1, L, D), dtype=np.float32)
f = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = lampe.attention(q, k, v, config=lampe.LampeConfig(window=512, sink=200, mapping_length="llama3"), inv_freq=f)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert np.isfinite(out).all()
print((after - before) / 1024)
"""
    # Run away from the source tree so the child imports the same (built) lampe as this process.
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__))))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    growth_mib = float(res.stdout.strip().splitlines()[-1])
    assert growth_mib < 512, f"peak RSS grew by {growth_mib:.0f} MiB"


@pytest.mark.parametrize("cfg", [C.selfextend(window=16, group=4), C.rerope(window=16)], ids=["selfextend", "rerope"])
def test_baseline_policies_kernel(isa, rng, cfg):
    check(rng, 1, 4, 2, 90, 90, 64, "float32", cfg)
    check(rng, 1, 4, 2, 1, 90, 64, "float32", cfg)  # a decode-like single row
    with pytest.raises(ValueError, match="prompt_length"):
        lampe.attention(*make(rng, 1, 2, 1, 3, 30, 64, "float32")[:3], config=cfg, inv_freq=inv_freq(64),
                        prompt_length=20)  # baselines have no rows after their plan
