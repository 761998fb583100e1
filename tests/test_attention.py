"""The fused C attention against the float64 reference (lampe.reference.attention)."""
import importlib
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
    with pytest.raises(NotImplementedError, match="decode='authors'"):
        lampe.attention(q, k, k, config=cfg.replace(decode="authors"), inv_freq=f)
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


def padding_mask(Lk, pads):
    """[B, Lk] bool with pads[b] = (left pads, trailing never-attended slots)."""
    m = np.zeros((len(pads), Lk), bool)
    for b, (left, right) in enumerate(pads):
        m[b, left:Lk - right] = True
    return m


# The kernel contract's per-row layouts (docs/kernels.md): left pads and trailing slots that are
# never attended (right padding, a static cache's unused tail), queries anywhere (query_start),
# rows after the prompt, soft-capped logits; every dtype, odd sizes, GQA.
LAYOUTS = {
    # prefill with left pads and trailing slots; the default query_start puts the queries at the
    # end of the tensor, so rows over trailing slots see every valid key
    "pads_both_sides": dict(B=3, Hq=4, Hkv=2, Lq=45, Lk=45, D=64, cfg=C(window=4, sink=2, mapping_length=10),
                            pads=[(0, 0), (5, 7), (3, 20)]),
    # a static cache: 80 slots, the queries in the middle of the valid keys
    "static_cache_middle": dict(B=2, Hq=6, Hkv=2, Lq=13, Lk=80, D=72, cfg=C(window=8, sink=3, mapping_length=20),
                                pads=[(0, 30), (6, 37)], query_start=[30, 20]),
    # decode steps over a static cache: rows after a prompt that ends before the valid keys do
    "static_cache_decode": dict(B=2, Hq=4, Hkv=1, Lq=3, Lk=70, D=40, cfg=C(window=6, sink=2, mapping_length=9),
                                pads=[(2, 20), (0, 11)], query_start=[45, 56], prompt_length=[47, 56]),
    "plain_query_start": dict(B=2, Hq=2, Hkv=2, Lq=9, Lk=33, D=48, cfg=None, pads=[(4, 5), (0, 0)],
                              query_start=[-3, 11]),
    "selfextend_trailing": dict(B=2, Hq=4, Hkv=2, Lq=30, Lk=30, D=64, cfg=C.selfextend(window=6, group=3),
                                pads=[(0, 8), (2, 0)]),
    "rerope_static_cache": dict(B=1, Hq=4, Hkv=2, Lq=5, Lk=50, D=64, cfg=C.rerope(window=7), pads=[(0, 10)],
                                query_start=[20]),
    "softcap_lampe": dict(B=1, Hq=8, Hkv=2, Lq=70, Lk=70, D=64, cfg=C(window=8, sink=4, mapping_length=16),
                          pads=[(3, 4)], softcap=1.5),
    "softcap_plain": dict(B=2, Hq=3, Hkv=1, Lq=17, Lk=41, D=80, cfg=None, pads=[(0, 3), (7, 0)], softcap=0.7),
    "softcap_decode": dict(B=1, Hq=4, Hkv=2, Lq=1, Lk=300, D=64, cfg=C(window=32, sink=8, mapping_length=50),
                           pads=[(0, 0)], prompt_length=280, softcap=2.0),
}


def layout_kwargs(case):
    kw = {"key_padding_mask": padding_mask(case["Lk"], case["pads"])}
    for name in ("query_start", "prompt_length"):
        if name in case:
            kw[name] = np.array(case[name]) if isinstance(case[name], list) else case[name]
    if "softcap" in case:
        kw["softcap"] = case["softcap"]
    return kw


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_contract_layouts(isa, rng, name, dtype):
    c = LAYOUTS[name]
    check(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], dtype, c["cfg"], **layout_kwargs(c))


def compact(x, m):
    """Row b's valid keys, shifted to the start (float64)."""
    return [np.asarray(x[b][:, m[b]], dtype=np.float64) for b in range(len(m))]


@pytest.mark.parametrize("name", ["static_cache_middle", "static_cache_decode", "pads_both_sides"])
def test_contract_layout_equals_compact_call(rng, name):
    """A row laid out in a static cache (junk in every slot it does not attend) gives what the
    same row gives alone, with only its valid keys and the queries at their own positions."""
    c = LAYOUTS[name]
    q, k, v, _ = make(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], "float32")
    kw = layout_kwargs(c)
    m = kw["key_padding_mask"]
    for x in (k, v):
        x[:, :, :][~np.broadcast_to(m[:, None, :], x.shape[:3])] = 1e4  # never attended
    f = inv_freq(c["D"])
    out = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f, **kw)
    qs = np.broadcast_to(kw.get("query_start", c["Lk"] - c["Lq"] - m.argmax(1)), (c["B"],))
    pl = np.broadcast_to(kw.get("prompt_length", m.argmax(1) + m.sum(1)), (c["B"],)) - m.argmax(1)
    for b, (kb, vb) in enumerate(zip(compact(k, m), compact(v, m))):
        n = kb.shape[1]
        lo, hi = max(0, -qs[b]), min(c["Lq"], n - qs[b])  # rows whose position is a valid key's
        alone = lampe.attention(q[b:b + 1, :, lo:hi], kb[None].astype(np.float32), vb[None].astype(np.float32),
                                config=c["cfg"], inv_freq=f, query_start=qs[b] + lo, prompt_length=int(pl[b]))
        np.testing.assert_allclose(out[b, :, lo:hi], alone[0], rtol=0, atol=3e-6)


@pytest.mark.parametrize("name", ["static_cache_middle", "softcap_lampe", "selfextend_trailing", "plain_query_start"])
def test_contract_torch_backend_agrees(rng, name):
    torch = pytest.importorskip("torch")
    from lampe import torch_backend
    c = LAYOUTS[name]
    q, k, v, as64 = make(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], "float32")
    kw = layout_kwargs(c)
    f = inv_freq(c["D"])
    ref, rlse = lampe.reference.attention(q, k, v, c["cfg"], f, return_lse=True, **kw)
    got, lse = torch_backend.attention(*(torch.from_numpy(x) for x in (q, k, v)), config=c["cfg"], inv_freq=f,
                                       return_lse=True, **kw)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-5)
    fin = np.isfinite(rlse)
    assert np.array_equal(np.isfinite(lse.numpy()), fin)
    np.testing.assert_allclose(lse.numpy()[fin], rlse[fin], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["static_cache_middle", "softcap_lampe", "selfextend_trailing"])
def test_torch_backend_float64_matches_the_reference_to_float64_precision(rng, name):
    """float64 inputs are computed in float64 (what checks the op's backward at float64 precision
    rely on): far closer to the reference than any float32 computation could be."""
    torch = pytest.importorskip("torch")
    from lampe import torch_backend
    c = LAYOUTS[name]
    q, k, v, _ = make(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], "float32")
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    kw = layout_kwargs(c)
    f = inv_freq(c["D"])
    ref, rlse = lampe.reference.attention(q, k, v, c["cfg"], f, return_lse=True, **kw)
    got, lse = torch_backend.attention(*(torch.from_numpy(x) for x in (q, k, v)), config=c["cfg"], inv_freq=f,
                                       return_lse=True, **kw)
    assert got.dtype == torch.float64 and lse.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    fin = np.isfinite(rlse)
    np.testing.assert_allclose(lse.numpy()[fin], rlse[fin], rtol=0, atol=1e-12)


def test_softcap_changes_the_answer(rng):
    """The cap is applied (a cap far above every logit leaves the answer, a small one changes it)."""
    c = LAYOUTS["softcap_lampe"]
    q, k, v, _ = make(rng, 1, 4, 2, 40, 40, 64, "float32")
    q *= 4
    f = inv_freq(64)
    plain = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f)
    wide = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f, softcap=1e6)
    tight = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f, softcap=1.0)
    np.testing.assert_allclose(wide, plain, rtol=0, atol=1e-5)
    assert np.abs(tight - plain).max() > 1e-2


def test_contract_argument_errors(rng):
    q, k, v, _ = make(rng, 2, 2, 1, 4, 10, 16, "float32")
    f = inv_freq(16)
    cfg = C(window=2, sink=1, mapping_length=3)
    hole = np.ones((2, 10), bool)
    hole[1, 4] = False
    with pytest.raises(ValueError, match="key_padding_mask"):
        lampe.attention(q, k, v, config=cfg, inv_freq=f, key_padding_mask=hole)
    with pytest.raises(ValueError, match="query_start"):
        lampe.attention(q, k, v, config=cfg, inv_freq=f, query_start=2**25)
    with pytest.raises(TypeError, match="query_start"):
        lampe.attention(q, k, v, config=cfg, inv_freq=f, query_start=1.5)
    with pytest.raises(ValueError, match="query_start"):
        lampe.attention(q, k, v, config=cfg, inv_freq=f, query_start=np.array([1, 2, 3]))
    for bad in (-1.0, float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match="softcap"):
            lampe.attention(q, k, v, config=cfg, inv_freq=f, softcap=bad)
    with pytest.raises(ValueError, match="prompt_length"):  # the baselines have no rows after the prompt
        lampe.attention(q, k, v, config=C.rerope(window=3), inv_freq=f, prompt_length=5)


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


# ---------------------------------------------------------------- NaN / inf (issue 12 part 2)

# Each scenario reaches a different key-block loader of the kernel: short prompts pack keys per
# tile, long prompts read prefill panels, rows after the prompt read keys directly (with split-KV
# when there are few of them), plain rows have no mapped keys.
NONFINITE = {
    "pack": dict(B=1, Hq=2, Hkv=1, Lq=20, Lk=20, D=16, cfg=C(window=4, sink=1, mapping_length=6), kw={}),
    "panels": dict(B=1, Hq=2, Hkv=2, Lq=200, Lk=200, D=32, cfg=C(window=16, sink=4, mapping_length=40), kw={}),
    "direct_split": dict(B=1, Hq=4, Hkv=1, Lq=1, Lk=700, D=32, cfg=C(window=32, sink=4, mapping_length=90),
                         kw={"prompt_length": 650, "num_threads": 2}),
    "plain_decode": dict(B=1, Hq=4, Hkv=2, Lq=2, Lk=300, D=16, cfg=None, kw={"num_threads": 2}),
}


def nonfinite_case(rng, name, dtype, where, value):
    c = NONFINITE[name]
    q, k, v, as64 = make(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], dtype)
    x = {"q": q, "k": k, "v": v}[where]
    idx = tuple(int(rng.integers(n)) for n in x.shape)
    x[idx] = value
    return c, q, k, v, as64, idx


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("name", sorted(NONFINITE))
def test_nonfinite_attended_makes_the_row_nan(isa, rng, name, where, value, dtype):
    """Rows that attend a NaN or inf element output NaN (and lse NaN), as the reference says;
    every other row is unaffected."""
    c, q, k, v, as64, idx = nonfinite_case(rng, name, dtype, where, value)
    f = inv_freq(c["D"])
    out, lse = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f, return_lse=True, **c["kw"])
    rkw = {n: x for n, x in c["kw"].items() if n != "num_threads"}
    ref, rlse = lampe.reference.attention(as64(q), as64(k), as64(v), c["cfg"], f, return_lse=True, **rkw)
    o, lse = as64(out), np.asarray(lse)
    bad = np.isnan(ref).all(axis=-1)
    assert bad.any(), "the element must be attended by some row"
    assert np.array_equal(np.isnan(ref).any(axis=-1), bad)  # the reference's rows are all-NaN or finite
    assert np.array_equal(np.isnan(o).all(axis=-1), bad), f"{dtype}: NaN rows differ at {idx}"
    assert np.array_equal(np.isnan(lse), bad)
    assert np.all(np.isfinite(o[~bad]))
    err = np.abs(o[~bad] - ref[~bad]).max(initial=0) / np.abs(ref[~bad]).max(initial=1)
    assert err < TOL[dtype]


@pytest.mark.parametrize("name", ["pack", "panels", "direct_split"])
def test_nonfinite_keys_not_attended_never_matter(isa, rng, name):
    """NaN in left pads, in trailing never-attended slots and in future keys leaves every row as
    it is without them."""
    c = NONFINITE[name]
    pads = (3, 5)
    Lk = c["Lk"] + sum(pads)
    q, k, v, _ = make(rng, 1, c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], "float32")
    kw = dict(c["kw"])
    f = inv_freq(c["D"])
    clean = lampe.attention(q, k, v, config=c["cfg"], inv_freq=f, **kw)
    grow = lambda x: np.concatenate([np.full(x.shape[:2] + (pads[0], x.shape[3]), np.nan, np.float32), x,
                                     np.full(x.shape[:2] + (pads[1], x.shape[3]), np.inf, np.float32)], axis=2)
    kp, vp = grow(k), grow(v)
    kw["key_padding_mask"] = padding_mask(Lk, [pads])
    kw["query_start"] = c["Lk"] - c["Lq"]
    if "prompt_length" in kw:
        kw["prompt_length"] += pads[0]
    out = lampe.attention(q, kp, vp, config=c["cfg"], inv_freq=f, **kw)
    np.testing.assert_allclose(out, clean, rtol=0, atol=3e-6)
    # a future key: NaN in the last key and value changes only the last query row
    if c["Lq"] > 1:
        kf, vf = k.copy(), v.copy()
        kf[:, :, -1] = np.nan
        vf[:, :, -1] = np.nan
        out = lampe.attention(q, kf, vf, config=c["cfg"], inv_freq=f, **c["kw"])
        np.testing.assert_allclose(out[:, :, :-1], clean[:, :, :-1], rtol=0, atol=3e-6)
        assert np.isnan(out[:, :, -1]).all()


def test_issue_nan_example(isa):
    """The issue's setup: f, q, k, v random [1, 1, 4, 16] float32, a NaN in q or k."""
    rng = np.random.default_rng(0)
    f = (1 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    for where in ("q", "k"):
        q, k, v = (rng.standard_normal((1, 1, 4, 16)).astype(np.float32) for _ in range(3))
        {"q": q, "k": k}[where][0, 0, 1, 3] = np.nan
        out = lampe.attention(q, k, v, config=None, inv_freq=f)
        ref = lampe.reference.attention(q, k, v, None, f)
        assert np.array_equal(np.isnan(out), np.isnan(ref)) and np.isnan(out[0, 0, 1]).all()


def test_scale_overflow_raises_or_matches(isa, rng):
    """scale=1e38 overflows float32 logits: the kernel raises a ValueError naming scale (it used
    to return all-zero rows where the float64 reference is finite)."""
    q, k, v = (rng.standard_normal((1, 1, 4, 16)).astype(np.float32) for _ in range(3))
    f = inv_freq(16)
    ref = lampe.reference.attention(q, k, v, None, f, scale=1e38)
    assert np.all(np.isfinite(ref))
    with pytest.raises(ValueError, match=r"scale=1e\+38 "):  # the message names the value given
        lampe.attention(q, k, v, config=None, inv_freq=f, scale=1e38)
    with pytest.raises(ValueError, match=r"scale=-1e\+38 "):
        lampe.attention(q, k, v, config=None, inv_freq=f, scale=-1e38)
    for name in ("panels", "direct_split"):  # the other key-block loaders
        c = NONFINITE[name]
        q2, k2, v2, _ = make(rng, c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], "float32")
        with pytest.raises(ValueError, match="scale"):
            lampe.attention(q2, k2, v2, config=c["cfg"], inv_freq=inv_freq(c["D"]), scale=1e38, **c["kw"])
    # large but representable logits are fine and match the reference
    out = lampe.attention(q, k, v, config=None, inv_freq=f, scale=1e3)
    np.testing.assert_allclose(out, lampe.reference.attention(q, k, v, None, f, scale=1e3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("name", ["pack", "plain_decode"])
def test_nonfinite_torch_backend_agrees(rng, name, where):
    torch = pytest.importorskip("torch")
    from lampe import torch_backend
    c, q, k, v, as64, idx = nonfinite_case(rng, name, "float32", where, np.inf)
    f = inv_freq(c["D"])
    rkw = {n: x for n, x in c["kw"].items() if n != "num_threads"}
    ref, rlse = lampe.reference.attention(q, k, v, c["cfg"], f, return_lse=True, **rkw)
    got, lse = torch_backend.attention(*(torch.from_numpy(x) for x in (q, k, v)), config=c["cfg"], inv_freq=f,
                                       return_lse=True, **rkw)
    got, lse = got.numpy(), lse.numpy()
    bad = np.isnan(ref).all(axis=-1)
    assert bad.any() and np.array_equal(np.isnan(got).all(axis=-1), bad) and np.array_equal(np.isnan(lse), bad)
    np.testing.assert_allclose(got[~bad], ref[~bad], rtol=0, atol=2e-5)


# ---------------------------------------------------------------- other issue 12 part 2 regressions

def issue_inputs(Hq=1, Hkv=1, L=4, D=16, torch=False):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, h, L, D)).astype(np.float32) for h in (Hq, Hkv, Hkv))
    if torch:
        import torch as t
        q, k, v = (t.from_numpy(x) for x in (q, k, v))
    return q, k, v, (1 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def test_out_with_overlapping_elements_refused():
    torch = pytest.importorskip("torch")
    q, k, v, f = issue_inputs(Hq=4, L=10, torch=True)
    with pytest.raises(ValueError, match="out"):
        lampe.attention(q, k, v, config=None, inv_freq=f, out=torch.empty(1, 1, 10, 16).expand(1, 4, 10, 16))
    with pytest.raises(ValueError, match="out"):  # out aliasing an input
        lampe.attention(q, k, v, config=None, inv_freq=f, out=q)


def test_out_interleaved_with_an_input_is_fine():
    """out and q in one buffer without shared elements is not aliasing."""
    q, k, v, f = issue_inputs(Hq=2, L=10)
    buf = np.zeros((1, 2, 10, 2, 16), np.float32)
    buf[:, :, :, 0] = q
    want = lampe.attention(q, k, v, config=None, inv_freq=f)
    got = lampe.attention(buf[:, :, :, 0], k, v, config=None, inv_freq=f, out=buf[:, :, :, 1])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(buf[:, :, :, 0], q)


def test_negative_last_strides_accepted():
    q, k, v, f = issue_inputs(Hq=2, Hkv=1, L=9)
    cfg = C(window=2, sink=1, mapping_length=3)
    want = lampe.attention(np.ascontiguousarray(q[..., ::-1]), k, v, config=cfg, inv_freq=f)
    got = lampe.attention(q[..., ::-1], k[..., ::-1].copy()[..., ::-1], v, config=cfg, inv_freq=f)
    np.testing.assert_array_equal(got, want)
    out = np.zeros((1, 2, 9, 16), np.float32)[..., ::-1]
    assert lampe.attention(q[..., ::-1], k, v, config=cfg, inv_freq=f, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_requires_grad_raises_and_points_to_the_differentiable_op():
    torch = pytest.importorskip("torch")
    q, k, v, f = issue_inputs(torch=True)
    for name in ("q", "k", "v"):
        args = {"q": q, "k": k, "v": v}
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=rf"{name} requires grad.*lampe\.torch_ops\.lampe_attention"):
            lampe.attention(args["q"], args["k"], args["v"], config=None, inv_freq=f)
        with torch.no_grad():
            out = lampe.attention(args["q"], args["k"], args["v"], config=None, inv_freq=f)
        assert not out.requires_grad


def test_clear_errors_for_odd_shapes():
    q, k, v, f = issue_inputs()
    with pytest.raises(ValueError, match="head_dim"):
        lampe.attention(q[..., :0], k[..., :0], v[..., :0], config=None, inv_freq=f[:0])
    with pytest.raises(ValueError, match="inv_freq"):
        lampe.attention(q, k, v, config=None, inv_freq=f.reshape(2, 4))
    big = np.lib.stride_tricks.as_strided(np.zeros(16, np.float32), (1, 1, 4, 16), (0, 0, 0, 4))
    many = np.broadcast_to(q, (1, 4097, 4, 16))
    with pytest.raises(ValueError, match=r"4097 query heads per key/value head.*4096"):
        lampe.attention(many, big, big, config=None, inv_freq=f)
    huge = np.broadcast_to(np.zeros((1, 1, 1, 16), np.float32), (1, 1, 2**25 + 1, 16))
    with pytest.raises(ValueError, match=r"2\^25"):
        lampe.attention(q, huge, huge, config=None, inv_freq=f)


def test_huge_mapping_length_costs_what_the_input_does(monkeypatch):
    """U = 2^24 on a 20-token input used to build (and cache) a 2^24-position cos/sin table."""
    attn_mod = importlib.import_module("lampe.attention")  # lampe.attention is the function
    monkeypatch.setattr(attn_mod, "_TABLES", type(attn_mod._TABLES)())  # measure this call's table alone
    cfg = C(window=4, sink=1, mapping_length=2**24)
    q, k, v, f = issue_inputs(L=20)
    out = lampe.attention(q, k, v, config=cfg, inv_freq=f)
    ref = lampe.reference.attention(q, k, v, cfg, f)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
    assert attn_mod.table_cache_bytes() < 1 << 20


def test_table_cache_is_bounded_by_bytes(monkeypatch):
    attn_mod = importlib.import_module("lampe.attention")  # lampe.attention is the function
    monkeypatch.setattr(attn_mod, "TABLE_CACHE_BYTES", 3 << 20)  # three 1 MiB tables
    monkeypatch.setattr(attn_mod, "_TABLES", type(attn_mod._TABLES)())
    q, k, v, _ = issue_inputs(L=3000, D=64)
    for i in range(8):
        f = (1 / (10000 + i) ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
        got = lampe.attention(q[:, :, -1:], k, v, config=None, inv_freq=f)
        assert attn_mod.table_cache_bytes() <= 3 << 20
        np.testing.assert_allclose(got, lampe.reference.attention(q[:, :, -1:], k, v, None, f), rtol=0, atol=2e-5)
    assert attn_mod.table_cache_bytes() > 0
    # a table larger than the whole budget is used for its call and not kept
    monkeypatch.setattr(attn_mod, "TABLE_CACHE_BYTES", 1 << 16)
    lampe.attention(q[:, :, -1:], k, v, config=None, inv_freq=f * 0.5)
    assert attn_mod.table_cache_bytes() <= 1 << 16
