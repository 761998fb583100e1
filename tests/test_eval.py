"""The evaluation harness on a tiny random model (no downloads): prompts, tasks, methods,
records with resume, tables, calibration."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402
from lampe.eval import calibrate, fit_sigmoid, markdown, run_grid, summarize  # noqa: E402
from lampe.eval import methods as M  # noqa: E402
from lampe.eval import tasks as T  # noqa: E402
from lampe.models import ByteTokenizer  # noqa: E402


def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval(), ByteTokenizer()


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. ") * 60


def test_passkey_prompt_exact_length_and_depth():
    tok = ByteTokenizer()
    for n, depth in [(128, 0.0), (300, 0.5), (1000, 1.0)]:
        ids = T.passkey_prompt(tok, n, depth, 12345)
        assert len(ids) == n and ids[0] == tok.bos_token_id
        text = tok.decode(ids)
        assert text.endswith(T.QUESTION) and text.count("12345") == 2
        frac = text.index("The pass key is 12345") / len(text)
        assert abs(frac - depth) < 0.25
    with pytest.raises(ValueError, match="too short"):
        T.passkey_prompt(tok, 20, 0.5, 12345)


def test_needle_prompt_uses_real_text():
    tok = ByteTokenizer()
    ids = T.needle_prompt(tok, tok.encode(TEXT), 400, 0.3, 54321, offset=17)
    text = tok.decode(ids)
    assert len(ids) == 400 and "magic number is 54321" in text and "truth universally" in text


def test_perplexity_matches_cross_entropy():
    m, tok = tiny()
    ids = tok.encode(TEXT)
    r = T.perplexity(m, tok, ids, 200, 50, offset=0)
    x = torch.tensor([ids[:200]])
    with torch.no_grad():
        logits = m(x).logits[0, :-1]
    want = torch.nn.functional.cross_entropy(logits[-50:], x[0, 1:][-50:]).item()
    assert abs(r["loss"] - want) < 1e-5 and abs(r["ppl"] - math.exp(want)) < 1e-3
    assert len(r["bucket_loss"]) == 8


def test_every_method_applies_and_restores():
    m, _ = tiny()
    x = torch.randint(3, 259, (1, 300))
    with torch.no_grad():
        base = m(x).logits
        for method in M.METHODS:
            with M.apply(m, method, 300):
                out = m(x).logits
            assert torch.isfinite(out).all()
            if method != "original":
                assert not torch.equal(out, base), method
            assert torch.equal(m(x).logits, base), f"{method} did not restore the model"
    with pytest.raises(ValueError, match="unknown method"):
        with M.apply(m, "magic", 300):
            pass


def test_grid_records_resume_and_table(tmp_path):
    m, tok = tiny()
    ids = tok.encode(TEXT)
    kw = dict(out_dir=str(tmp_path), tasks=["passkey", "perplexity"], lengths=[128, 256], depths=[0.5], samples=2,
              text_ids=ids)
    recs = run_grid(m, tok, methods=["original"], **kw)
    assert len(recs) == 2 * 2 + 2 * 1  # passkey: lengths x samples; perplexity: lengths x samples//2
    recs = run_grid(m, tok, methods=["original", "lampe"], **kw)  # resumes: only lampe cells are new
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(recs) == 12
    keys = [(r["task"], r["method"], r["length"], r["depth"], r["sample"]) for r in map(json.loads, lines)]
    assert len(set(keys)) == len(keys)
    s = summarize(recs)
    assert set(s) == {"passkey", "perplexity"} and set(s["passkey"]) == {"original", "lampe"}
    table = markdown(s, 128)
    assert "| lampe |" in table and "256 (2x)" in table
    # identical prompts for every method (the seed depends on the cell only)
    pk = [r for r in recs if r["task"] == "passkey"]
    by = {(r["length"], r["sample"]): set() for r in pk}
    for r in pk:
        by[(r["length"], r["sample"])].add(r["key"])
    assert all(len(v) == 1 for v in by.values())


def test_fit_sigmoid_recovers_a_known_curve():
    truth = lampe.MappingSigmoid(a=2e-3, b=-2.0, lmax=1000.0)
    Ls = [500, 1000, 1500, 2000, 3000]
    fit = fit_sigmoid(Ls, [truth(L) for L in Ls])
    assert all(abs(fit(L) - truth(L)) <= 0.06 * truth(L) + 2 for L in Ls)


def test_calibrate_returns_a_usable_preset():
    m, tok = tiny()
    ids = tok.encode(TEXT)
    cfg, report = calibrate(m, ids, [256, 512], tokenizer=tok, candidates=(0.1, 0.5), windows=1, last=32)
    assert isinstance(cfg.mapping_length, lampe.MappingSigmoid)
    assert [r["length"] for r in report] == [256, 512]
    assert all(r["best_mapping_length"] in (13, 64) for r in report)
    with torch.no_grad(), lampe.patched(m, cfg):
        assert torch.isfinite(m(torch.tensor([ids[:300]])).logits).all()
