"""The command line: plan, config, demo and eval (small settings), and its polish: --version, the
program name, help and defaults of every option, errors that name flags, a closed pipe, models
given as paths, and the --model-config preview of what lampe.patch chooses."""
import json
import os
import subprocess
import sys

import pytest

import lampe
from lampe import __main__ as cli

ROOT_OF_LAMPE = os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__)))


def env():
    return dict(os.environ, PYTHONPATH=ROOT_OF_LAMPE)


def run(args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "lampe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env())


def test_plan_command(tmp_path):
    r = run(["plan", "--length", "32768", "--preset", "llama3"], tmp_path)
    assert r.returncode == 0, r.stderr
    # the values of docs/spec.md §5 (InfiniteBench 32K row) appear in the summary
    assert "U = 4501" in r.stdout and "R = 203" in r.stdout and "b1 = 441, b2 = 27650" in r.stdout
    assert "decode step 1" in r.stdout


def test_config_command(tmp_path):
    r = run(["config"], tmp_path)
    assert r.returncode == 0 and "isa_chosen" in r.stdout


def test_version_and_program_name(tmp_path):
    r = run(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"lampe {lampe.__version__}"
    r = run(["--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: lampe ")
    r = run(["plan", "--help"], tmp_path)
    assert r.stdout.startswith("usage: lampe plan ")


@pytest.mark.parametrize("command", ["plan", "eval", "demo"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    text = " ".join(sub.format_help().split())  # unwrapped
    for action in sub._actions:
        if "-h" in action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings} has no help text"
        if action.default not in (None, False):
            assert "default" in sub._get_formatter()._get_help_string(action), action.option_strings
    if command == "eval":
        assert "(default: 1,2,4,8)" in text and "(default: passkey,perplexity)" in text
    if command == "plan":
        assert "default: 512" in text and "default: 200" in text


@pytest.mark.parametrize("args, flag", [
    (["plan", "--length", "9000", "--preset", "auto"], "--pretrained-window"),
    (["plan", "--length", "9000", "--preset", "llama3", "--mapping-length", "100"], "--mapping-length and --preset"),
    (["plan", "--length", "20", "--window", "4", "--sink", "16", "--mapping-length", "10"], "--sink"),
    (["plan", "--length", "0"], "--length"),
    (["plan"], "--length"),
    (["plan", "--model-config", "/no/such/config.json"], "--model-config"),
    (["eval", "--model", "/no/such/model.gguf"], "--model"),
    (["eval", "--tasks", "passkey,typo"], "--tasks"),
    (["eval", "--methods", "lampe:windw=3"], "--methods"),
    (["eval", "--depths", "0.5,x"], "--depths"),
])
def test_errors_name_flags(tmp_path, args, flag):
    r = run(args, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert flag in r.stderr and "Traceback" not in r.stderr
    assert "pretrained_window" not in r.stderr and "mapping_length" not in r.stderr


def test_closed_pipe_is_quiet(tmp_path):
    # the reader is gone before lampe writes a byte (as with `lampe plan ... | head -0`)
    p = subprocess.Popen([sys.executable, "-m", "lampe", "plan", "--length", "32768", "--preset", "llama3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env())
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert p.returncode == 141


def _llama_config_json(path, **changes):
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, vocab_size=259, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes", [{}, dict(model_type="mistral", max_position_embeddings=32768, sliding_window=None),
                                     dict(max_position_embeddings=8192)])
def test_plan_model_config_previews_what_patch_chooses(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    path = _llama_config_json(tmp_path / "config.json", **changes)
    r = run(["plan", "--model-config", str(path)], tmp_path)
    assert r.returncode == 0, r.stderr
    mc = transformers.AutoConfig.from_pretrained(str(tmp_path))
    with lampe.patched(transformers.AutoModelForCausalLM.from_config(mc)) as handle:
        chosen = handle.config
    W = mc.max_position_embeddings
    assert f"pretrained window W = {W} " in r.stdout
    assert f"window H = {chosen.window}, sink T = {chosen.sink}" in r.stdout
    assert f"longer than active_from = {chosen.active_from} tokens" in r.stdout
    assert f"exceeds growth_from = {chosen.growth_from};" in r.stdout
    for L in (2 * W, 4 * W, 8 * W):
        assert f"U({L})={chosen.mapping_length_for(L)}" in r.stdout
    # with --length the plan uses the model's defaults
    r = run(["plan", "--model-config", str(tmp_path), "--length", str(2 * W)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"mapping length U = {chosen.mapping_length_for(2 * W)} " in r.stdout


def test_plan_model_config_known_names(tmp_path):
    pytest.importorskip("transformers")
    r = run(["plan", "--model-config", "smollm2-135m"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pretrained window W = 8192" in r.stdout and "U(16384)=" in r.stdout


def _tiny_available():
    from lampe import models
    return (models.tiny_path() / "model.safetensors").is_file()


@pytest.mark.skipif(not _tiny_available(), reason="the tiny model's weights are not in lampe/assets")
def test_demo_and_eval_commands(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    r = run(["demo", "--samples", "1", "--out", str(tmp_path / "demo.png")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "original" in r.stdout and "lampe" in r.stdout and "accuracy" in r.stdout
    assert (tmp_path / "demo.png").stat().st_size > 1000
    r = run(["eval", "--tasks", "passkey", "--methods", "original,lampe", "--multiples", "1,2", "--depths", "0.5",
             "--samples", "1", "--out", str(tmp_path / "ev")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev" / "records.jsonl").is_file() and (tmp_path / "ev" / "results.md").is_file()
    assert "| lampe |" in r.stdout and (tmp_path / "ev" / "overview.png").is_file()


def test_eval_accepts_a_checkpoint_directory(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "my-llama")
    r = run(["eval", "--model", str(tmp_path / "my-llama"), "--tasks", "passkey,multikey", "--methods",
             "original,lampe:mapping_length=100", "--lengths", "256,600", "--depths", "0.5", "--samples", "1",
             "--out", str(tmp_path / "ev")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "multikey at 256 tokens: skipped" in r.stderr  # its prompt needs more than 256 tokens
    recs = [json.loads(x) for x in (tmp_path / "ev" / "records.jsonl").read_text().splitlines()]
    assert {r["model"] for r in recs} == {"my-llama"}
    assert sorted((r["task"], r["method"], r["length"]) for r in recs) == sorted(
        [("passkey", m, L) for m in ("original", "lampe:mapping_length=100") for L in (256, 600)]
        + [("multikey", m, 600) for m in ("original", "lampe:mapping_length=100")])


def test_eval_accepts_a_gguf_file(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from lampe import models
    gguf = models.model_cache_dir(models.MODELS["smollm2-135m"]["file"])
    if not gguf.is_file():
        pytest.skip(f"no GGUF file cached at {gguf} (run lampe.models.load('smollm2-135m') once)")
    model, tok = models.load(str(gguf))
    assert model.config.max_position_embeddings == 8192 and tok.eos_token_id is not None
    assert not getattr(model, "hf_quantizer", None)
