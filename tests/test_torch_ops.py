"""The torch custom op lampe::attention: equals the kernel and the float64 reference in every mode,
carries presets as five numbers, passes opcheck, differentiates (gradcheck) and traces under compile."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lampe  # noqa: E402
from lampe import torch_backend  # noqa: E402
from lampe.torch_ops import OP_MODES, config_from_numbers, lampe_attention, op_numbers  # noqa: E402
from conftest import inv_freq  # noqa: E402


def args(seed=0, B=1, Hq=4, Hkv=2, Lq=24, Lk=24, D=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


LAMPE = lampe.LampeConfig(window=4, sink=2, mapping_length=8)
CONFIGS = {
    "causal": None,
    "lampe": LAMPE,
    "selfextend": lampe.LampeConfig.selfextend(window=4, group=3),
    "rerope": lampe.LampeConfig.rerope(window=5),
}


def test_every_mode_matches_the_kernel_and_the_reference():
    q, k, v = args(Lq=30, Lk=30)
    f = inv_freq(32)
    outs = {}
    for mode, cfg in CONFIGS.items():
        assert op_numbers(cfg)[0] == mode
        out, lse = lampe_attention(q, k, v, cfg, f)
        ref, rlse = lampe.attention(q, k, v, config=cfg, inv_freq=f, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, rlse), mode
        r64 = lampe.reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), cfg, f)
        assert np.abs(out.double().numpy() - r64).max() < 1e-4, mode
        outs[mode] = out
    # the mode really travels: the four results differ from each other
    modes = list(outs)
    for i in range(len(modes)):
        for j in range(i + 1, len(modes)):
            assert not torch.allclose(outs[modes[i]], outs[modes[j]], atol=1e-3), (modes[i], modes[j])


@pytest.mark.parametrize("preset", ["llama2", "llama3", "mistral", "llama3.1", "auto"])
def test_presets_travel_as_five_numbers(preset):
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=preset, pretrained_window=64)
    mode, window, sink, u, sigmoid, temperature = op_numbers(cfg)
    assert u == 0 and len(sigmoid) == 5
    back = config_from_numbers(mode, window, sink, u, sigmoid, temperature)
    for length in list(range(1, 200, 7)) + [4095, 8191, 8192, 8193, 20000, 131072, 10**6]:
        assert back.mapping_length_for(length) == cfg.mapping_length_for(length), (preset, length)
    q, k, v = args(Lq=40, Lk=40)
    out, _ = lampe_attention(q, k, v, cfg, inv_freq(32))
    assert torch.equal(out, lampe.attention(q, k, v, config=cfg, inv_freq=inv_freq(32)))


def test_mapping_sigmoid_travels():
    sig = lampe.MappingSigmoid(0.05, -1.0, 12.0, 0, 0)
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=sig)
    assert op_numbers(cfg)[4] == [0.05, -1.0, 12.0, 0.0, 0.0]
    q, k, v = args(Lq=40, Lk=40)
    out, _ = lampe_attention(q, k, v, cfg, inv_freq(32))
    assert torch.equal(out, lampe.attention(q, k, v, config=cfg, inv_freq=inv_freq(32)))


def test_prompt_length_padding_rotary_dim_layout_scale():
    q, k, v = args(B=2, Lq=6, Lk=40, D=32)
    f = inv_freq(16)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False
    pl = torch.tensor([34, 30])
    for layout in ("half", "interleaved"):
        out, lse = lampe_attention(q, k, v, LAMPE, f, prompt_length=pl, key_padding_mask=mask, rotary_dim=16,
                                   layout=layout, scale=0.3)
        ref, rlse = lampe.attention(q, k, v, config=LAMPE, inv_freq=f, prompt_length=pl, key_padding_mask=mask,
                                    rotary_dim=16, layout=layout, scale=0.3, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, rlse)


def test_bad_numbers_name_the_argument():
    q, k, v = args()
    f = torch.from_numpy(inv_freq(32))
    with pytest.raises(ValueError, match="mode"):
        torch.ops.lampe.attention(q, k, v, f, None, None, None, "lampe2", 4, 2, 8, [], 1.0, 0.0, 0, False, 0.0, 0)
    with pytest.raises(ValueError, match="sigmoid"):
        torch.ops.lampe.attention(q, k, v, f, None, None, None, "lampe", 4, 2, 0, [1.0], 1.0, 0.0, 0, False, 0.0, 0)


def _op_args(q, k, v, mode="lampe", pl=None, mask=None, u=8, sigmoid=()):
    return (q, k, v, torch.from_numpy(inv_freq(q.shape[-1])), pl, mask, None, mode, 4, 2, u, list(sigmoid), 1.07,
            0.0, 0, False, 0.0, 0)


def test_opcheck():
    q, k, v = args()
    pl = torch.tensor([20])
    mask = torch.ones(1, 24, dtype=torch.bool)
    mask[0, :2] = False
    sig = op_numbers(lampe.LampeConfig(mapping_length="llama3"))[4]
    for a in [_op_args(q, k, v), _op_args(q, k, v, pl=pl, mask=mask), _op_args(q, k, v, mode="causal"),
              _op_args(q, k, v, mode="selfextend", u=3), _op_args(q, k, v, u=0, sigmoid=sig)]:
        torch.library.opcheck(torch.ops.lampe.attention.default, a)
    qg, kg, vg = (x.requires_grad_() for x in args(Lq=8, Lk=20))
    torch.library.opcheck(torch.ops.lampe.attention.default, _op_args(qg, kg, vg))


@pytest.mark.parametrize("mode", OP_MODES)
def test_gradcheck_float64(mode):
    # float64 runs the float64 reference forward; the backward differentiates the torch backend.
    q, k, v = (x.double().requires_grad_() for x in args(seed=3, B=1, Hq=2, Hkv=1, Lq=5, Lk=9, D=4))
    cfg = {"causal": None, "lampe": lampe.LampeConfig(window=2, sink=1, mapping_length=3),
           "selfextend": lampe.LampeConfig.selfextend(window=2, group=2),
           "rerope": lampe.LampeConfig.rerope(window=2)}[mode]
    f = inv_freq(4)

    def fn(q, k, v):  # lse is float32 by contract: its gradient is checked in the next test
        return lampe_attention(q, k, v, cfg, f, prompt_length=7 if mode == "lampe" else None)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_autograd_of_the_torch_backend(dtype):
    q, k, v = args(seed=5, B=2, Lq=12, Lk=30, D=16, dtype=dtype)
    f = inv_freq(16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :4] = False
    pl = torch.tensor([26, 20])
    go = torch.randn(q.shape).to(dtype)
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = lampe_attention(*a, LAMPE, f, prompt_length=pl, key_padding_mask=mask)
    ((out.float() * go.float()).sum() + lse.sum()).backward()
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    out2, lse2 = torch_backend.attention(*b, config=LAMPE, inv_freq=f, prompt_length=pl, key_padding_mask=mask,
                                         return_lse=True)
    ((out2.float() * go.float()).sum() + lse2.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for x, y in zip(a, b):
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()
        assert (x.grad.float() - y.grad.float()).abs().max() <= tol * y.grad.float().abs().max()


def test_torch_compile_traces_the_op():
    q, k, v = args(Lq=8, Lk=40)
    f = torch.from_numpy(inv_freq(32))

    def fn(q, k, v):
        out, _ = lampe_attention(q * 1.0, k, v, LAMPE, f)
        return out.sum(dim=-1)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), fn(q, k, v))


def test_torch_compile_inductor_forward_and_backward():
    q, k, v = args(Lq=8, Lk=30)
    f = torch.from_numpy(inv_freq(32))

    def fn(q, k, v):
        out, lse = lampe_attention(q, k, v, LAMPE, f)
        return (out * 2).sum() + lse.sum()

    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    fn(*a).backward()
    torch.compile(fn, fullgraph=True)(*b).backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["lampe", "selfextend"])
def test_backward_in_query_chunks_equals_one_piece(monkeypatch, mode):
    import lampe.torch_ops as ops
    q, k, v = args(seed=7, B=2, Lq=23, Lk=30, D=16)
    f = inv_freq(16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :3] = False
    mask[0, 28:] = False  # trailing slots never attended (a static cache's tail)
    cfg = LAMPE if mode == "lampe" else lampe.LampeConfig.selfextend(window=4, group=3)
    pl = torch.tensor([25, 27]) if mode == "lampe" else None
    go = torch.randn(q.shape)
    grads = []
    for chunk in (1000, 5):
        monkeypatch.setattr(ops, "_BACKWARD_CHUNK", chunk)
        a = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = lampe_attention(*a, cfg, f, prompt_length=pl, key_padding_mask=mask)
        ((out * go).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
        grads.append([x.grad for x in a])
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    out2, lse2 = torch_backend.attention(*b, config=cfg, inv_freq=f, prompt_length=pl, key_padding_mask=mask,
                                         return_lse=True)
    ((out2 * go).sum() + torch.where(torch.isfinite(lse2), lse2, 0.0).sum()).backward()
    for one, chunked, ref in zip(grads[0], grads[1], [x.grad for x in b]):
        assert (chunked - one).abs().max() <= 1e-5 * one.abs().max()
        assert (chunked - ref).abs().max() <= 1e-5 * ref.abs().max()
