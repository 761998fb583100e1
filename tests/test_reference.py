"""The float64 reference against the spec's numeric check and independent brute-force forms."""
import math

import numpy as np
import pytest

import lampe
from conftest import inv_freq
from spec_examples import NUMERIC_ROWS


def spec_inputs():
    L, D = 20, 4
    i = np.arange(L)[:, None]
    t = np.arange(D)[None, :]
    q = np.sin(0.37 * (i + 1) * (t + 1))
    k = np.cos(0.23 * (i + 2) * (t + 1))
    v = np.sin(0.11 * (i + 3) + t)
    return q[None, None], k[None, None], v[None, None]


def test_spec_numeric_check():
    q, k, v = spec_inputs()
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=10)
    out, lse = lampe.reference.attention(q, k, v, cfg, inv_freq(4), return_lse=True)
    for row, exp in NUMERIC_ROWS.items():
        np.testing.assert_allclose(out[0, 0, row], exp["out"], atol=2e-6)
        total = math.log(sum(math.exp(x) for x in exp["lse"].values()))
        assert abs(lse[0, 0, row] - total) < 2e-6


def test_spec_numeric_check_kernel(isa):
    q, k, v = spec_inputs()
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=10)
    out, lse = lampe.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), config=cfg,
                               inv_freq=inv_freq(4), return_lse=True)
    for row, exp in NUMERIC_ROWS.items():
        np.testing.assert_allclose(out[0, 0, row], exp["out"], atol=2e-6)
        total = math.log(sum(math.exp(x) for x in exp["lse"].values()))
        assert abs(lse[0, 0, row] - total) < 2e-6


def rot_matrix_apply(x, pos, freq, amp):
    """Rotate-half RoPE as an explicit 2x2 rotation per frequency (a different formulation)."""
    out = np.empty_like(x)
    h = len(freq)
    for kk in range(h):
        a = float(np.float32(np.float32(pos) * freq[kk]))
        c, s = math.cos(a) * amp, math.sin(a) * amp
        out[..., kk] = c * x[..., kk] - s * x[..., kk + h]
        out[..., kk + h] = s * x[..., kk] + c * x[..., kk + h]
    return out


def brute_force(q, k, v, cfg, freq, prompt_length, query_start=None, key_count=None, softcap=None):
    """One softmax over the multiset of plan.table() visits, entry by entry (B = 1): query row t
    at position query_start + t (default: the last Lq positions), keys >= key_count dropped,
    logits optionally soft-capped."""
    _, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    p = lampe.plan(prompt_length, cfg)
    G = Hq // Hkv
    out = np.zeros((Hq, Lq, D))
    start = Lk - Lq if query_start is None else query_start
    rows = [start + t for t in range(Lq)]
    table = p.table([r for r in rows if r >= 0])
    if key_count is not None:
        table = table[table["key"] < key_count]
    for t, pos in enumerate(rows):
        ent = table[table["query"] == pos]
        if len(ent) == 0:
            continue
        for h in range(Hq):
            qs = [rot_matrix_apply(q[0, h, t], e["qpos"], freq, cfg.temperature) for e in ent]
            ks = [rot_matrix_apply(k[0, h // G, e["key"]], e["kpos"], freq, cfg.temperature) for e in ent]
            s = np.array([a @ b for a, b in zip(qs, ks)]) / math.sqrt(D)
            if softcap:
                s = softcap * np.tanh(s / softcap)
            w = np.exp(s - s.max())
            out[h, t] = (w / w.sum()) @ v[0, h // G, ent["key"]]
    return out


@pytest.mark.parametrize("Lk,Lq,prompt,H,T,U", [(24, 24, 24, 4, 2, 10), (30, 5, 26, 5, 3, 7), (9, 9, 9, 4, 1, 4),
                                                (12, 3, 7, 4, 2, 3)])
def test_reference_equals_brute_force(rng, Lk, Lq, prompt, H, T, U):
    D = 8
    q = rng.standard_normal((1, 4, Lq, D))
    k = rng.standard_normal((1, 2, Lk, D))
    v = rng.standard_normal((1, 2, Lk, D))
    cfg = lampe.LampeConfig(window=H, sink=T, mapping_length=U, temperature=1.07)
    f = inv_freq(D)
    ref = lampe.reference.attention(q, k, v, cfg, f, prompt_length=prompt)
    np.testing.assert_allclose(ref[0], brute_force(q, k, v, cfg, f, prompt), atol=1e-12)


@pytest.mark.parametrize("Lk,Lq,prompt,qstart,count,softcap", [
    (40, 9, 25, 20, 30, None),   # a static cache: queries mid-way, prompt rows and rows after it
    (40, 6, 18, 30, 33, 1.3),    # rows past the last valid key see only the valid ones
    (30, 5, 20, -2, 30, None),   # rows at negative positions output zeros
    (24, 24, 24, 0, 24, 0.8),    # soft-capped prefill
])
def test_reference_layout_equals_brute_force(rng, Lk, Lq, prompt, qstart, count, softcap):
    D, pad = 8, 3
    q = rng.standard_normal((1, 4, Lq, D)) * 2
    k = rng.standard_normal((1, 2, Lk, D)) * 2
    v = rng.standard_normal((1, 2, Lk, D))
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=5, temperature=1.07)
    f = inv_freq(D)
    # the same row behind `pad` left pads, with junk in the pads and in the never-attended tail
    junk = lambda x: np.concatenate([rng.standard_normal((1, x.shape[1], pad, D)) * 50, x], axis=2)
    kj, vj = junk(k), junk(v)
    kj[:, :, pad + count:] = vj[:, :, pad + count:] = 1e3
    mask = np.zeros((1, Lk + pad), bool)
    mask[0, pad:pad + count] = True
    ref, lse = lampe.reference.attention(q, kj, vj, cfg, f, key_padding_mask=mask, query_start=qstart,
                                         prompt_length=prompt + pad, softcap=softcap, return_lse=True)
    want = brute_force(q, k, v, cfg, f, prompt, query_start=qstart, key_count=count, softcap=softcap)
    np.testing.assert_allclose(ref[0], want, atol=1e-12)
    negative = np.arange(Lq) + qstart < 0
    assert np.all(ref[0][:, negative] == 0) and np.all(np.isneginf(lse[0][:, negative]))
    assert np.all(np.isfinite(lse[0][:, ~negative]))


def test_reference_none_is_causal_rope(rng):
    B, H, L, D = 2, 3, 15, 16
    q, k, v = (rng.standard_normal((B, H, L, D)) for _ in range(3))
    f = inv_freq(D)
    got = lampe.reference.attention(q, k, v, None, f)
    for b in range(B):
        for h in range(H):
            qr = np.stack([rot_matrix_apply(q[b, h, i], i, f, 1.0) for i in range(L)])
            kr = np.stack([rot_matrix_apply(k[b, h, i], i, f, 1.0) for i in range(L)])
            s = qr @ kr.T / math.sqrt(D)
            s[np.triu_indices(L, 1)] = -np.inf
            w = np.exp(s - s.max(axis=1, keepdims=True))
            np.testing.assert_allclose(got[b, h], (w / w.sum(axis=1, keepdims=True)) @ v[b, h], atol=1e-12)


def test_reference_padding_equals_unpadded(rng):
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=6)
    D, L, pad = 8, 14, 3
    q, k, v = (rng.standard_normal((1, 2, L, D)) for _ in range(3))
    f = inv_freq(D)
    alone = lampe.reference.attention(q, k, v, cfg, f)
    junk = lambda x: np.concatenate([rng.standard_normal((1, 2, pad, D)) * 50, x], axis=2)
    mask = np.ones((1, L + pad), bool)
    mask[0, :pad] = False
    padded, lse = lampe.reference.attention(junk(q), junk(k), junk(v), cfg, f, key_padding_mask=mask,
                                            return_lse=True)
    np.testing.assert_allclose(padded[:, :, pad:], alone, atol=1e-12)
    assert np.all(padded[:, :, :pad] == 0) and np.all(np.isneginf(lse[:, :, :pad]))


def test_reference_argument_errors(rng):
    q = rng.standard_normal((1, 2, 5, 8))
    k = rng.standard_normal((1, 1, 5, 8))
    f = inv_freq(8)
    cfg = lampe.LampeConfig(window=2, sink=1, mapping_length=2)
    with pytest.raises(ValueError, match="prompt_length"):
        lampe.reference.attention(q, k, k, cfg, f, prompt_length=6)
    with pytest.raises(ValueError, match="q has more positions"):
        lampe.reference.attention(rng.standard_normal((1, 2, 6, 8)), k, k, cfg, f)
    with pytest.raises(ValueError, match="key_padding_mask"):  # a hole inside the valid keys
        lampe.reference.attention(q, k, k, cfg, f, key_padding_mask=np.array([[True, False, True, True, True]]))
    with pytest.raises(TypeError, match="key_padding_mask"):
        lampe.reference.attention(q, k, k, cfg, f, key_padding_mask=np.ones((1, 5)))
    with pytest.raises(ValueError, match="multiple"):
        lampe.reference.attention(rng.standard_normal((1, 3, 5, 8)), rng.standard_normal((1, 2, 5, 8)),
                                  rng.standard_normal((1, 2, 5, 8)), cfg, f)
