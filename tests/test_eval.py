"""The evaluation harness on a tiny random model (no downloads): prompts, tasks (passkey, needle,
RULER-style), methods, records with resume, batching, time budget, tables, plots, calibration."""
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402
from lampe.eval import calibrate, fit_sigmoid, markdown, run_grid, summarize  # noqa: E402
from lampe.eval import methods as M  # noqa: E402
from lampe.eval import ruler as R  # noqa: E402
from lampe.eval import runner  # noqa: E402
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


def test_every_method_applies_and_restores(monkeypatch):
    m, _ = tiny()
    # a calibrated sigmoid recorded for this model's config, so lampe-calibrated applies too
    monkeypatch.setitem(M.CALIBRATED, "test", dict(match=dict(hidden_size=64, num_hidden_layers=2),
                                                   sigmoid=lampe.MappingSigmoid(a=1e-3, b=-1.0, lmax=90.0)))
    x = torch.randint(3, 259, (1, 300))
    with torch.no_grad():
        base = m(x).logits
        for method in M.METHODS + ("lampe:mapping_length=40:temperature=1.0",):
            with M.apply(m, method, 300) as info:
                out = m(x).logits
            assert torch.isfinite(out).all()
            assert info["backend"]
            if method != "original":
                assert not torch.equal(out, base), method
            assert torch.equal(m(x).logits, base), f"{method} did not restore the model"
    with pytest.raises(ValueError, match="unknown method"):
        with M.apply(m, "magic", 300):
            pass


def test_method_specs():
    m, _ = tiny()
    with M.apply(m, "lampe:mapping_length=40:temperature=1.0", 300) as info:
        assert info["config"]["mapping_length"] == 40 and info["config"]["temperature"] == 1.0
        assert info["backend"] == "lampe C kernel (cpu)"
    with M.apply(m, "original", 300) as info:
        assert "transformers" in info["backend"]
    for bad, msg in [("lampe:nonsense=3", "not a LampeConfig field"), ("lampe:window", "FIELD=VALUE"),
                     ("yarn:factor=2", "only 'lampe'"), ("lampe-magic", "unknown method")]:
        with pytest.raises(ValueError, match=msg):
            M.parse(bad)
    with pytest.raises(ValueError, match="no calibrated mapping length"):
        with M.apply(m, "lampe-calibrated", 300):
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


def test_fit_sigmoid_with_fixed_lmax():
    truth = lampe.MappingSigmoid(a=2e-3, b=-2.0, lmax=1000.0)
    Ls = [1000, 1500, 2000]
    fit = fit_sigmoid(Ls, [truth(L) for L in Ls], lmax=1000.0)
    assert fit.lmax == 1000.0 and abs(fit.a - 2e-3) < 1e-4 and abs(fit.b + 2.0) < 0.1
    with pytest.raises(ValueError, match="lmax"):
        fit_sigmoid(Ls, [truth(L) for L in Ls], lmax=100.0)


def test_calibrate_log_resumes_without_recomputing(tmp_path, monkeypatch):
    m, tok = tiny()
    ids = tok.encode(TEXT)
    log = str(tmp_path / "scan.jsonl")
    kw = dict(tokenizer=tok, candidates=(0.1, 0.5), windows=1, last=32, log=log)
    cfg, report = calibrate(m, ids, [256, 512], **kw)
    lines = (tmp_path / "scan.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("cpu_seconds" in json.loads(x) for x in lines)

    def boom(*a, **k):
        raise AssertionError("a logged scan point was computed again")
    monkeypatch.setattr(T, "perplexity", boom)
    cfg2, report2 = calibrate(m, ids, [256, 512], **kw)
    assert report2 == report and cfg2 == cfg


# ------------------------------------------------------------------------------------ tasks

def test_digit_scoring_uses_the_one_digit_scorer():
    tok = ByteTokenizer()
    case = T.passkey_case(tok, 300, 0.5, seed=3)
    key = case.expected[0]
    assert case.score(tok, tok.encode(f" {key}."))["correct"]
    assert case.score(tok, tok.encode(f" is {key}7"))["correct"]  # the first run of digits, extra digits ignored
    assert not case.score(tok, tok.encode(" 1" + key))["correct"]
    assert case.score(tok, tok.encode("no digits"))["answer"] == ""


@pytest.mark.parametrize("task", R.TASKS)
def test_ruler_prompts(task):
    tok = ByteTokenizer()
    for n in (700, 1500):
        c = R.case(task, tok, n, seed=11, preamble=True)
        text = tok.decode(c.ids)
        assert len(c.ids) == n and c.ids[0] == tok.bos_token_id
        assert all(e in text for e in c.expected) and c.max_new_tokens >= 8
        again = R.case(task, tok, n, seed=11, preamble=True)
        assert again.ids == c.ids and again.expected == c.expected
        assert R.case(task, tok, n, seed=12, preamble=True).expected != c.expected
    question = text[text.rindex("\n"):]
    if task == "multikey":
        assert len(c.expected) == 1 and text.count("special magic numbers for") == 4
        assert c.expected[0] not in question
    elif task in ("multivalue", "multiquery"):
        assert len(c.expected) == 4 and not any(e in question for e in c.expected)
    else:  # vartrack: the chain appears in order, each assignment after the one it copies
        first = text.index(f"VAR {c.expected[0]} = ")
        assert text[first:].split(".")[0].split("= ")[1].isdigit()
        pos = [text.index(f"VAR {v} = ") for v in c.expected]
        assert pos == sorted(pos)
        for a, b in zip(c.expected, c.expected[1:]):
            assert f"VAR {b} = VAR {a}." in text
    with pytest.raises(ValueError, match="too short"):
        R.case(task, tok, 100, seed=1)


def test_ruler_scoring_is_the_fraction_found():
    tok = ByteTokenizer()
    c = R.case("multivalue", tok, 800, seed=5)
    half = ", ".join(c.expected[:2])
    r = c.score(tok, tok.encode(" " + half + " and 42"))
    assert r["score"] == 0.5 and not r["correct"]
    r = c.score(tok, tok.encode(" " + ", ".join(reversed(c.expected))))
    assert r["score"] == 1.0 and r["correct"]


def test_ruler_on_real_text_haystack():
    tok = ByteTokenizer()
    hay = tok.encode(TEXT)
    c = R.case("multikey", tok, 1200, seed=3, haystack_ids=hay)
    assert "truth universally" in tok.decode(c.ids) and len(c.ids) == 1200


def test_batched_generation_matches_one_by_one():
    m, tok = tiny()
    cases = [T.passkey_case(tok, 300, d, seed=s) for s, d in [(1, 0.2), (2, 0.8), (3, 0.5)]]
    with lampe.patched(m):
        together = T.generate(m, tok, [c.ids for c in cases], 6)
        alone = [T.generate(m, tok, [c.ids], 6)[0] for c in cases]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    with pytest.raises(ValueError, match="one length"):
        T.generate(m, tok, [cases[0].ids, cases[0].ids[:-1]], 2)


def test_chunked_token_losses_match_full_logits():
    m, tok = tiny()
    ids = tok.encode(TEXT)[:333]
    got = T.token_losses(m, [ids, ids[::-1]], chunk=50)
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        logits = m(x).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    assert got.shape == (2, 332) and torch.allclose(got, want, atol=1e-5)


def test_grid_ruler_tasks_batch_budget_and_plots(tmp_path):
    m, tok = tiny()
    kw = dict(out_dir=str(tmp_path), tasks=list(R.TASKS) + ["passkey"], methods=["original", "lampe"],
              lengths=[768], depths=[0.5], samples=2, batch=2, model_name="tiny-random")
    assert run_grid(m, tok, time_budget=-1, **kw) == []  # out of time before the first batch
    recs = run_grid(m, tok, **kw)
    assert len(recs) == 2 * 5 * 2
    for r in recs:
        assert r["batch"] == 2 and r["device"] == "cpu" and 0.0 <= r["score"] <= 1.0 and r["tokens"] == 768
        assert r["backend"] == ("lampe C kernel (cpu)" if r["method"] == "lampe" else "transformers sdpa (cpu)")
    # the same prompts for both methods, different prompts for different tasks
    by = {}
    for r in recs:
        if r["task"] != "passkey":
            by.setdefault((r["task"], r["sample"]), set()).add(tuple(r["expected"]))
    assert all(len(v) == 1 for v in by.values())
    assert len({next(iter(v)) for (t, s), v in by.items() if s == 0}) == 4
    s = summarize(recs, counts=True)
    assert s["vartrack"]["lampe"][768][1] == 2
    table = markdown(s, 256)
    assert "### multiquery (accuracy)" in table and "(2)" in table
    pngs = runner.plots(recs, str(tmp_path), 256)
    assert os.path.join(str(tmp_path), "overview.png") in pngs
    assert all(os.path.getsize(p) > 1000 for p in pngs)


def test_cells_order_and_counts():
    c = runner.cells(["passkey", "multikey", "perplexity"], ["a", "b"], [512, 256], [0.1, 0.9], 3, windows=2)
    assert [x[2] for x in c] == sorted(x[2] for x in c)  # short lengths first
    assert sum(x[0] == "passkey" for x in c) == sum(x[0] == "multikey" for x in c) == 2 * 2 * 6
    assert sum(x[0] == "perplexity" for x in c) == 2 * 2 * 2
    with pytest.raises(ValueError, match="unknown task"):
        runner.cells(["bogus"], ["a"], [1], [0.5], 1)


# ------------------------------------------------------------------------------- do no harm

def _trained_tiny():
    from lampe import models
    if not (models.tiny_path() / "model.safetensors").is_file():
        pytest.skip("the tiny model's weights are not in lampe/assets")
    return models.load("tiny")


def test_do_no_harm_at_the_window_on_the_tiny_model():
    """Passkey prompts of exactly W tokens: prompt and answer cross the window while generating.
    lampe.patch's defaults must answer every prompt as the unpatched model does (docs/results.md,
    "Do no harm"); the former default (LaMPE from W) did not."""
    from lampe.hf import pretrained_window
    m, tok = _trained_tiny()
    W = pretrained_window(m.config)
    cases = [T.passkey_case(tok, W, d, runner.seed("passkey", W, d, s)) for d in (0.1, 0.3, 0.5, 0.7, 0.9)
             for s in range(4)]
    original = T.run_cases(m, tok, cases)
    with lampe.patched(m) as h:
        assert h.config.active_from > W + 8  # the 8 answer tokens stay below the switch-over
        patched = T.run_cases(m, tok, cases)
    assert [r["answer"] for r in patched] == [r["answer"] for r in original]
    accuracy = sum(r["correct"] for r in original) / len(cases)
    assert accuracy >= 0.75  # the model does retrieve at 1x: the comparison means something
    with lampe.patched(m, active_from=W, growth_from=None):  # the former default: planned mid-answer at W + 1
        before = T.run_cases(m, tok, cases)
    assert [r["answer"] for r in before] != [r["answer"] for r in original]


def test_switch_over_points_of_the_defaults():
    """lampe.patch's defaults: LaMPE for prompts longer than 1.25 W; a sequence from a shorter
    prompt keeps the model's own attention while generating until it is longer than 1.5 W."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    W = 64
    x = torch.randint(3, 259, (1, 90), generator=torch.Generator().manual_seed(1))

    def step_logits(prompt_len, new):
        out = m.generate(x[:, :prompt_len], max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.cat(out.logits)  # logits[i]: the forward over prompt_len + i tokens

    with torch.no_grad():
        ref_seq, ref = step_logits(60, 90)
        ref81 = m(x[:, :81]).logits
        ref80 = m(x[:, :80]).logits
        with lampe.patched(m) as h:
            assert (h.config.active_from, h.config.growth_from) == (W + W // 4, W + W // 2)
            seq, got = step_logits(60, 90)
            assert torch.equal(m(x[:, :80]).logits, ref80)          # a prompt of 1.25 W: the model's own
            assert not torch.allclose(m(x[:, :81]).logits, ref81)    # one more token: LaMPE
    n = W + W // 2 - 60 + 1  # steps whose forward covers at most 1.5 W tokens
    assert torch.equal(got[:n], ref[:n]) and torch.equal(seq[:, :60 + n], ref_seq[:, :60 + n])
    assert not torch.allclose(got[n], ref[n])  # the step over 1.5 W + 1 tokens runs LaMPE


def test_fit_sigmoid_never_decreases():
    fit = fit_sigmoid([12288, 16384, 24576], [7000, 3000, 2500], lmax=7500.0)
    assert fit.a == 0.0 and fit(12288) == fit(24576)
    assert min(7000, 3000, 2500) <= fit(16384) <= 7000


def test_growth_decodes_what_one_forward_pass_predicts():
    m, tok = tiny()
    ids = tok.encode(TEXT)
    r = T.growth(m, ids, 150, 100, [0, 33])
    full = T.token_losses(m, [T.text_window(ids, 151, o) for o in (0, 33)])  # predictions of tokens 1..150
    for got, want in zip(r, full):
        assert got["prompt"] == 100 and len(got["quarter_loss"]) == 4
        assert abs(got["loss"] - float(want[99:150].mean())) < 1e-4  # tokens 100..150, predicted from 99..149
    with pytest.raises(ValueError, match="prompt"):
        T.growth(m, ids, 100, 100, [0])
    recs = run_grid(m, tok, out_dir=str(__import__("tempfile").mkdtemp()), tasks=["growth"], methods=["original"],
                    lengths=[160], windows=2, text_ids=ids, growth_prompt=128)
    assert len(recs) == 2 and all(x["prompt"] == 128 and x["task"] == "growth" for x in recs)
    assert "### growth (perplexity)" in markdown(summarize(recs), 128)


def test_smollm2_calibration_is_recorded():
    """The SmolLM2 scan (docs/results.md, "Calibration") found U = 0.9 W = 7373 best at 12K, 16K
    and 24K: lampe-calibrated must apply exactly that to a SmolLM2 config, and to no other."""
    from lampe.__main__ import model_config
    found = M.calibrated_for(model_config("smollm2-135m"))
    assert found is not None and found[0] == "smollm2"
    cfg = lampe.LampeConfig(mapping_length=found[1])
    assert [cfg.mapping_length_for(L) for L in (12288, 16384, 24576)] == [7373] * 3
    assert M.calibrated_for(model_config("tiny")) is None
