"""lampe's CUDA kernels (lampe._cuda) against the float64 reference and the CPU kernel.

Skipped, with the reason, where torch sees no CUDA device. Where one is present and lampe._cuda
is not built, the kernel tests skip too - unless LAMPE_REQUIRE_CUDA=1 (tools/gpu_check.sh sets it),
which turns a missing or unloadable extension into a failure.
"""
import inspect
import itertools
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to torch (the CUDA kernels need an sm_80+ GPU)", allow_module_level=True)

import lampe  # noqa: E402
import lampe.cuda as lcuda  # noqa: E402
from lampe import reference  # noqa: E402
from lampe.config import MODES  # noqa: E402

DEV = torch.device("cuda")
REQUIRE = os.environ.get("LAMPE_REQUIRE_CUDA") == "1"


@pytest.fixture(autouse=True)
def need_kernels(request):
    if "uses_fallback" in request.keywords:
        return
    if not lcuda.available():
        if REQUIRE:
            pytest.fail(f"LAMPE_REQUIRE_CUDA=1 but lampe._cuda is unavailable: {lcuda.info()['status']}")
        pytest.skip(f"lampe._cuda is not built: {lcuda.info()['status']}")


def inv_freq(dim, base=10000.0):
    return (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)


TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def lampe_cfg(mode, L):
    """A config whose plan is valid and non-trivial at length L (fallback when L < 2H)."""
    if mode is None:
        return None
    H = 4 if L < 200 else 64
    if mode == "selfextend":
        return lampe.LampeConfig.selfextend(window=H, group=3)
    if mode == "rerope":
        return lampe.LampeConfig.rerope(window=H)
    return lampe.LampeConfig(window=H, sink=3, mapping_length=max(1, L // 5), mode=MODES[0])


def make(B, Hq, Hkv, Lq, Lk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, D, generator=g)
    return [x.to(dtype) for x in (q, k, v)]


def expected(q, k, v, cfg, f, **kw):
    """float64 reference on small shapes, the CPU kernel (float32 math on the same 16-bit inputs)
    on larger ones."""
    small = q.shape[2] * k.shape[2] <= 200 * 200
    if small:
        out, lse = reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), cfg, f,
                                       return_lse=True, **kw)
        return torch.from_numpy(out).float(), torch.from_numpy(lse).float()
    out, lse = lampe.attention(q.float(), k.float(), v.float(), config=cfg, inv_freq=f, return_lse=True, **kw)
    return out.float(), lse.float()


def pairwise(factors, seed=0):
    """A greedy pairwise covering array: every pair of values of any two factors appears."""
    names = list(factors)
    uncovered = {(a, x, b, y) for a, b in itertools.combinations(range(len(names)), 2)
                 for x in range(len(factors[names[a]])) for y in range(len(factors[names[b]]))}
    rng = np.random.default_rng(seed)
    rows = []
    while uncovered:
        best, best_cov = None, -1
        for _ in range(60):
            row = [int(rng.integers(len(factors[n]))) for n in names]
            a, x, b, y = next(iter(uncovered))
            row[a], row[b] = x, y
            cov = sum((i, row[i], j, row[j]) in uncovered for i, j in itertools.combinations(range(len(names)), 2))
            if cov > best_cov:
                best, best_cov = row, cov
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(names)), 2)}
        rows.append({n: factors[n][best[i]] for i, n in enumerate(names)})
    return rows


FACTORS = {
    "dtype": [torch.bfloat16, torch.float16],
    "group": [1, 4, 8],
    "head_dim": [64, 128],
    "length": [1, 17, 1000, 4097],
    "lq_is_lk": [True, False],
    "left_pad": [False, True],
    "short_prompt": [False, True],
    "mode": [None, "lampe", "selfextend", "rerope"],
}
COVER = pairwise(FACTORS)


@pytest.mark.parametrize("case", COVER, ids=lambda c: "-".join(
    f"{k}={str(v).replace('torch.', '')}" for k, v in c.items()))
def test_pairwise_cover_against_reference(case):
    L, D, G = case["length"], case["head_dim"], case["group"]
    Lq = L if case["lq_is_lk"] else 1
    B, Hkv = 2, 2
    q, k, v = make(B, G * Hkv, Hkv, Lq, L, D, case["dtype"], seed=L + D + G)
    f = inv_freq(D)
    cfg = lampe_cfg(case["mode"], L)
    kw = {}
    if case["left_pad"] and L > 1:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, : L // 3] = False
        kw["key_padding_mask"] = mask
    if case["short_prompt"] and L > 2 and case["mode"] in (None, "lampe"):
        kw["prompt_length"] = np.array([L - L // 4, L - L // 4])
    want, want_lse = expected(q, k, v, cfg, f, **kw)
    kw_dev = dict(kw)
    if "key_padding_mask" in kw_dev:
        kw_dev["key_padding_mask"] = kw["key_padding_mask"].to(DEV)
    out, lse = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, return_lse=True, **kw_dev)
    torch.cuda.synchronize()
    tol = TOL[case["dtype"]]
    torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_tiled_and_row_kernels_agree(dtype, D):
    """Prompt rows through the tiled kernel (Lq = Lk) equal the same rows through the split-KV row
    kernel (a call with Lq <= 8): two independent implementations of one semantics."""
    L = 700
    q, k, v = make(1, 8, 2, L, L, D, dtype, seed=D)
    f = inv_freq(D)
    cfg = lampe.LampeConfig(window=64, sink=5, mapping_length=200, mode=MODES[0])
    full, full_lse = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, return_lse=True)
    for n in (8, 1):  # Lq <= 8: every row goes to the row kernel
        rows, rows_lse = lampe.attention(q[:, :, L - n:].to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f,
                                         return_lse=True)
        torch.testing.assert_close(rows.float(), full[:, :, L - n:].float(), atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(rows_lse, full_lse[:, :, L - n:], atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_step_equals_row_of_longer_call():
    """Row L + d - 1 of a call over a prompt of L plus later rows equals a decode step (Lq = 1)."""
    L, steps, D = 600, 5, 128
    q, k, v = make(1, 8, 2, L + steps, L + steps, D, torch.bfloat16, seed=3)
    f = inv_freq(D)
    cfg = lampe.LampeConfig(window=32, sink=4, mapping_length=150, mode=MODES[0])
    big = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, prompt_length=L)
    for d in range(1, steps + 1):
        n = L + d
        one = lampe.attention(q[:, :, n - 1: n].to(DEV), k[:, :, :n].to(DEV), v[:, :, :n].to(DEV), config=cfg,
                              inv_freq=f, prompt_length=L)
        torch.testing.assert_close(one.float(), big[:, :, n - 1: n].float(), atol=2e-2, rtol=2e-2)
    want = expected(q[:, :, L:], k, v, cfg, f, prompt_length=L)[0]
    torch.testing.assert_close(big[:, :, L:].float().cpu(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("D, rotary_dim, layout", [(128, 128, "interleaved"), (128, 96, "half"), (64, 36, "half"),
                                                   (64, 36, "interleaved"), (128, 32, "half"), (128, 36, "half"),
                                                   (256, 52, "half")])
@pytest.mark.parametrize("Lq", [1, 4, 150])
def test_rotary_layouts_and_partial_rotary(D, rotary_dim, layout, Lq):
    """The row kernel's three score paths (rotate-half or interleaved dims in groups of 8, and one
    pair at a time when they do not group: rotary_dim 36 or 52) and partial rotary, with a
    left-padded row and soft-capping, against the float64 reference; and (Lq = 150) the same
    layouts through the tiled kernel."""
    L = 150
    q, k, v = make(2, 8, 2, Lq, L, D, torch.bfloat16, seed=D + rotary_dim + Lq)
    f = inv_freq(rotary_dim)
    cfg = lampe.LampeConfig(window=8, sink=3, mapping_length=30, mode=MODES[0])
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :11] = False
    kw = dict(key_padding_mask=mask, rotary_dim=rotary_dim, layout=layout, softcap=4.0)
    want, want_lse = reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), cfg, f,
                                         return_lse=True, **kw)
    kw["key_padding_mask"] = mask.to(DEV)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, lse = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, return_lse=True, **kw)
        torch.cuda.synchronize()
    kernel = "lcu_decode_kernel" if Lq <= 8 else "lcu_prefill_kernel"
    assert any(kernel in e.name for e in prof.events()), "lampe's kernel did not run (the torch fallback did)"
    torch.testing.assert_close(out.float().cpu(), torch.from_numpy(want).float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.cpu(), torch.from_numpy(want_lse).float(), atol=3e-2, rtol=3e-2)


def test_long_decode_32k():
    """Lq = 1 over 32768 keys (split-KV), Llama-3-8B head layout, against the CPU kernel."""
    L, D = 32768, 128
    q, k, v = make(1, 32, 8, 1, L, D, torch.bfloat16, seed=5)
    f = inv_freq(D, 500000.0)
    cfg = lampe.LampeConfig(window=512, sink=200, mapping_length="llama3", mode=MODES[0])
    out, lse = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, return_lse=True,
                               prompt_length=L - 1)
    want, want_lse = lampe.attention(q.float(), k.float(), v.float(), config=cfg, inv_freq=f, return_lse=True,
                                     prompt_length=L - 1)
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=2e-2, rtol=2e-2)


def test_nan_policy():
    """NaN in an attended key or value makes the row NaN; NaN in a padded or future key does not."""
    L, D = 100, 64
    q, k, v = make(2, 4, 2, L, L, D, torch.bfloat16, seed=9)
    f = inv_freq(D)
    cfg = lampe.LampeConfig(window=8, sink=2, mapping_length=20, mode=MODES[0])
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :10] = False
    k[1, :, 3] = float("nan")   # a padded key of row 1
    v[0, :, 50] = float("nan")  # key 50 of row 0: future for rows < 50, attended from 50 on
    out = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f,
                          key_padding_mask=mask.to(DEV)).float().cpu()
    assert torch.isfinite(out[1]).all()
    assert torch.isfinite(out[0, :, :50]).all()
    assert torch.isnan(out[0, :, 50:]).all()
    for Lq in (1, 4):  # the row kernel applies the same policy
        o = lampe.attention(q[:, :, -Lq:].to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f,
                            key_padding_mask=mask.to(DEV)).float().cpu()
        assert torch.isnan(o[0]).all() and torch.isfinite(o[1]).all()


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_matches_the_cpu_kernel(layout, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 37, 128, generator=g).to(dtype)
    f = inv_freq(96)
    pos = torch.randint(-5, 200000, (2, 37), generator=g)
    got = lampe.rope(x.to(DEV), pos.to(DEV), f, layout=layout, rotary_dim=96, amplitude=1.07).cpu()
    want = lampe.rope(x, pos, f, layout=layout, rotary_dim=96, amplitude=1.07)
    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert torch.equal(got[..., 96:], x[..., 96:])


@pytest.mark.uses_fallback
def test_float32_uses_the_torch_backend():
    q, k, v = make(1, 4, 2, 33, 33, 32, torch.float32, seed=2)
    f = inv_freq(32)
    cfg = lampe.LampeConfig(window=4, sink=2, mapping_length=8, mode=MODES[0])
    out = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f).cpu()
    want = torch.from_numpy(reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), cfg,
                                                f)).float()
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_contract_extension_when_the_reference_has_it():
    params = inspect.signature(reference.attention).parameters
    if "query_start" not in params or "softcap" not in params:
        pytest.skip("lampe.reference.attention has no query_start/softcap yet (core's contract extension)")
    L, D = 90, 64
    q, k, v = make(1, 4, 2, 6, L, D, torch.bfloat16, seed=4)
    f = inv_freq(D)
    cfg = lampe.LampeConfig(window=8, sink=2, mapping_length=20, mode=MODES[0])
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, 80:] = False  # trailing never-attended slots (a static cache's unused tail)
    kw = dict(key_padding_mask=mask, query_start=np.array([74]), softcap=5.0, prompt_length=np.array([60]))
    want, want_lse = reference.attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), cfg, f,
                                         return_lse=True, **kw)
    kw["key_padding_mask"] = mask.to(DEV)
    out, lse = lampe.attention(q.to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f, return_lse=True, **kw)
    torch.testing.assert_close(out.float().cpu(), torch.from_numpy(want).float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.cpu(), torch.from_numpy(want_lse).float(), atol=3e-2, rtol=3e-2)


def test_opcheck():
    if not lcuda._schema_matches():
        pytest.skip("lampe::attention does not have the contract schema yet (hf's torch_ops change)")
    q, k, v = make(1, 4, 2, 24, 24, 64, torch.bfloat16, seed=0)
    f = torch.from_numpy(inv_freq(64)).to(DEV)
    pl = torch.tensor([20])
    mask = torch.ones(1, 24, dtype=torch.bool, device=DEV)
    mask[0, :2] = False
    for extra in [(None, None, None), (pl, mask, None)]:
        args = (q.to(DEV), k.to(DEV), v.to(DEV), f, extra[0], extra[1], extra[2], "lampe", 4, 2, 8, [], 1.07, 0.0,
                0, False, 0.0, 0)
        torch.library.opcheck(torch.ops.lampe.attention.default, args)


def test_patched_tiny_model_cuda_matches_cpu():
    transformers = pytest.importorskip("transformers")
    path = os.path.join(os.path.dirname(lampe.__file__), "assets", "tiny-llama")
    if not os.path.isdir(path):
        pytest.skip("the tiny model asset is not installed")
    cpu = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    gpu = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(DEV).eval()
    window = cpu.config.max_position_embeddings
    cfg = lampe.LampeConfig.paper(pretrained_window=window).replace(mode=MODES[0])
    lampe.patch(cpu, cfg)
    handle = lampe.patch(gpu, cfg)
    # the patched CUDA model reaches lampe::attention and the op runs lampe's CUDA kernel (not the
    # pure-torch fallback, which would pass this comparison as well)
    assert "lampe::attention op" in repr(handle), repr(handle)
    assert lcuda.info()["op_kernel"] == "kernel", lcuda.info()
    ids = torch.randint(5, cpu.config.vocab_size, (1, 4 * window), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = cpu(ids).logits.float()
        b = gpu(ids.to(DEV)).logits.float().cpu()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.95, agree
    assert (a - b).abs().mean().item() < 0.05 * a.std().item()


def test_compiled_patched_model_with_padding_on_cuda_equals_eager():
    """lampe::patched_layer (lampe/hf/compiled.py) on CUDA tensors: the plans on the host, the
    key positions on the device, inductor around it; no graph break."""
    transformers = pytest.importorskip("transformers")
    path = os.path.join(os.path.dirname(lampe.__file__), "assets", "tiny-llama")
    if not os.path.isdir(path):
        pytest.skip("the tiny model asset is not installed")
    m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(DEV).eval()
    window = m.config.max_position_embeddings
    lampe.patch(m, window=16, sink=4, active_from=window)
    ids = torch.randint(5, m.config.vocab_size, (2, 2 * window), generator=torch.Generator().manual_seed(0)).to(DEV)
    am = torch.ones_like(ids)
    am[1, :9] = 0
    with torch.no_grad():
        eager = m(ids, attention_mask=am).logits.float()
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)(ids, attention_mask=am).logits.float()
        forward = m.forward
        m.forward = torch.compile(forward, fullgraph=True)
        try:
            got = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
        finally:
            m.forward = forward
        want = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    valid = am.bool()
    assert (compiled - eager)[valid].abs().max().item() <= 0.02 * eager[valid].abs().max().item()
    assert (got == want).float().mean().item() > 0.9  # bf16: inductor's fusions may flip a near tie


def test_small_case_for_sanitizer():
    """tools/gpu_check.sh runs this one under compute-sanitizer --tool memcheck."""
    q, k, v = make(2, 4, 2, 70, 70, 64, torch.bfloat16, seed=11)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, :7] = False
    f = inv_freq(64)
    cfg = lampe.LampeConfig(window=8, sink=2, mapping_length=20, mode=MODES[0])
    for Lq in (70, 3):
        out = lampe.attention(q[:, :, -Lq:].to(DEV), k.to(DEV), v.to(DEV), config=cfg, inv_freq=f,
                              key_padding_mask=mask.to(DEV))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and not math.isnan(out.float().sum().item())
