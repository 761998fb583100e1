"""Run under torchrun with 2 CPU ranks (gloo): a tensor-parallel patched model must give the
logits of the same model in one process. argv: checkpoint dir, output file, L."""
import sys

import torch
import torch.distributed as dist
import transformers

import lampe
from lampe.hf import compat

path, out_file, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo")
kw = {}
if compat.VERSION >= (5, 0):
    from transformers.distributed.configuration_utils import DistributedConfig
    kw["distributed_config"] = DistributedConfig(tp_plan="auto")
else:  # 4.57
    kw["tp_plan"] = "auto"
model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw).eval()
w = model.model.layers[0].self_attn.q_proj.weight
local = w.to_local() if hasattr(w, "to_local") else w
assert local.shape[0] == model.config.hidden_size // 2, f"q_proj is not sharded: {tuple(local.shape)}"
x = torch.arange(3, 3 + L).remainder(90)[None] + 3
with torch.no_grad(), lampe.patched(model, window=16, sink=4):
    logits = model(x).logits
    gen = model.generate(x, max_new_tokens=4, do_sample=False)
if dist.get_rank() == 0:
    torch.save({"logits": logits, "generated": gen}, out_file)
dist.barrier()
dist.destroy_process_group()
