"""lampe.patch on tiny random-weight transformers models (built from configs, no downloads)."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402
from lampe.hf import compat as hfcompat  # noqa: E402
from lampe.hf import patching as hfpatch  # noqa: E402

W = 64  # pretrained window of the tiny models: LaMPE is active beyond 64 tokens
SMALL = dict(window=16, sink=4, active_from=W)  # the mechanism at W; the defaults' policy: test_eval.py


def tiny(family="llama", dtype=torch.float32, seed=0, **extra):
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=W, attn_implementation="sdpa")
    common.update(extra)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        common.setdefault("sliding_window", None)
        cfg = transformers.MistralConfig(**common)
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    return cls(cfg).eval().to(dtype)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, n), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_below_active_from_is_bit_identical(family):
    m = tiny(family)
    x = ids(W)  # total length == active_from: LaMPE not active
    with torch.no_grad():
        ref = m(x).logits
        ref_gen = m.generate(x[:, :40], max_new_tokens=20, do_sample=False)
        with lampe.patched(m, **SMALL):
            out = m(x).logits
            gen = m.generate(x[:, :40], max_new_tokens=20, do_sample=False)  # ends at 60 < 64
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


def test_below_active_from_bf16_close():
    m = tiny("llama", dtype=torch.bfloat16)
    x = ids(50)
    with torch.no_grad():
        ref = m(x).logits.float()
        with lampe.patched(m, **SMALL):
            out = m(x).logits.float()
    assert torch.allclose(out, ref, atol=2e-2, rtol=0)


class Capture:
    """Records each layer's attention inputs (hidden states) and outputs (o_proj inputs)."""

    def __init__(self, model):
        self.hidden, self.attn_out, self.hooks = {}, {}, []
        for m in hfcompat.attention_modules(model):
            self.hooks.append(m.register_forward_pre_hook(self._pre(m), with_kwargs=True))
            self.hooks.append(m.o_proj.register_forward_pre_hook(self._out(m)))

    def _pre(self, m):
        def hook(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            self.hidden.setdefault(m.layer_idx, []).append(h.detach().clone())
        return hook

    def _out(self, m):
        def hook(mod, args):
            self.attn_out.setdefault(m.layer_idx, []).append(args[0].detach().clone())
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def expected_attention(model, handle, layer, hidden, prompt_length):
    """lampe.reference.attention on q, k, v recomputed from the layer's own projections."""
    m = [a for a in hfcompat.attention_modules(model) if a.layer_idx == layer][0]
    B, T, _ = hidden.shape
    D = m.head_dim
    q = m.q_proj(hidden).view(B, T, -1, D)
    k = m.k_proj(hidden).view(B, T, -1, D)
    if hasattr(m, "q_norm"):  # Qwen3 normalises q and k before RoPE
        q, k = m.q_norm(q), m.k_norm(k)
    v = m.v_proj(hidden).view(B, T, -1, D)
    q, k, v = (t.transpose(1, 2).detach().double().numpy() for t in (q, k, v))
    rot = handle.layers[m]
    cfg = handle.config.replace(temperature=handle.config.temperature * rot.attention_scaling)
    return lampe.reference.attention(q, k, v, cfg, rot.inv_freq().numpy(), prompt_length=prompt_length,
                                     scale=m.scaling)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_match_reference_prompt_and_decode(family):
    m = tiny(family)
    x = ids(100)
    h = lampe.patch(m, **SMALL)
    cap = Capture(m)
    try:
        with torch.no_grad():
            m.generate(x, max_new_tokens=6, do_sample=False)
    finally:
        cap.close()
    for layer, hs in cap.hidden.items():
        full = torch.cat(hs, dim=1)  # every token's hidden state, prompt then decode steps
        ref = expected_attention(m, h, layer, full, prompt_length=100)  # [B, H, T, D]
        D = hfcompat.attention_modules(m)[0].head_dim
        got = torch.cat(cap.attn_out[layer], dim=1).view(1, full.shape[1], -1, D).transpose(1, 2).double().numpy()
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (family, layer, err)
    h.remove()


def test_generate_modes_and_new_turn():
    m = tiny("llama")
    x = ids(90)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        greedy = m.generate(x, max_new_tokens=3 * W, do_sample=False)  # far beyond the window
        assert greedy.shape == (1, 90 + 3 * W)
        torch.manual_seed(0)
        s1 = m.generate(x, max_new_tokens=10, do_sample=True, top_k=20)
        torch.manual_seed(0)
        s2 = m.generate(x, max_new_tokens=10, do_sample=True, top_k=20)
        assert torch.equal(s1, s2)
        beams = m.generate(x, max_new_tokens=8, num_beams=2, do_sample=False)
        assert beams.shape == (1, 98)
        # a second turn continues the returned cache: its rows are rows after the prompt
        out = m.generate(x, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        turn = torch.cat([out.sequences, ids(12, seed=7)], dim=1)
        cap = Capture(m)
        try:
            more = m.generate(turn, **hfcompat.cache_kwargs(m, hfcompat.output_cache(out)), max_new_tokens=4,
                              do_sample=False)
        finally:
            cap.close()
        assert torch.equal(more[:, :turn.shape[1]], turn)
        layer = 0
        # The plan was made from the 90-token prompt of the first call. Layer 0's input is the
        # embedding of each token, so every token's hidden state is known without a capture.
        full = m.model.embed_tokens(more[:, :-1])
        got = torch.cat(cap.attn_out[layer], dim=1)
        T_new = got.shape[1]
        ref = expected_attention(m, h, layer, m.model.layers[0].input_layernorm(full), prompt_length=90)
        ref_rows = ref[:, :, -T_new:].transpose(0, 2, 1, 3).reshape(1, T_new, -1)
        err = np.abs(got.double().numpy() - ref_rows).max() / np.abs(ref_rows).max()
        assert err < 1e-4


def test_use_cache_false_plans_like_the_cache():
    # generate() without a cache recomputes every step from scratch; the plan is still the
    # prompt's, so the tokens equal generation with a cache. A plain forward is its own prompt.
    m = tiny("llama")
    x = ids(80)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        cap = Capture(m)
        try:
            no_cache = _gen(m, x, max_new_tokens=3, use_cache=False)
        finally:
            cap.close()
        cached = _gen(m, x, max_new_tokens=3)
        hs = cap.hidden[0][1]  # second step: 81 tokens, rows from 80 on after the 80-token prompt
        ref = expected_attention(m, h, 0, hs, prompt_length=80)
        got = cap.attn_out[0][1].double().numpy()
        assert np.abs(got - ref.transpose(0, 2, 1, 3).reshape(got.shape)).max() < 1e-4 * np.abs(ref).max()
        cap = Capture(m)
        try:
            m(torch.cat([x, no_cache[0][:, 80:81]], dim=1))
        finally:
            cap.close()
        ref = expected_attention(m, h, 0, cap.hidden[0][0], prompt_length=81)
        got = cap.attn_out[0][0].double().numpy()
        assert np.abs(got - ref.transpose(0, 2, 1, 3).reshape(got.shape)).max() < 1e-4 * np.abs(ref).max()
    assert torch.equal(no_cache[0], cached[0])
    assert torch.allclose(no_cache[1], cached[1], atol=1e-4)


def test_left_padded_batch_equals_rows_alone():
    m = tiny("llama")
    a, b = ids(100, seed=3), ids(85, seed=4)
    pad = 100 - 85
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad(), lampe.patched(m, **SMALL):
        both = m.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone_a = m.generate(a, max_new_tokens=8, do_sample=False)
        alone_b = m.generate(b, max_new_tokens=8, do_sample=False)
    assert torch.equal(both[0, 100:], alone_a[0, 100:])
    assert torch.equal(both[1, 100:], alone_b[0, 85:])


def test_cache_misuse_raises_and_masked_rows_finite():
    m = tiny("llama")
    x = ids(80)
    with torch.no_grad():
        h = lampe.patch(m, **SMALL)
        out = m(x, use_cache=True)
        h.remove()
        with pytest.raises(RuntimeError, match="un-rotated"):
            m(ids(1), **hfcompat.cache_kwargs(m, hfcompat.output_cache(out)))
        plain = m(x, use_cache=True)
        with lampe.patched(m, **SMALL):
            with pytest.raises(RuntimeError, match="rotated keys"):
                m(ids(1), **hfcompat.cache_kwargs(m, hfcompat.output_cache(plain)))
            # padded query rows see no valid key at all: outputs stay finite
            batch = torch.cat([x, x])
            mask = torch.ones_like(batch)
            mask[1, :79] = 0
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() builds them
            logits = m(batch, attention_mask=mask, position_ids=position_ids).logits
            assert torch.isfinite(logits).all()
            # positions that ignore the padding: row 0 is unpadded, row 1's only token sees itself
            ignoring = m(batch, attention_mask=mask).logits
            assert torch.isfinite(ignoring).all()
            assert torch.allclose(ignoring[:, -1], logits[:, -1], atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_torch_backend_equals_c_backend(dtype, tol):
    m = tiny("qwen2", dtype=dtype)
    x = ids(90)
    with torch.no_grad():
        with lampe.patched(m, backend="c", **SMALL):
            a = m(x).logits.float()
        with lampe.patched(m, backend="torch", **SMALL):
            b = m(x).logits.float()
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_sliding_window_and_restore_exactly():
    m = tiny("mistral", sliding_window=32)
    x = ids(50)
    with pytest.raises(ValueError, match="disable_sliding_window"):
        lampe.patch(m)
    before_cfg = m.config.to_dict()
    before_sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(x).logits
        h = lampe.patch(m, disable_sliding_window=True, **SMALL)
        assert m.config.sliding_window is None and lampe.is_patched(m)
        m(ids(120))
        h.remove()
        assert torch.equal(m(x).logits, ref)
    assert m.config.to_dict() == before_cfg
    assert all(torch.equal(v, before_sd[k]) for k, v in m.state_dict().items())
    assert not lampe.is_patched(m)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_two_models_do_not_interfere():
    m1, m2 = tiny("llama", seed=0), tiny("llama", seed=0)
    x = ids(100)
    with torch.no_grad():
        h1 = lampe.patch(m1, window=16, sink=4)
        h2 = lampe.patch(m2, window=8, sink=2, mapping_length=20)
        a1, a2 = m1(x).logits, m2(x).logits
        h2.remove()
        assert torch.equal(m1(x).logits, a1)
        h1.remove()
    assert not torch.equal(a1, a2)


def test_defaults_derived_from_the_model():
    cfg = lambda **kw: transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                                intermediate_size=64, **kw)
    assert hfpatch.default_config(cfg(max_position_embeddings=4096)).mapping_length == "llama2"
    assert hfpatch.default_config(cfg(max_position_embeddings=8192)).mapping_length == "llama3"
    llama31 = cfg(max_position_embeddings=131072, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                  "rope_theta": 500000.0})
    assert hfpatch.default_config(llama31).mapping_length == "llama3.1"
    yarn = cfg(max_position_embeddings=32768, rope_parameters={"rope_type": "yarn", "factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 10000.0})
    d = hfpatch.default_config(yarn)
    assert d.pretrained_window == 8192 and (d.active_from, d.growth_from) == (10240, 12288)  # 1.25 W, 1.5 W
    m = transformers.MistralConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=32768)
    assert hfpatch.default_config(m).mapping_length == "mistral"
    small = hfpatch.default_config(cfg(max_position_embeddings=256))
    assert (small.window, small.sink, small.mapping_length) == (32, 12, "auto")  # W/8, W*200/4096
    h = lampe.patch(tiny("llama"))
    assert "generic rule from W=64" in repr(h) and "longer than 80 tokens and on rows grown past 96" in repr(h)
    h.remove()
    h = lampe.patch(tiny("llama"), config="paper")
    assert (h.config.window, h.config.sink, h.config.active_from) == (8, 3, 0)  # W/8 and W*200/4096 of W=64
    h.remove()
    assert lampe.LampeConfig.paper() == lampe.LampeConfig(window=512, sink=200, mapping_length=1536, active_from=0)
    assert (lampe.LampeConfig.paper(131072).window, lampe.LampeConfig.paper(131072).sink) == (512, 200)


def test_unsupported_families_raise():
    if not hasattr(transformers, "SmolLM3ForCausalLM"):
        pytest.skip("this transformers has no SmolLM3")
    cfg = transformers.SmolLM3Config(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    with pytest.raises(NotImplementedError, match="NoPE"):
        lampe.patch(transformers.SmolLM3ForCausalLM(cfg))
    with pytest.raises(ValueError, match="backend"):
        lampe.patch(tiny("llama"), backend="cuda-magic")


# ---------------------------------------------------------------- issue 11 item 1: padding, caches


def run(m, fn, **patch_kw):
    """fn() unpatched, then patched (SMALL window and sink unless overridden)."""
    with torch.no_grad():
        ref = fn()
        with lampe.patched(m, **dict(SMALL, **patch_kw)):
            out = fn()
    return ref, out


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_below_active_from_is_bit_identical(family):
    m = tiny(family)
    x = ids(30, batch=2)
    am = torch.ones_like(x)
    am[1, 20:] = 0
    ref, out = run(m, lambda: m(x, attention_mask=am).logits)
    assert torch.equal(out, ref)


def test_left_padding_without_position_ids_below_is_bit_identical():
    m = tiny("llama")
    x = ids(40, batch=2)
    am = torch.ones_like(x)
    am[1, :7] = 0
    ref, out = run(m, lambda: m(x, attention_mask=am).logits)
    assert torch.equal(out, ref)


def _gen(m, x, **kw):
    out = m.generate(x, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def test_pad_id_inside_prompt_below_is_bit_identical():
    m = tiny("llama")
    x = ids(30)
    x[0, 12] = 0  # generate() masks pad ids wherever they are
    ref, out = run(m, lambda: _gen(m, x, max_new_tokens=8, pad_token_id=0))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_cache_below_is_bit_identical(family):
    m = tiny(family)
    x = ids(20)
    ref, out = run(m, lambda: _gen(m, x, max_new_tokens=12, cache_implementation="static"))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_right_padding_beyond_active_from_equals_rows_alone():
    m = tiny("llama")
    a, b = ids(100, seed=3), ids(85, seed=4)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 15, dtype=torch.long)], dim=1)])
    am = torch.ones_like(batch)
    am[1, 85:] = 0
    with torch.no_grad(), lampe.patched(m, **SMALL):
        both = m(batch, attention_mask=am).logits
        alone_a, alone_b = m(a).logits, m(b).logits
    assert torch.isfinite(both).all()
    assert torch.allclose(both[0], alone_a[0], atol=1e-5)
    assert torch.allclose(both[1, :85], alone_b[0], atol=1e-5)


def test_left_padding_without_position_ids_beyond_active_from_equals_rows_alone():
    m = tiny("llama")
    a, b = ids(100, seed=3), ids(85, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 15, dtype=torch.long), b], dim=1)])
    am = torch.ones_like(batch)
    am[1, :15] = 0
    with torch.no_grad(), lampe.patched(m, **SMALL):
        both = m(batch, attention_mask=am).logits  # no position_ids: transformers counts the pads
        alone_b = m(b).logits
    assert torch.allclose(both[1, 15:], alone_b[0], atol=1e-5)


def test_pad_id_inside_prompt_beyond_active_from_is_skipped_like_unpatched():
    # The unpatched model masks the pad id and counts positions past it (generate's position_ids):
    # the answer is the prompt's without that token. Patched, the same holds beyond active_from.
    m = tiny("llama")
    x = ids(90, seed=5)
    holed = x.clone()
    holed[0, 40] = 0
    without = torch.cat([x[:, :40], x[:, 41:]], dim=1)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        got = m.generate(holed, max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = m.generate(without, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got[0, 90:], want[0, 89:])


@pytest.mark.parametrize("prompt", [80, 58])  # beyond the window / crossing it while decoding
def test_static_cache_equals_dynamic_cache(prompt):
    m = tiny("llama")
    x = ids(prompt)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        dyn = _gen(m, x, max_new_tokens=12)
        sta = _gen(m, x, max_new_tokens=12, cache_implementation="static")
    assert torch.equal(sta[0], dyn[0])
    assert torch.allclose(sta[1], dyn[1], atol=1e-5)


# ---------------------------------------------------------------- item 2: speculative decoding, cache edits


def repetitive(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(3, 97, (1, 16), generator=g)
    return block.repeat(1, n // 16 + 1)[:, :n]


@pytest.mark.parametrize("prompt,growth", [(80, None), (58, None), (58, W + 4)])
def test_prompt_lookup_decoding_equals_greedy(prompt, growth):
    m = tiny("llama")
    x = repetitive(prompt)
    with torch.no_grad(), lampe.patched(m, growth_from=growth, **SMALL):
        greedy = _gen(m, x, max_new_tokens=14)
        lookup = _gen(m, x, max_new_tokens=14, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup[0], greedy[0])
    assert torch.allclose(lookup[1], greedy[1], atol=1e-4)  # the same plans, not only the same argmax


@pytest.mark.parametrize("prompt,growth", [(80, None), (58, None), (58, W + 4)])
def test_assisted_decoding_equals_greedy(prompt, growth):
    m, assistant = tiny("llama", seed=0), tiny("llama", seed=0)
    x = repetitive(prompt, seed=2)
    with torch.no_grad(), lampe.patched(m, growth_from=growth, **SMALL):
        greedy = _gen(m, x, max_new_tokens=14)
        assisted = _gen(m, x, max_new_tokens=14, assistant_model=assistant)
    assert torch.equal(assisted[0], greedy[0])
    assert torch.allclose(assisted[1], greedy[1], atol=1e-4)


def test_cache_held_plans_follow_reorders_and_crops():
    m = tiny("llama")
    a, b = ids(100, seed=3), ids(80, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 20, dtype=torch.long), b], dim=1)])
    am = torch.ones_like(batch)
    am[1, :20] = 0
    nxt = ids(1, batch=2, seed=9)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        out = m(batch, attention_mask=am, use_cache=True)
        cache = hfcompat.output_cache(out)
        am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=1)
        pos = (am2.cumsum(-1) - 1)[:, -1:]
        step = m(nxt, attention_mask=am2, position_ids=pos, **hfcompat.cache_kwargs(m, cache)).logits
        # crop the decode step away and swap the rows (a beam reorder): the plans must follow
        cache.crop(-1)
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = m(nxt.flip(0), attention_mask=am2.flip(0), position_ids=pos.flip(0),
                    **hfcompat.cache_kwargs(m, cache)).logits
    assert torch.allclose(swapped.flip(0), step, atol=1e-5)



def test_crop_below_a_growth_plan_returns_to_the_models_own_attention():
    """Assisted decoding's verification forward can cross growth_from (planned at growth_from + 1)
    and then be cropped below it: token-by-token decoding would not have switched yet, so the row
    must run the model's own attention again, as unpatched."""
    m = tiny("llama")
    x = ids(70, seed=5)  # a 60-token prompt (below active_from = 64), then 10 tokens in one forward
    with torch.no_grad():
        ref = m(x[:, :67]).logits[:, -1]
        with lampe.patched(m, growth_from=W + 4, **SMALL):  # LaMPE for grown rows beyond 68 tokens
            cache = hfcompat.output_cache(m(x[:, :60], use_cache=True))
            m(x[:, 60:70], **hfcompat.cache_kwargs(m, cache))  # crosses 68: planned at 69
            cache.crop(-4)  # the candidates from 67 on are rejected (70 -> 66 tokens)
            got = m(x[:, 66:67], **hfcompat.cache_kwargs(m, cache)).logits[:, -1]
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


# ---------------------------------------------------------------- item 3: training


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_gradients_flow_and_equal_the_torch_backend(family):
    m = tiny(family)
    m.train()
    x = ids(100)
    grads = {}
    for backend in ("auto", "torch"):
        m.zero_grad(set_to_none=True)
        with lampe.patched(m, backend=backend, **SMALL):
            m(x, labels=x).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    names = {n for n, _ in m.named_parameters()}
    assert set(grads["auto"]) == names  # q_proj, k_proj, v_proj ... all receive a gradient
    for n in names:
        g, r = grads["auto"][n], grads["torch"][n]
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-7, n


# ---------------------------------------------------------------- item 4: sliding windows, copies, saving


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_use_sliding_window_can_be_disabled(family):
    m = tiny(family, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    x = ids(100)
    before = m.config.to_dict()
    with pytest.raises(ValueError, match="disable_sliding_window"):
        lampe.patch(m)
    with torch.no_grad():
        h = lampe.patch(m, disable_sliding_window=True, **SMALL)
        long = m.generate(x, max_new_tokens=4, do_sample=False)
        short = m(x[:, :40]).logits
        h.remove()
        # in-window, with the window turned off the model equals itself without a window: the
        # tiny window of 16 makes the unpatched model differ, so compare to a windowless copy
        plain = tiny(family)
        plain.load_state_dict(m.state_dict())
        assert torch.equal(short, plain(x[:, :40]).logits)
    assert long.shape == (1, 104)
    assert m.config.to_dict() == before


def test_deepcopy_pickle_and_torch_save_of_a_patched_model(tmp_path):
    import copy
    import io
    import pickle
    m = tiny("llama")
    x = ids(100)
    h = lampe.patch(m, **SMALL)
    with torch.no_grad():
        ref = m(x).logits
    c = copy.deepcopy(m)
    assert c._lampe_handle is not h and lampe.is_patched(c)
    c._lampe_handle.remove()
    assert lampe.is_patched(m) and not lampe.is_patched(c)
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)          # the original is still patched
        assert not torch.equal(c(x).logits, ref)      # the copy is the unpatched model now
    for blob in (pickle.dumps(m), None):
        if blob is None:
            buf = io.BytesIO()
            torch.save(m, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
        else:
            loaded = pickle.loads(blob)
        assert lampe.is_patched(loaded) and loaded._lampe_handle is not h
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)
        loaded._lampe_handle.remove()
        assert lampe.is_patched(m)
    h.remove()


def test_save_pretrained_writes_the_true_config(tmp_path):
    import json
    m = tiny("mistral", sliding_window=32)
    x = ids(50)
    with torch.no_grad():
        ref = m(x).logits
    with lampe.patched(m, disable_sliding_window=True, **SMALL):
        m.save_pretrained(tmp_path)
        text = (tmp_path / "config.json").read_text()
        assert m.config.sliding_window is None  # turned off while patched
    cfg = json.loads(text)
    assert cfg["sliding_window"] == 32
    assert "lampe" not in text
    loaded = transformers.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert not lampe.is_patched(loaded) and loaded.config.sliding_window == 32
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


# ---------------------------------------------------------------- item 7: what patch() will do


def test_describe_previews_what_patch_chooses(tmp_path):
    m = tiny("llama")
    text = lampe.hf.describe(m.config, **SMALL)
    h = lampe.patch(m, **SMALL)
    try:
        c = h.config
        assert f"active_from = {c.active_from} tokens" in text and f"window H = {c.window}, sink T = {c.sink}" in text
        assert f"U({W + 1})={c.mapping_length_for(W + 1)}" in text
        assert "all 2 use LaMPE" in text and "2 LaMPE layers" in repr(h)
    finally:
        h.remove()
    llama31 = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0})
    llama31.save_pretrained(tmp_path)
    for src in (llama31, tmp_path, tmp_path / "config.json", llama31.to_dict()):
        text = lampe.hf.describe(src)
        assert "W = 131072" in text and "longer than active_from = 163840" in text and "growth_from = 196608" in text and "preset 'llama3.1'" in text
    assert "not supported" in lampe.hf.describe({"model_type": "llama4"})
    assert "disable_sliding_window=True (not given)" in lampe.hf.describe(
        transformers.MistralConfig(sliding_window=4096, num_hidden_layers=2))


# ---------------------------------------------------------------- item 9: torch.compile


@pytest.mark.parametrize("n", [40, 100])  # below and beyond active_from
def test_compile_fullgraph_without_graph_breaks(n):
    m = tiny("llama")
    x = ids(n)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        eager = m(x).logits
        explained = torch._dynamo.explain(m)(x)
        reasons = [str(r.reason)[:200] for r in explained.break_reasons]
        torch._dynamo.reset()
        # 4.57 materialises the causal mask while tracing; lampe's mask function skips it there as
        # eager mode does, so both versions trace without a graph break
        assert explained.graph_break_count == 0, reasons
        compiled = torch.compile(m, fullgraph=True)(x).logits  # inductor, the default backend
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("n", [40, 100])  # below and beyond active_from
def test_compile_with_a_padding_mask_fullgraph(side, n):
    m = tiny("llama")
    x = ids(n, batch=2)
    am = torch.ones_like(x)
    if side == "left":
        am[1, :10] = 0
    else:
        am[1, -10:] = 0
    with torch.no_grad(), lampe.patched(m, **SMALL):
        eager = m(x, attention_mask=am).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(x, attention_mask=am)
        reasons = [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_break_count == 0, reasons  # it was one per LaMPE layer (three frames each)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)(x, attention_mask=am).logits  # inductor
    valid = am.bool()
    assert torch.isfinite(compiled).all()
    assert (compiled - eager)[valid].abs().max() <= 1e-5 * eager.abs().max()


def _compiled_forward_generate(m, x, **kw):
    """generate() with the model's forward compiled, as transformers documents it."""
    forward = m.forward
    m.forward = torch.compile(forward, fullgraph=True)
    torch._dynamo.reset()
    try:
        return m.generate(x, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)
    finally:
        m.forward = forward


@pytest.mark.parametrize("prompt,cache", [(58, "dynamic"), (80, "static")])  # rows growing past active_from / beyond it
def test_compiled_generate_with_padding_equals_eager(prompt, cache):
    m = tiny("llama")
    x = torch.cat([ids(prompt, seed=3), ids(prompt, seed=4)])
    am = torch.ones_like(x)
    am[0, :6] = 0  # left padding, as generate() wants it
    kw = dict(attention_mask=am, max_new_tokens=20, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad(), lampe.patched(m, growth_from=W + 2, **SMALL):
        want = m.generate(x, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)
        got = _compiled_forward_generate(m, x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(torch.stack(got.logits, 1), torch.stack(want.logits, 1), atol=1e-4)
    # the plans the compiled steps made are the cache's, as eager decoding made them
    plans = [hfcompat.output_cache(o)._lampe_state.plans.tolist() for o in (got, want)]
    assert plans[0] == plans[1] and min(plans[0]) > W, plans


def test_patched_layer_op_passes_opcheck_and_equals_the_eager_layer():
    """lampe::patched_layer as compiled code calls it: its schema and fake implementation pass
    torch.library.opcheck (shapes, no aliasing, no input mutated), and it computes exactly what the
    eager attention function computes, with the plans as its second output."""
    m = tiny("llama")
    B, T = 2, 100
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, T, 16, generator=g) for h in (4, 2, 2))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :10] = False  # left padding
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    pos = (torch.cumsum(valid, 1) - 1).clamp(min=0)
    cos, sin = m.model.rotary_emb(q, pos)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        attn = m.model.layers[0].self_attn
        args = (q, k, v, mask, cos, sin, pos, pos.clone(), torch.zeros(B, dtype=torch.int64), 0, None,
                h._specs[attn].op_layer, 0.0, 0.25, None, None)
        out, plans = torch.ops.lampe.patched_layer(*args)
        attn._lampe_call = hfpatch._Call(None, pos, None, cos, sin)
        want, _ = hfpatch._lampe_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=0.25, position_ids=pos)
        torch.library.opcheck(torch.ops.lampe.patched_layer.default, args)
    assert out.shape == (B, T, 4, 16) and torch.isfinite(out).all()
    assert torch.equal(out, want)
    assert plans.tolist() == [100, 90]  # each row planned from its own valid length


def test_a_compiled_copy_runs_its_own_layers():
    import copy
    m = tiny("llama")
    x = ids(100, batch=2)
    am = torch.ones_like(x)
    am[0, :7] = 0
    h = lampe.patch(m, **SMALL)
    with torch.no_grad():
        ref = m(x, attention_mask=am).logits
    c = copy.deepcopy(m)
    h.remove()  # the copy's compiled graph must reach the copy's layers, not these
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(c, backend="eager", fullgraph=True)(x, attention_mask=am).logits
    c._lampe_handle.remove()
    assert torch.allclose(got[am.bool()], ref[am.bool()], atol=1e-5)


def test_compiled_training_with_a_padding_mask_has_the_eager_gradients():
    m = tiny("llama")
    x = ids(100, batch=2)
    am = torch.ones_like(x)
    am[1, :10] = 0
    params = [m.model.layers[0].self_attn.q_proj.weight, m.model.layers[1].self_attn.v_proj.weight]
    with lampe.patched(m, **SMALL):
        loss = m(x, attention_mask=am, labels=x).loss
        want = torch.autograd.grad(loss, params)
        torch._dynamo.reset()
        loss_c = torch.compile(m, backend="aot_eager")(x, attention_mask=am, labels=x).loss
        got = torch.autograd.grad(loss_c, params)
    assert torch.allclose(loss_c, loss, atol=1e-5)
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and torch.allclose(g, w, atol=1e-5 * w.abs().max().item())


def test_packed_sequences_beyond_active_from_are_refused():
    m = tiny("llama")
    x = ids(100)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        # documents of 50 and 50 tokens: without a cache transformers builds a block-diagonal mask
        # and every document stays below active_from: the model's own attention, bit for bit
        halves = torch.cat([torch.arange(50), torch.arange(50)])[None]
        short = m(x, position_ids=halves, use_cache=False).logits
        with pytest.raises(NotImplementedError, match="packed"):
            m(x, position_ids=torch.cat([torch.arange(30), torch.arange(70)])[None], use_cache=False)
        with pytest.raises(NotImplementedError, match="packed"):  # with a cache: one causal run, restarting
            m(x, position_ids=halves, use_cache=True)
    with torch.no_grad():
        want = m(x, position_ids=halves, use_cache=False).logits
    assert torch.equal(short, want)
