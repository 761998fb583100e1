"""Command line: ``python -m lampe plan ...`` and ``python -m lampe config``."""
from __future__ import annotations

import argparse
import sys


def _fmt_kpos(r):
    k = r.kpos
    if len(k) == 0:
        return "[]"
    if not r.mapped:
        return "k=j"
    return f"k=m[j-{r.shift}]: {k[0]}..{k[-1]}" if r.shift else f"k=m[j]: {k[0]}..{k[-1]}"


def cmd_plan(args) -> int:
    from .config import LampeConfig
    from .positions import plan

    u = args.mapping_length if args.mapping_length is not None else (args.preset or 1536)
    cfg = LampeConfig(window=args.window, sink=args.sink, mapping_length=u,
                      pretrained_window=args.pretrained_window)
    p = plan(args.length, cfg)
    print(f"LaMPE plan for a prompt of L = {p.length} tokens")
    print(f"  window H = {p.window}, sink T = {p.sink} -> extended sink R = {p.sink_size}")
    rule = f"preset {cfg.mapping_length!r}" if isinstance(cfg.mapping_length, str) else "fixed"
    print(f"  mapping length U = {p.mapping_length} ({rule}); m[H] = {p.mapped_ids[min(p.window, p.length - 1)]}, "
          f"m[L-1] = {p.mapped_ids[-1]}")
    print(f"  offsets b1 = {p.bias_map}, b2 = {p.bias_sink}; fallback (L < 2H) = {p.fallback}")
    L = p.length
    rows = sorted({0, min(p.window, L - 1), L // 2, max(0, L - p.sink_size), L - 1, L, L + args.decode_steps - 1})
    print(f"\n{'query':>8}  {'region':<6} {'keys':>17} {'qpos':>8}  {'rel (qpos-kpos)':>17}  kpos rule")
    for i in rows:
        tag = "" if i < L else f"  (decode step {i - L + 1})"
        for r in p.regions(i):
            rel = r.qpos - r.kpos
            print(f"{i:>8}  {r.name:<6} {f'{r.key_lo}..{r.key_hi}':>17} {r.qpos:>8}  "
                  f"{f'{rel.min()}..{rel.max()}':>17}  {_fmt_kpos(r)}{tag}")
    return 0


def cmd_config(args) -> int:
    from .info import show_config
    show_config()
    return 0


def _load_model(name):
    from . import models
    return models.load(name)


def _multiples(s):
    return [float(x) for x in str(s).split(",") if x]


def cmd_eval(args) -> int:
    import json
    import os

    from .eval import texts as data
    from .eval import markdown, plots, run_grid, summarize
    from .eval import tasks as T
    from .hf import pretrained_window

    model, tok = _load_model(args.model)
    W = pretrained_window(model.config)
    if args.quick:
        args.multiples, args.samples, args.depths = "1,2,4", 2, "0.5"
        args.methods = args.methods or "original,lampe"
    lengths = [int(m * W) for m in _multiples(args.multiples)]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    methods = (args.methods or "original,linear,dynamic,yarn,selfextend,rerope,lampe,lampe-paper").split(",")
    tasks = args.tasks.split(",")
    text_ids = haystack = None
    if "perplexity" in tasks or "needle" in tasks:
        need = max(lengths) * 3 + 1
        if "perplexity" in tasks:
            text = data.text_file(args.text) if args.text else data.book("persuasion")
            text_ids = T.tokenize_text(tok, text, max_tokens=need)
        if "needle" in tasks:
            haystack = T.tokenize_text(tok, data.austen(), max_tokens=need)
    out = args.out or os.path.join("eval-results", args.model)
    recs = run_grid(model, tok, out_dir=out, tasks=tasks, methods=methods, lengths=lengths,
                    depths=[float(d) for d in args.depths.split(",")], samples=args.samples, text_ids=text_ids,
                    haystack_ids=haystack, preamble=args.model != "tiny", resume=not args.no_resume,
                    model_name=args.model)
    table = markdown(summarize(recs), W)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(f"# {args.model} (pretrained window {W})\n\n{table}\n")
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({t: {m: {str(L): v for L, v in d.items()} for m, d in by.items()}
                   for t, by in summarize(recs).items()}, fh, indent=1)
    pngs = plots(recs, out, W)
    print(table)
    print(f"records: {os.path.join(out, 'records.jsonl')}; plots: {', '.join(pngs) or 'none (matplotlib missing)'}")
    return 0


def cmd_demo(args) -> int:
    import math
    import os
    import time

    from .eval import methods as M
    from .eval import tasks as T
    from .hf import pretrained_window

    t0 = time.time()
    model, tok = _load_model(args.model)
    W = pretrained_window(model.config)
    # "1x": prompt plus the 8-token answer fit in the window, so the original model is in its
    # element there; the other lengths are prompt lengths.
    lengths = [args.length] if args.length else [W - 8, 2 * W, 4 * W, 8 * W]
    depths = [0.2, 0.5, 0.8]
    print(f"passkey retrieval with {args.model} (pretrained window {W} tokens); {args.samples} sample(s) x "
          f"{len(depths)} depths per length")
    results = {}
    for method in ("original", "lampe"):
        for L in lengths:
            ok = 0
            answers = []
            with M.apply(model, method, L):
                for s in range(args.samples):
                    for d in depths:
                        r = T.passkey(model, tok, L, d, seed=1000003 * s + 7919 * L + int(1000 * d),
                                      preamble=args.model != "tiny")
                        ok += r["correct"]
                        answers.append(f"{r['key']}->{r['answer'] or '?'}")
            acc = ok / (args.samples * len(depths))
            results[(method, L)] = acc
            print(f"  {method:<9} L={L:>6} ({L / W:.2g}x W): accuracy {acc:4.0%}   {' '.join(answers[:6])}", flush=True)
    # Perplexity on held-out real text, when it is already on this machine (the demo stays offline).
    ppl = {}
    try:
        from .eval import texts as data
        text = data.book("persuasion") if data.available().get("persuasion") else None
    except Exception:  # no cached text: skip, the passkey part is the demo
        text = None
    if text is not None:
        ids = T.tokenize_text(tok, text, max_tokens=3 * max(lengths) + 1)
        print("perplexity of the last 128 tokens of Persuasion (held out):")
        for method in ("original", "lampe"):
            row = []
            for L in lengths:
                with M.apply(model, method, L):
                    r = [T.perplexity(model, tok, ids, L, 128, offset=7919 * (k + 1))["loss"] for k in range(2)]
                ppl[(method, L)] = math.exp(sum(r) / len(r))
                row.append(f"{L / W:.2g}x {ppl[(method, L)]:7.2f}")
            print(f"  {method:<9} " + "   ".join(row), flush=True)
    out = args.out or "lampe-demo.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(9 if ppl else 5, 3.2), squeeze=False)
        ax = axes[0, 0]
        for method in ("original", "lampe"):
            ax.plot([L / W for L in lengths], [results[(method, L)] for L in lengths], marker="o",
                    label="LaMPE (lampe.patch)" if method == "lampe" else "original")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("input length / pretrained window")
        ax.set_ylabel("passkey accuracy")
        ax.set_title(f"{args.model}: passkey retrieval")
        ax.legend()
        if ppl:
            ax = axes[0, 1]
            for method in ("original", "lampe"):
                ax.plot([L / W for L in lengths], [ppl[(method, L)] for L in lengths], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("input length / pretrained window")
            ax.set_ylabel("perplexity (last 128 tokens)")
            ax.set_title("held-out text")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        print(f"plot: {os.path.abspath(out)}")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lampe", description="LaMPE tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="print the LaMPE plan of a prompt length")
    pp.add_argument("--length", type=int, required=True)
    pp.add_argument("--preset", choices=["llama2", "llama3", "mistral", "llama3.1", "auto"])
    pp.add_argument("--mapping-length", type=int)
    pp.add_argument("--pretrained-window", type=int)
    pp.add_argument("--window", type=int, default=512)
    pp.add_argument("--sink", type=int, default=200)
    pp.add_argument("--decode-steps", type=int, default=1)
    pp.set_defaults(func=cmd_plan)
    pc = sub.add_parser("config", help="print show_config()")
    pc.set_defaults(func=cmd_config)
    pd = sub.add_parser("demo", help="passkey retrieval at 1x-8x the window: original vs LaMPE")
    pd.add_argument("--model", default="tiny", help="tiny (bundled, offline) or smollm2-135m")
    pd.add_argument("--length", type=int, help="one input length instead of 1x, 2x, 4x, 8x the window")
    pd.add_argument("--samples", type=int, default=2)
    pd.add_argument("--out", help="plot file (default lampe-demo.png)")
    pd.set_defaults(func=cmd_demo)
    pe = sub.add_parser("eval", help="evaluation grid: passkey, needle, perplexity x methods x lengths")
    pe.add_argument("--model", default="tiny")
    pe.add_argument("--tasks", default="passkey,perplexity")
    pe.add_argument("--methods", help="comma list (default: all): original,linear,dynamic,yarn,selfextend,"
                                      "rerope,lampe,lampe-paper")
    pe.add_argument("--multiples", default="1,2,4,8", help="lengths as multiples of the pretrained window")
    pe.add_argument("--lengths", help="explicit token lengths (overrides --multiples)")
    pe.add_argument("--depths", default="0.1,0.5,0.9")
    pe.add_argument("--samples", type=int, default=5)
    pe.add_argument("--text", help="a text file for perplexity (default: Persuasion, held out)")
    pe.add_argument("--out", help="output directory (default eval-results/MODEL)")
    pe.add_argument("--no-resume", action="store_true", help="start over instead of continuing records.jsonl")
    pe.add_argument("--quick", action="store_true", help="small grid for CI")
    pe.set_defaults(func=cmd_eval)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
