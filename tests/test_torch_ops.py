"""The torch custom op lampe::attention: equals the kernel, passes opcheck, traces under compile."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lampe  # noqa: E402
from lampe.torch_ops import lampe_attention  # noqa: E402
from conftest import inv_freq  # noqa: E402


def args(seed=0, Lq=24, Lk=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, Lq, 32, generator=g).to(dtype)
    k = torch.randn(1, 2, Lk, 32, generator=g).to(dtype)
    v = torch.randn(1, 2, Lk, 32, generator=g).to(dtype)
    return q, k, v


def test_op_matches_kernel():
    q, k, v = args()
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=8)
    out, lse = lampe_attention(q, k, v, cfg, inv_freq(32))
    ref, rlse = lampe.attention(q, k, v, config=cfg, inv_freq=inv_freq(32), return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, rlse)
    out2, _ = lampe_attention(q, k, v, lampe.LampeConfig(window=4, sink=2, mapping_length="llama3"), inv_freq(32))
    assert out2.shape == q.shape


def test_opcheck():
    q, k, v = args()
    f = torch.from_numpy(inv_freq(32))
    pl = torch.tensor([20])
    mask = torch.ones(1, 24, dtype=torch.bool)
    mask[0, :2] = False
    for extra in [(None, None, True), (pl, mask, True), (None, None, False)]:
        torch.library.opcheck(torch.ops.lampe.attention.default,
                              (q, k, v, f, extra[0], extra[1], extra[2], 4, 2, 8, "", 0, 1.07, 0, False, 0.0, 0))


def test_torch_compile_traces_the_op():
    q, k, v = args(Lq=8, Lk=40)
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=8)
    f = torch.from_numpy(inv_freq(32))

    def fn(q, k, v):
        out, _ = lampe_attention(q * 1.0, k, v, cfg, f)
        return out.sum(dim=-1)

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), fn(q, k, v))
