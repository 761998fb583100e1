"""The command line: plan, config, demo and eval (small settings)."""
import os
import subprocess
import sys

import pytest

import lampe

ROOT_OF_LAMPE = os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__)))


def run(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT_OF_LAMPE)
    return subprocess.run([sys.executable, "-m", "lampe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def test_plan_command(tmp_path):
    r = run(["plan", "--length", "32768", "--preset", "llama3"], tmp_path)
    assert r.returncode == 0, r.stderr
    # the values of docs/spec.md §5 (InfiniteBench 32K row) appear in the summary
    assert "U = 4501" in r.stdout and "R = 203" in r.stdout and "b1 = 441, b2 = 27650" in r.stdout
    assert "decode step 1" in r.stdout
    bad = run(["plan", "--length", "20", "--window", "4", "--sink", "16", "--mapping-length", "10"], tmp_path)
    assert bad.returncode == 2 and "sink" in bad.stderr


def test_config_command(tmp_path):
    r = run(["config"], tmp_path)
    assert r.returncode == 0 and "isa_chosen" in r.stdout


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
    r = run(["eval", "--tasks", "passkey", "--methods", "original,lampe", "--multiples", "1,2", "--depths", "0.5",
             "--samples", "1", "--out", str(tmp_path / "ev")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev" / "records.jsonl").is_file() and (tmp_path / "ev" / "results.md").is_file()
    assert "| lampe |" in r.stdout
