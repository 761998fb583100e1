"""lampe.rope against a float64 NumPy rotation with the same float32 angles."""
import numpy as np
import pytest

import lampe
from conftest import inv_freq



def ref_rope(x, pos, freq, rotary_dim, layout, amp):
    """float64 rotation; pos broadcast over x [..., L, D] as [L] or [B, L]."""
    x = np.asarray(x, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.int64)
    ang = (pos.astype(np.float32)[..., None] * freq).astype(np.float32).astype(np.float64)
    c, s = np.cos(ang) * amp, np.sin(ang) * amp
    if pos.ndim == 2:  # [B, L, k] -> broadcast over the middle axes of x
        c = c.reshape(c.shape[0], *([1] * (x.ndim - 3)), *c.shape[1:])
        s = s.reshape(s.shape[0], *([1] * (x.ndim - 3)), *s.shape[1:])
    out = x.copy()
    h = rotary_dim // 2
    if layout == "half":
        x1, x2 = x[..., :h], x[..., h:rotary_dim]
        out[..., :h], out[..., h:rotary_dim] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


CASES = [
    # shape, positions kind, rotary_dim, layout
    ((1, 3, 17, 64), "L", None, "half"),
    ((2, 5, 33, 80), "BL", None, "interleaved"),
    ((2, 7, 128), "L", 64, "half"),          # partial rotary, 3-D x
    ((31, 96), "L", 32, "interleaved"),      # 2-D x
    ((2, 2, 3, 9, 130), "BL", 128, "half"),  # 5-D x, odd head dim tail copied
    ((1, 1, 1, 2), "L", None, "half"),       # one token, one pair
]


@pytest.mark.parametrize("shape,kind,rd,layout", CASES)
def test_rope_float32(isa, rng, shape, kind, rd, layout):
    x = rng.standard_normal(shape).astype(np.float32)
    L, D = shape[-2], shape[-1]
    rd_ = D if rd is None else rd
    f = inv_freq(rd_, base=10000.0)
    pos = rng.integers(-2**20, 2**20, size=(shape[0], L) if kind == "BL" else L)
    pos.flat[0] = 2**20  # the largest supported test position
    amp = 1.0693147
    y = lampe.rope(x, pos, f, layout=layout, rotary_dim=rd, amplitude=amp)
    ref = ref_rope(x, pos, f, rd_, layout, amp)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y - ref) / (np.abs(ref).max() + 1e-30)
    assert err.max() < 2e-6
    assert np.array_equal(y[..., rd_:], x[..., rd_:])  # pass-through dims untouched


def test_rope_in_place_and_out(rng):
    x = rng.standard_normal((2, 4, 50, 64)).astype(np.float32)
    f = inv_freq(64)
    pos = np.arange(50) - 7
    expect = lampe.rope(x, pos, f)
    y = x.copy()
    r = lampe.rope(y, pos, f, out=y)
    assert r is y and np.array_equal(y, expect)
    # a non-contiguous input (heads and tokens transposed) reads through its strides
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not xt.flags.c_contiguous
    assert np.array_equal(lampe.rope(xt, pos, f), expect)


def test_rope_float16_one_ulp(isa, rng):
    x = rng.standard_normal((2, 3, 40, 64)).astype(np.float16)
    f = inv_freq(64)
    pos = rng.integers(-5000, 5000, size=40)
    y = lampe.rope(x, pos, f, amplitude=1.1)
    ref = ref_rope(x.astype(np.float64), pos, f, 64, "half", 1.1)
    ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= ulp + 1e-12)


def test_rope_bfloat16_one_ulp(isa, rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((1, 4, 33, 128)).astype(np.float32)).bfloat16()
    f = inv_freq(128)
    pos = torch.from_numpy(rng.integers(0, 2**20, size=33))
    y = lampe.rope(x, pos, f, layout="interleaved")
    assert y.dtype == torch.bfloat16
    ref = ref_rope(x.float().numpy(), pos.numpy(), f, 128, "interleaved", 1.0)
    # one bfloat16 ulp of the exact result: 2^(e - 7) for |ref| in [2^e, 2^(e+1))
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
    assert np.all(np.abs(y.float().numpy() - ref) <= ulp)
    # torch float32 tensors are views, so out= writes through
    t = torch.from_numpy(rng.standard_normal((1, 2, 5, 8)).astype(np.float32))
    before = t.clone()
    lampe.rope(t, torch.arange(5), inv_freq(8), out=t)
    assert not torch.equal(t, before)


def test_rope_isas_agree(rng):
    x = rng.standard_normal((1, 2, 37, 128)).astype(np.float32)
    f = inv_freq(128)
    pos = rng.integers(-1000, 100000, size=37)
    outs = []
    for name in lampe.available_isas():
        lampe.set_cpu_isa(name)
        outs.append(lampe.rope(x, pos, f))
    lampe.set_cpu_isa(lampe.available_isas()[-1])
    for o in outs[1:]:  # no fused multiply-add in the rotation: every path gives the same bits
        assert np.array_equal(o, outs[0])


def test_rope_threads_agree(rng):
    x = rng.standard_normal((1, 8, 300, 64)).astype(np.float32)
    f = inv_freq(64)
    pos = np.arange(300)
    assert np.array_equal(lampe.rope(x, pos, f, num_threads=1), lampe.rope(x, pos, f, num_threads=2))


def test_rope_errors(rng):
    x = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    f = inv_freq(8)
    pos = np.arange(5)
    with pytest.raises(TypeError, match="x"):
        lampe.rope(x.astype(np.float64), pos, f)
    with pytest.raises(TypeError, match="x"):
        lampe.rope([[1.0]], pos, f)
    with pytest.raises(ValueError, match="positions"):
        lampe.rope(x, np.arange(4), f)
    with pytest.raises(TypeError, match="positions"):
        lampe.rope(x, pos.astype(np.float32), f)
    with pytest.raises(ValueError, match="inv_freq"):
        lampe.rope(x, pos, f[:3])
    with pytest.raises(ValueError, match="rotary_dim"):
        lampe.rope(x, pos, f, rotary_dim=7)
    with pytest.raises(ValueError, match="rotary_dim"):
        lampe.rope(x, pos, f, rotary_dim=10)
    with pytest.raises(ValueError, match="layout"):
        lampe.rope(x, pos, f, layout="neox")
    with pytest.raises(ValueError, match="out"):
        lampe.rope(x, pos, f, out=np.empty((1, 2, 5, 9), np.float32))
    with pytest.raises(TypeError, match="out"):
        lampe.rope(x, pos, f, out=np.empty((1, 2, 5, 8), np.float16))
    with pytest.raises(ValueError, match="positions"):
        lampe.rope(x, np.zeros((3, 5), np.int64), f)
    with pytest.raises(ValueError, match="x"):
        lampe.rope(np.zeros(5, np.float32), pos, f)
    with pytest.raises(ValueError, match="num_threads"):
        lampe.rope(x, pos, f, num_threads=0)
    ro = x.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        lampe.rope(x, pos, f, out=ro)
    # overlapping but not identical out: refused instead of producing garbage
    buf = np.zeros((1, 2, 6, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        lampe.rope(buf[:, :, :5], pos, f, out=buf[:, :, 1:])
    # empty sizes are fine and do nothing
    assert lampe.rope(np.zeros((0, 2, 5, 8), np.float32), pos, f).shape == (0, 2, 5, 8)


# ---------------------------------------------------------------- issue 12 part 2 regressions

def test_rope_refuses_an_out_with_overlapping_elements(rng):
    """An expanded out= (stride 0) used to rotate its shared row once per head."""
    torch = pytest.importorskip("torch")
    f = (1 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    x = torch.randn(1, 1, 4, 16).expand(1, 3, 4, 16)
    before = x.clone()
    with pytest.raises(ValueError, match="out"):
        lampe.rope(x, torch.arange(4), f, out=x)
    assert torch.equal(x, before)
    y = np.lib.stride_tricks.as_strided(np.zeros(64, np.float32), (1, 3, 4, 16), (0, 0, 64, 4), writeable=True)
    with pytest.raises(ValueError, match="out"):
        lampe.rope(y.copy(), np.arange(4), f, out=y)


def test_rope_negative_and_odd_strides_accepted(rng):
    """x[..., ::-1] and a reversed out= are accepted like any other non-contiguous array."""
    f = inv_freq(16)
    pos = np.arange(6) * 3
    base = rng.standard_normal((2, 3, 6, 16)).astype(np.float32)
    x = base[..., ::-1]
    want = lampe.rope(np.ascontiguousarray(x), pos, f)
    np.testing.assert_array_equal(lampe.rope(x, pos, f), want)
    out = np.zeros((2, 3, 6, 16), np.float32)[..., ::-1]
    assert lampe.rope(x, pos, f, out=out) is out
    np.testing.assert_array_equal(out, want)
    # every-other-element rows, in place through a reversed view
    x2 = rng.standard_normal((2, 3, 6, 32)).astype(np.float32)[..., ::2]
    want2 = lampe.rope(np.ascontiguousarray(x2), pos, f)
    lampe.rope(x2, pos, f, out=x2)
    np.testing.assert_array_equal(x2, want2)


def test_rope_inv_freq_must_be_1d(rng):
    x = rng.standard_normal((1, 1, 3, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="inv_freq"):
        lampe.rope(x, np.arange(3), inv_freq(16).reshape(2, 4))


def test_rope_refuses_inputs_that_require_grad():
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 2, 5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="backward"):
        lampe.rope(x, torch.arange(5), inv_freq(8))
    with torch.no_grad():
        assert lampe.rope(x, torch.arange(5), inv_freq(8)).shape == (1, 2, 5, 8)
