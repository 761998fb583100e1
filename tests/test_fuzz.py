"""Property-based fuzzing of the C kernels against the float64 reference (lampe.reference).

Hypothesis draws shapes, memory layouts (strided, heads-last, padded, reversed and every-other
element rows), dtypes, configurations (LaMPE, SelfExtend, ReRoPE, plain), per-row layouts (left
pads, trailing slots, query_start, prompt_length), softcap, scale, threads, ISAs and an
occasional NaN/inf, and checks that lampe.attention and lampe.rope agree with the reference,
including which rows are NaN and which arguments are refused. Sized for CI (a few seconds);
LAMPE_FUZZ_EXAMPLES=2000 runs a longer, randomised search.
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lampe  # noqa: E402
from conftest import ISAS  # noqa: E402
from lampe.positions import is_lampe_mode  # noqa: E402

EXAMPLES = int(os.environ.get("LAMPE_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=not EXAMPLES, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {"float32": 3e-5, "float16": 4e-3, "bfloat16": 2e-2}
try:  # bfloat16 travels as torch tensors; without torch (the sanitizer run) the other dtypes are fuzzed
    import torch as _torch
except ImportError:
    _torch = None
DTYPES = ["float32", "float32", "float16"] + (["bfloat16"] if _torch is not None else [])
LAYOUTS = ("contiguous", "heads_last", "padded", "reversed", "every_other")


def torch_or_skip():
    return pytest.importorskip("torch")


def as_layout(x64: np.ndarray, dtype: str, layout: str):
    """x64's values in `dtype`, stored in the given memory layout (numpy, or torch for bfloat16)."""
    if dtype == "bfloat16":
        torch = torch_or_skip()
        t = torch.from_numpy(np.ascontiguousarray(x64)).bfloat16()
        if layout == "heads_last":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "padded":
            buf = torch.zeros(*t.shape[:-2], t.shape[-2] + 3, t.shape[-1] + 5, dtype=t.dtype)
            buf[..., :t.shape[-2], :t.shape[-1]] = t
            return buf[..., :t.shape[-2], :t.shape[-1]]
        if layout == "every_other":
            buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            buf[..., ::2] = t
            return buf[..., ::2]
        return t  # torch has no negative strides
    x = x64.astype(dtype)
    if layout == "heads_last":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "padded":
        buf = np.zeros(x.shape[:-2] + (x.shape[-2] + 3, x.shape[-1] + 5), dtype)
        buf[..., :x.shape[-2], :x.shape[-1]] = x
        return buf[..., :x.shape[-2], :x.shape[-1]]
    if layout == "reversed":
        return np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    if layout == "every_other":
        buf = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    return x


def as64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def inv_freq(rd: int) -> np.ndarray:
    return (1.0 / 10000.0 ** (np.arange(0, rd, 2) / max(rd, 1))).astype(np.float32)


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["lampe", "lampe", "plain", "selfextend", "rerope"]))
    window = draw(st.integers(1, 12))
    if kind == "plain":
        return None
    if kind == "selfextend":
        return lampe.LampeConfig.selfextend(window=window, group=draw(st.integers(1, 5)))
    if kind == "rerope":
        return lampe.LampeConfig.rerope(window=window)
    return lampe.LampeConfig(window=window, sink=draw(st.integers(1, 8)), mapping_length=draw(st.integers(1, 60)),
                             temperature=draw(st.sampled_from([1.0, lampe.DEFAULT_TEMPERATURE, 1.3])))


@st.composite
def attention_cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 4))
    D = draw(st.integers(1, 72))
    rd = 2 * draw(st.integers(0, D // 2))
    Lk = draw(st.integers(1, 90))
    Lq = draw(st.integers(1, min(Lk, 40)))
    left = [draw(st.integers(0, Lk)) for _ in range(B)]
    right = [draw(st.integers(0, Lk - lft)) for lft in left]
    mask = None
    if any(left) or any(right) or draw(st.booleans()):
        mask = np.zeros((B, Lk), bool)
        for b in range(B):
            mask[b, left[b]:Lk - right[b]] = True
    kw = dict(key_padding_mask=mask, layout=draw(st.sampled_from(["half", "interleaved"])), rotary_dim=rd)
    if draw(st.booleans()):
        kw["query_start"] = np.array([draw(st.integers(-3, Lk)) for _ in range(B)])
    cfg = draw(configs())
    if cfg is not None and is_lampe_mode(cfg.mode) and draw(st.booleans()):
        counts = mask.sum(1) if mask is not None else np.full(B, Lk)
        offs = np.array(left) if mask is not None else np.zeros(B, int)
        kw["prompt_length"] = np.array([o + draw(st.integers(1, max(1, int(c)))) for o, c in zip(offs, counts)])
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.3, 8.0))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.01, 1.0))
    return dict(B=B, Hq=Hq, Hkv=Hkv, D=D, Lq=Lq, Lk=Lk, cfg=cfg, kw=kw,
                dtype=draw(st.sampled_from(DTYPES)),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
                isa=draw(st.sampled_from(ISAS)), threads=draw(st.sampled_from([1, 2])),
                poison=draw(st.sampled_from([None, None, None, "q", "k", "v"])),
                poison_value=draw(st.sampled_from([np.nan, np.inf, -np.inf])),
                seed=draw(st.integers(0, 2**32 - 1)))


@SETTINGS
@given(attention_cases())
def test_fuzz_attention_against_reference(case):
    c = case
    rng = np.random.default_rng(c["seed"])
    x64 = {"q": rng.standard_normal((c["B"], c["Hq"], c["Lq"], c["D"])),
           "k": rng.standard_normal((c["B"], c["Hkv"], c["Lk"], c["D"])),
           "v": rng.standard_normal((c["B"], c["Hkv"], c["Lk"], c["D"]))}
    if c["poison"]:
        x = x64[c["poison"]]
        x[tuple(int(rng.integers(n)) for n in x.shape)] = c["poison_value"]
    if c["dtype"] == "bfloat16":  # the kernel and the reference see the same rounded values
        torch = torch_or_skip()
        x64 = {n: torch.from_numpy(x).bfloat16().double().numpy() for n, x in x64.items()}
    elif c["dtype"] == "float16":
        x64 = {n: x.astype(np.float16).astype(np.float64) for n, x in x64.items()}
    else:
        x64 = {n: x.astype(np.float32).astype(np.float64) for n, x in x64.items()}
    f = inv_freq(c["kw"]["rotary_dim"])
    ins = {n: as_layout(x64[n], c["dtype"], lay) for n, lay in zip("qkv", c["layouts"])}
    if c["dtype"] == "bfloat16" or (_torch and c["dtype"] == "float32" and "reversed" not in c["layouts"]
                                    and c["seed"] % 2):
        torch = torch_or_skip()
        ins = {n: x if hasattr(x, "detach") else torch.from_numpy(np.asarray(x)) for n, x in ins.items()}
    try:
        ref, rlse = lampe.reference.attention(x64["q"], x64["k"], x64["v"], c["cfg"], f, return_lse=True, **c["kw"])
    except ValueError as e:  # an invalid plan or layout: the kernel refuses it with the same words
        with pytest.raises(ValueError) as got:
            lampe.attention(ins["q"], ins["k"], ins["v"], config=c["cfg"], inv_freq=f, **c["kw"])
        assert str(got.value) == str(e)
        return
    lampe.set_cpu_isa(c["isa"])
    try:
        out, lse = lampe.attention(ins["q"], ins["k"], ins["v"], config=c["cfg"], inv_freq=f, return_lse=True,
                                   num_threads=c["threads"], **c["kw"])
    finally:
        lampe.set_cpu_isa(ISAS[-1])
    o, lse = as64(out), as64(lse)
    nan_rows = np.isnan(ref).all(-1)
    assert np.array_equal(np.isnan(o).all(-1), nan_rows)
    assert np.array_equal(np.isnan(lse), nan_rows)
    ok = ~nan_rows
    assert np.all(np.isfinite(o[ok]))
    err = np.abs(o[ok] - ref[ok]).max(initial=0) / max(np.abs(ref[ok]).max(initial=0), 1e-3)
    assert err < TOL[c["dtype"]], f"relative error {err:.3g}"
    fin = np.isfinite(rlse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert np.abs(lse[fin] - rlse[fin]).max(initial=0) < (1e-4 if c["dtype"] == "float32" else 1e-2)


@st.composite
def rope_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))) + (draw(st.integers(1, 40)),
                                                                              draw(st.integers(1, 70)))
    D = shape[-1]
    per_batch = len(shape) >= 3 and draw(st.booleans())
    return dict(shape=shape, rd=2 * draw(st.integers(0, D // 2)), per_batch=per_batch,
                layout=draw(st.sampled_from(["half", "interleaved"])), amp=draw(st.floats(0.5, 1.5)),
                dtype=draw(st.sampled_from(DTYPES)),
                xlay=draw(st.sampled_from(LAYOUTS)), out=draw(st.sampled_from([None, "fresh", "in_place"])),
                olay=draw(st.sampled_from(LAYOUTS)), isa=draw(st.sampled_from(ISAS)),
                seed=draw(st.integers(0, 2**32 - 1)))


@SETTINGS
@given(rope_cases())
def test_fuzz_rope_against_reference(case):
    c = case
    rng = np.random.default_rng(c["seed"])
    shape = c["shape"]
    shape4 = (1,) * (4 - len(shape)) + shape  # layouts are made in 4-D; dropping the leading 1s keeps a view
    x64 = as64(as_layout(rng.standard_normal(shape4), c["dtype"], "contiguous")).reshape(shape)  # representable
    L = shape[-2]
    pos = rng.integers(-5000, 5000, size=(shape[0], L) if c["per_batch"] else L)
    f = inv_freq(c["rd"])
    x = as_layout(x64.reshape(shape4), c["dtype"], c["xlay"]).reshape(shape)
    if c["out"] == "in_place":
        out = x
    elif c["out"] == "fresh":
        out = as_layout(np.zeros(shape4), c["dtype"], c["olay"]).reshape(shape)
    else:
        out = None
    lampe.set_cpu_isa(c["isa"])
    try:
        got = lampe.rope(x, pos, f, layout=c["layout"], rotary_dim=c["rd"], amplitude=c["amp"], out=out)
    finally:
        lampe.set_cpu_isa(ISAS[-1])
    if out is not None:
        assert got is out
    # float64 rotation with the same float32 angles
    ang = (pos.astype(np.float32)[..., None] * f).astype(np.float32).astype(np.float64)
    cs, sn = np.cos(ang) * c["amp"], np.sin(ang) * c["amp"]
    if c["per_batch"]:
        cs = cs.reshape(cs.shape[0], *([1] * (len(shape) - 3)), *cs.shape[1:])
        sn = sn.reshape(sn.shape[0], *([1] * (len(shape) - 3)), *sn.shape[1:])
    want = x64.copy()
    h = c["rd"] // 2
    if c["layout"] == "half":
        i1, i2 = slice(0, h), slice(h, c["rd"])
    else:
        i1, i2 = slice(0, c["rd"], 2), slice(1, c["rd"], 2)
    want[..., i1] = x64[..., i1] * cs - x64[..., i2] * sn
    want[..., i2] = x64[..., i2] * cs + x64[..., i1] * sn
    tol = {"float32": 3e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[c["dtype"]]
    np.testing.assert_allclose(as64(got), want, rtol=0, atol=tol * max(1.0, np.abs(want).max(initial=0)))
