"""Decode steps of a patched model under torch.compile with a padding mask.

A left-padded batch of two rows (the second shorter, padded as generate() pads it) whose prompts
run LaMPE (``--multiple`` x W tokens), then greedy decode steps on a dynamic cache with the mask
growing each step, as generate() runs them. Four contenders, interleaved in one process: the
unpatched model (torch SDPA) eager and with its forward compiled (inductor), the patched model
eager and compiled (each LaMPE layer one lampe::patched_layer op, lampe/hf/compiled.py). The
prompt pass is untimed (eager). Also prints the graph breaks torch._dynamo.explain counts for one
padded decode step of each model.

    python bench/compiled_decode.py [--quick] [--window 256] [--multiple 2] [--steps 16]
                                    [--json bench/results/compiled_decode.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import pin, time_interleaved, write_json  # noqa: E402

import lampe  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from lampe.hf import compat  # noqa: E402


def build(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.window, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


class Decode:
    """Prefill (setup, untimed, eager) then ``steps`` greedy steps through ``forward`` (timed)."""

    def __init__(self, model, forward, ids, mask, steps):
        self.model, self.forward, self.ids, self.mask, self.steps = model, forward, ids, mask, steps

    def setup(self):
        with torch.no_grad():
            out = self.model(self.ids, attention_mask=self.mask, use_cache=True)
        self.cache, self.nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)

    def run(self):
        mask, cache, nxt = self.mask, self.cache, self.nxt
        with torch.no_grad():
            for _ in range(self.steps):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                out = self.forward(nxt, attention_mask=mask, **compat.cache_kwargs(self.model, cache), use_cache=True)
                cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
        return nxt


def breaks(model, d):
    d.setup()
    mask = torch.cat([d.mask, d.mask.new_ones(d.mask.shape[0], 1)], dim=1)
    torch._dynamo.reset()
    with torch.no_grad():
        e = torch._dynamo.explain(model)(d.nxt, attention_mask=mask, **compat.cache_kwargs(model, d.cache),
                                         use_cache=True)
    torch._dynamo.reset()
    return e.graph_break_count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps, a smoke run")
    ap.add_argument("--window", type=int, default=256, help="pretrained window W of the random-weight Llama")
    ap.add_argument("--multiple", type=int, default=2, help="prompt length in multiples of W")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per contender")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "compiled_decode.json"),
                    help="where the results go (empty string: nowhere)")
    args = ap.parse_args(argv)
    if args.quick:
        args.window, args.layers, args.hidden, args.heads, args.kv_heads, args.steps, args.reps = 64, 2, 128, 4, 2, 4, 2
    pin(args.threads)
    unpatched, patched = build(args), build(args)
    lampe.patch(patched)
    L = args.multiple * args.window
    ids = torch.randint(0, 4096, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :L // 8] = 0
    contenders = []
    for name, model in (("unpatched", unpatched), ("patched", patched)):
        compiled = torch.compile(model.forward)
        for mode, fwd in (("eager", model.forward), ("compiled", compiled)):
            d = Decode(model, fwd, ids, mask, args.steps)
            contenders.append((f"{name} {mode}", d.run, d.setup))
    # warm-up outside the timing: each compiled forward compiles its prefill-free decode graphs
    for _, fn, setup in contenders:
        setup()
        fn()
    res = time_interleaved(contenders, warmup=0, reps=args.reps)
    per_step = {name: res[name]["median_s"] / args.steps * 1e3 for name, _, _ in contenders}
    clean = all(res[name]["clean"] for name, _, _ in contenders)
    counts = {name: breaks(model, Decode(model, model.forward, ids, mask, 1))
              for name, model in (("unpatched", unpatched), ("patched", patched))}
    print(f"random-weight Llama: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} "
          f"W={args.window}; batch 2 left-padded, prompt {L} tokens (x{args.multiple} W); {args.steps} greedy steps; "
          f"threads={args.threads}; lampe kernels: {lampe.info.current_isa()}; torch {torch.__version__}")
    for name, ms in per_step.items():
        print(f"  {name:<20} {ms:8.2f} ms/step")
    ratio = per_step["patched compiled"] / per_step["unpatched compiled"]
    print(f"  patched compiled / unpatched compiled = {ratio:.2f}x; "
          f"patched compiled / patched eager = {per_step['patched compiled'] / per_step['patched eager']:.2f}x"
          f"{'' if clean else '  [noisy: other processes took CPU time]'}")
    print(f"  graph breaks in one padded decode step: unpatched {counts['unpatched']}, patched {counts['patched']}")
    if args.json:
        write_json(args.json, dict(config=vars(args), lampe=lampe.show_config(print_it=False),
                                   ms_per_step=per_step, graph_breaks=counts, clean=clean))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
