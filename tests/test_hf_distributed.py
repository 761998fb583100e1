"""lampe.patch on models spread over devices and processes (CPU stand-ins): tensor parallelism
over 2 gloo ranks under torchrun, and accelerate's offload with "disk" entries."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lampe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
L = 100  # beyond the tiny models' window of 64


def save_tiny(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(path)
    return m


def ids():
    return torch.arange(3, 3 + L).remainder(90)[None] + 3


def test_tensor_parallel_two_gloo_ranks_equal_one_process(tmp_path):
    pytest.importorskip("torch.distributed.run")
    m = save_tiny(tmp_path / "ckpt")
    with torch.no_grad(), lampe.patched(m, window=16, sink=4):
        want = m(ids()).logits
        want_gen = m.generate(ids(), max_new_tokens=4, do_sample=False)
    out = tmp_path / "tp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(lampe.__file__)), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", os.path.join(HERE, "hf_dist", "tp_worker.py"), str(tmp_path / "ckpt"), str(out),
                           str(L)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert (got["logits"] - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got["generated"], want_gen)


def test_accelerate_offload_with_disk_entries(tmp_path):
    pytest.importorskip("accelerate")
    m = save_tiny(tmp_path / "ckpt")
    with torch.no_grad(), lampe.patched(m, window=16, sink=4):
        want = m(ids()).logits
        want_gen = m.generate(ids(), max_new_tokens=4, do_sample=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    off = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                            offload_folder=str(tmp_path / "offload"),
                                                            attn_implementation="sdpa").eval()
    with torch.no_grad(), lampe.patched(off, window=16, sink=4):
        got = off(ids()).logits
        got_gen = off.generate(ids(), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert torch.equal(got_gen, want_gen)
