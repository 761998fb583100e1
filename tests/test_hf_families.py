"""lampe.patch on every supported family, as tiny random-weight models built from configs.

For each family: in-window bit-equality with the unpatched model (logits and generation),
beyond-window equality with a float64 layer-by-layer model whose global layers attend through
lampe.reference.attention (prompt and cached generation), static caches, right padding,
prompt-lookup decoding against greedy decoding, training gradients against the pure-torch
backend, and torch.compile with a padding mask (no graph break added, compiled equals eager)."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402
from lampe.hf import compat  # noqa: E402
from lampe.hf.families import FAMILIES  # noqa: E402

T = transformers
W = 64
SMALL = dict(window=16, sink=4, active_from=W)  # the mechanism at W; the defaults' policy: test_eval.py
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=W, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA_LAYERS = dict(num_hidden_layers=4, sliding_window=16, head_dim=16)

# family -> (config class, model class, extra config, rotary layout)
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GEMMA_LAYERS)),  # attention-logit soft-capping 50
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(GEMMA_LAYERS, layer_types=["sliding_attention", "full_attention"] * 2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25, partial_rotary_factor=0.25)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.3)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=None)),
}
assert set(SPECS) == set(FAMILIES)


def tiny(family, seed=0, dtype=torch.float32, **extra):
    cfg_name, model_name, spec = SPECS[family]
    kw = dict(COMMON)
    kw.update(spec)
    kw.update(extra)
    torch.manual_seed(seed)
    cfg = getattr(T, cfg_name)(**kw)
    # Gemma 2 soft-caps in eager attention only (5.x allows nothing else; 4.57's sdpa drops the cap)
    impl = "eager" if family == "gemma2" else "sdpa"
    cfg._attn_implementation = impl
    return getattr(T, model_name)(cfg).eval().to(dtype)


def supported_here(family):
    return compat.VERSION >= FAMILIES[family].min_version


PARAMS = [pytest.param(f, marks=pytest.mark.skipif(not supported_here(f), reason=f"{f} needs transformers >= "
                                                   f"{FAMILIES[f].min_version} (refusal tested below)"))
          for f in SPECS]


def ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, n), generator=g)


def gen(m, x, **kw):
    out = m.generate(x, do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


# ---------------------------------------------------------------- the float64 layer-by-layer model

_REF_NAME = "lampe_test_reference"


def _inv_freq(config, rotary_dim):
    rp = compat.rope_parameters(config, "full_attention")
    theta = rp.get("rope_theta") or config.rope_theta
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def reference_model(model, family, config: lampe.LampeConfig, prompt_length):
    """A float64 copy of the (unpatched) model whose global layers get un-rotated q and k and attend
    through lampe.reference.attention with a plan of ``prompt_length`` tokens; sliding-window
    layers keep the model's own eager attention. No cache, no padding: one forward over a whole
    sequence (rows past prompt_length are rows after the prompt)."""
    ref = copy.deepcopy(model)
    if lampe.is_patched(ref):
        ref._lampe_handle.remove()
    ref = ref.double()
    if hasattr(ref, "set_experts_implementation"):  # 5.x MoE: grouped_mm has no float64
        ref.set_experts_implementation("eager")
    layers = compat.attention_modules(ref)
    head_dim = getattr(layers[0], "head_dim", None) or layers[0].head_size
    factor = compat.partial_rotary_factor(ref.config)
    rd = int(head_dim * factor)
    inv_freq = _inv_freq(ref.config, rd).numpy()
    layout = "interleaved" if family == "cohere" else "half"
    local = {m for m in layers if compat.layer_type(ref, m) == "sliding_attention"}
    eager = compat.family_function(layers[0], "eager_attention_forward")

    def identity(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, dict(kwargs, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))

    def attention(module, q, k, v, mask, dropout=0.0, scaling=None, **kw):
        if module in local:
            return eager(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kw)
        softcap = getattr(module, "attn_logit_softcapping", None)
        out = lampe.reference.attention(q.numpy(), k.numpy(), v.numpy(), config, inv_freq,
                                        prompt_length=prompt_length, rotary_dim=rd, layout=layout, scale=scaling,
                                        softcap=softcap)
        return torch.from_numpy(out).transpose(1, 2).contiguous(), None

    compat.AttentionInterface.register(_REF_NAME, attention)
    compat.AttentionMaskInterface.register(_REF_NAME, compat.eager_mask)
    for m in layers:
        if m not in local:
            m.register_forward_pre_hook(identity, with_kwargs=True)
    ref.set_attn_implementation(_REF_NAME)
    return ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- tests per family


@pytest.mark.parametrize("family", PARAMS)
def test_in_window_bit_identical(family):
    m = tiny(family)
    x = ids(W)
    with torch.no_grad():
        ref = m(x).logits
        ref_gen = gen(m, x[:, :40], max_new_tokens=20)
        with lampe.patched(m, **SMALL):
            out = m(x).logits
            out_gen = gen(m, x[:, :40], max_new_tokens=20)
    assert torch.equal(out, ref)
    assert torch.equal(out_gen[0], ref_gen[0]) and torch.equal(out_gen[1], ref_gen[1])


@pytest.mark.parametrize("family", PARAMS)
def test_beyond_window_matches_float64_reference(family):
    m = tiny(family)
    x = ids(100)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        logits = m(x).logits
        seq, step_logits = gen(m, x, max_new_tokens=6)
        cfg = h.config
    ref = reference_model(m, family, cfg, prompt_length=100)
    with torch.no_grad():
        ref_logits = ref(seq).logits
    assert rel_err(logits[0], ref_logits[0, :100]) < 1e-4
    assert rel_err(step_logits[0], ref_logits[0, 99:105]) < 1e-4
    # greedy tokens are the reference's argmax
    assert torch.equal(seq[0, 100:], ref_logits[0, 99:105].argmax(-1))


@pytest.mark.parametrize("family", PARAMS)
def test_static_cache(family):
    m = tiny(family)
    with torch.no_grad():
        short = ids(20)
        ref = gen(m, short, max_new_tokens=10, cache_implementation="static")
        with lampe.patched(m, **SMALL):
            below = gen(m, short, max_new_tokens=10, cache_implementation="static")
            x = ids(80)
            dyn = gen(m, x, max_new_tokens=8)
            sta = gen(m, x, max_new_tokens=8, cache_implementation="static")
    assert torch.equal(below[0], ref[0]) and torch.equal(below[1], ref[1])
    assert torch.equal(sta[0], dyn[0]) and rel_err(sta[1], dyn[1]) < 1e-5


@pytest.mark.parametrize("family", PARAMS)
def test_right_padding(family):
    m = tiny(family)
    a, b = ids(100, seed=3), ids(85, seed=4)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 15, dtype=torch.long)], dim=1)])
    am = torch.ones_like(batch)
    am[1, 85:] = 0
    short, sam = batch[:, 70:], am[:, 70:].clone()  # 30 tokens, the second row right-padded
    with torch.no_grad():
        ref_short = m(short, attention_mask=sam).logits
        with lampe.patched(m, **SMALL):
            got_short = m(short, attention_mask=sam).logits
            both = m(batch, attention_mask=am).logits
            alone_b = m(b).logits
    assert torch.equal(got_short, ref_short)
    assert rel_err(both[1, :85], alone_b[0]) < 1e-5


@pytest.mark.parametrize("family", PARAMS)
def test_prompt_lookup_decoding_equals_greedy(family):
    m = tiny(family)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 97, (1, 16), generator=g).repeat(1, 6)[:, :80]
    with torch.no_grad(), lampe.patched(m, **SMALL):
        greedy = gen(m, x, max_new_tokens=10)
        lookup = gen(m, x, max_new_tokens=10, prompt_lookup_num_tokens=3)
    # (transformers 4.57's prompt lookup may emit one token more than asked, patched or not)
    n = min(greedy[0].shape[1], lookup[0].shape[1])
    assert torch.equal(lookup[0][:, :n], greedy[0][:, :n])
    assert rel_err(lookup[1][:, :n - 80], greedy[1][:, :n - 80]) < 1e-4


@pytest.mark.parametrize("family", PARAMS)
def test_training_gradients_equal_the_torch_backend(family):
    m = tiny(family)
    m.train()
    x = ids(90)
    grads = {}
    for backend in ("auto", "torch"):
        m.zero_grad(set_to_none=True)
        with lampe.patched(m, backend=backend, **SMALL):
            m(x, labels=x).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads["auto"]) == set(grads["torch"]) and grads["auto"]
    attn = [n for n in grads["auto"] if any(s in n for s in ("q_proj", "qkv", "query_key_value"))]
    assert attn, "no attention projection received a gradient"
    for n, r in grads["torch"].items():
        assert rel_err(grads["auto"][n], r) < 1e-4 or float(r.abs().max()) < 1e-9, n


# ---------------------------------------------------------------- family specifics


@pytest.mark.parametrize("family", PARAMS)
def test_compiled_with_a_padding_mask_equals_eager_and_adds_no_graph_break(family):
    m = tiny(family)
    x = ids(100, batch=2)
    am = torch.ones_like(x)
    am[1, :12] = 0
    with torch.no_grad():
        torch._dynamo.reset()
        own = torch._dynamo.explain(m)(x, attention_mask=am).graph_break_count  # MoE routing may break
        with lampe.patched(m, **SMALL):
            eager = m(x, attention_mask=am).logits
            torch._dynamo.reset()
            explained = torch._dynamo.explain(m)(x, attention_mask=am)
            torch._dynamo.reset()
            compiled = torch.compile(m, backend="eager")(x, attention_mask=am).logits
    assert explained.graph_break_count <= own, [str(r.reason)[:200] for r in explained.break_reasons]
    valid = am.bool()
    assert rel_err(compiled[valid], eager[valid]) < 1e-5


def test_gemma2_soft_capping_reaches_the_lampe_rows():
    # A cap of 0.5 bites on the tiny model's logits (50, the default, hardly does).
    m = tiny("gemma2", attn_logit_softcapping=0.5)
    with torch.no_grad():  # logits of order one, where the cap bites
        for mod in compat.attention_modules(m):
            mod.q_proj.weight.mul_(8)
            mod.k_proj.weight.mul_(8)
    x = ids(100)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        capped = m(x).logits
        cfg = h.config
    ref = reference_model(m, "gemma2", cfg, prompt_length=100)
    with torch.no_grad():
        want = ref(x).logits
        for mod in compat.attention_modules(ref):
            mod.attn_logit_softcapping = None
        uncapped = ref(x).logits
    assert rel_err(capped, want) < 1e-4
    assert rel_err(uncapped, want) > 1e-3  # the cap matters here


def test_local_layers_keep_their_own_attention():
    m = tiny("gemma3_text")
    h = lampe.patch(m, **SMALL)
    try:
        assert len(h.layers) == 2 and len(h.local_layers) == 2
        assert {mod.layer_idx for mod in h.local_layers} == {0, 2}
        assert "2 sliding-window layers left as they are" in repr(h)
        # the global layers rotate with the global base, not the local one
        glob = next(iter(h.layers.values())).inv_freq()
        assert torch.allclose(glob, _inv_freq(m.config, glob.shape[0] * 2))
    finally:
        h.remove()


def test_partial_rotary_factor_read_where_the_version_keeps_it():
    m = tiny("stablelm") if supported_here("stablelm") else tiny("gpt_neox")
    assert compat.partial_rotary_factor(m.config) == 0.25
    assert compat.partial_rotary_factor(tiny("phi3").config) == 1.0


@pytest.mark.skipif(compat.VERSION >= (5, 0), reason="transformers 5.x serves these families")
@pytest.mark.parametrize("family", ["qwen2_moe", "stablelm"])
def test_legacy_attention_classes_are_refused_with_the_reason(family):
    with pytest.raises(NotImplementedError, match="transformers >= 5"):
        lampe.patch(tiny(family))


def test_flash_attention_models_are_accepted_and_restored():
    m = tiny("llama")
    x = ids(100)
    with torch.no_grad(), lampe.patched(m, **SMALL):
        want = m(x).logits
    m.config._attn_implementation = "flash_attention_2"  # as loaded on a GPU (no flash kernel here)
    with torch.no_grad(), lampe.patched(m, **SMALL) as h:
        assert h.previous_impl == "flash_attention_2" and m.config._attn_implementation == "lampe"
        got = m(x).logits
    assert m.config._attn_implementation == "flash_attention_2"
    assert torch.equal(got, want)
