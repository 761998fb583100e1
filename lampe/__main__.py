"""Command line: ``lampe plan``, ``lampe config``, ``lampe demo`` and ``lampe eval`` (also run as
``python -m lampe ...``)."""
from __future__ import annotations

import argparse
import os
import re
import sys

PRESETS = ["llama2", "llama3", "mistral", "llama3.1", "auto"]
ALL_METHODS = "original,linear,dynamic,yarn,selfextend,rerope,lampe,lampe-paper"
# LampeConfig fields and the plan flags that set them, for error messages that name flags.
FLAGS = {"mapping_length": "--mapping-length", "pretrained_window": "--pretrained-window", "window": "--window",
         "sink": "--sink", "length": "--length"}


class UsageError(Exception):
    """A bad combination of flags: reported as ``lampe CMD: error: ...`` with exit status 2."""


def _flag_names(message: str) -> str:
    """Name command-line flags instead of LampeConfig fields in an error message."""
    return re.sub(r"(?<![\w-])(mapping_length|pretrained_window|window|sink|length)(?= must| \(|=|:| is)",
                  lambda m: FLAGS[m.group(1)], message)


# --------------------------------------------------------------------------------------------- plan

def _fmt_kpos(r):
    k = r.kpos
    if len(k) == 0:
        return "[]"
    if not r.mapped:
        return "k=j"
    return f"k=m[j-{r.shift}]: {k[0]}..{k[-1]}" if r.shift else f"k=m[j]: {k[0]}..{k[-1]}"


def model_config(name: str):
    """A transformers config from a known model name (lampe.models.MODELS), a checkpoint directory
    or a config.json file, without loading any weights."""
    from . import models
    try:
        from transformers import AutoConfig, LlamaConfig
    except ImportError as e:
        raise UsageError("--model-config needs transformers: pip install transformers") from e
    key = name.lower()
    if key == "tiny":
        return AutoConfig.from_pretrained(models.tiny_path())
    if key in models.MODELS:
        i = models.MODELS[key]
        if i["architecture"] != "llama":
            raise UsageError(f"--model-config {name}: no config is recorded for this model")
        return LlamaConfig(hidden_size=i["hidden_size"], num_hidden_layers=i["num_hidden_layers"],
                           num_attention_heads=i["num_attention_heads"], num_key_value_heads=i["num_key_value_heads"],
                           head_dim=i["head_dim"], vocab_size=i["vocab_size"],
                           max_position_embeddings=i["pretrained_window"], rope_theta=i["rope_theta"])
    from .hf.describe import load_model_config  # paths: the one loader patch's preview uses
    path = os.path.expanduser(name)
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise UsageError(f"--model-config {name!r}: not a known model ({', '.join(sorted(models.MODELS))}), "
                         "a checkpoint directory or a config.json file")
    try:
        return load_model_config(path)
    except (OSError, ValueError) as e:  # no config.json in the folder, not JSON, no model_type
        raise UsageError(f"--model-config {name!r}: {e}") from None


def describe_defaults(config) -> list:
    """What lampe.patch(model) chooses for a model with this config, as lines of text (one
    wording: lampe.hf.describe)."""
    from .hf import describe
    return describe(config).splitlines()


def _plan_config(args):
    from .config import LampeConfig
    from .hf import patching

    if args.preset is not None and args.mapping_length is not None:
        raise UsageError("--mapping-length and --preset both set the mapping length: give one")
    base = {}
    if args.model_config:
        mc = model_config(args.model_config)
        for line in describe_defaults(mc):
            print(line)
        d = patching.default_config(mc)
        base = dict(window=d.window, sink=d.sink, mapping_length=d.mapping_length,
                    pretrained_window=d.pretrained_window, temperature=d.temperature)
    window = args.window if args.window is not None else base.get("window", 512)
    sink = args.sink if args.sink is not None else base.get("sink", 200)
    W = args.pretrained_window if args.pretrained_window is not None else base.get("pretrained_window")
    if args.mapping_length is not None:
        u = args.mapping_length
    elif args.preset is not None:
        u = args.preset
    else:
        u = base.get("mapping_length", 1536)
    if u == "auto" and W is None:
        raise UsageError("--preset auto needs --pretrained-window (the model's pretraining context), "
                         "or --model-config")
    return LampeConfig(window=window, sink=sink, mapping_length=u, pretrained_window=W,
                       **({"temperature": base["temperature"]} if "temperature" in base else {}))


def cmd_plan(args) -> int:
    from .positions import plan

    if args.length is None and not args.model_config:
        raise UsageError("give --length (a prompt length), --model-config, or both")
    cfg = _plan_config(args)
    if args.length is None:
        return 0
    if args.model_config:
        print()
    p = plan(args.length, cfg)
    print(f"LaMPE plan for a prompt of L = {p.length} tokens")
    print(f"  window H = {p.window}, sink T = {p.sink} -> extended sink R = {p.sink_size}")
    u = cfg.mapping_length
    rule = f"preset {u!r}" if isinstance(u, str) else "fixed" if isinstance(u, int) else "sigmoid"
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


# --------------------------------------------------------------------------------------------- eval

def _numbers(flag, text, conv):
    try:
        out = [conv(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected a comma-separated list of numbers, got {text!r}") from None
    if not out:
        raise UsageError(f"{flag}: empty list")
    return out


def _load_model(name, dtype=None, device="cpu"):
    from . import models

    try:
        model, tok = models.load(name, dtype=dtype)
    except KeyError as e:
        raise UsageError(f"--model: {e.args[0]}") from None
    if device != "cpu":
        model.to(device)
    return model, tok


def _torch_dtype(name):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cmd_eval(args) -> int:
    import json

    from .eval import markdown, plots, run_grid, summarize
    from .eval import methods as M
    from .eval import runner
    from .eval import tasks as T
    from .hf import pretrained_window

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in runner.TASKS:
            raise UsageError(f"--tasks: unknown task {t!r}; choose from {', '.join(runner.TASKS)}")
    if args.quick:
        args.multiples, args.samples, args.depths = "1,2,4", 2, "0.5"
        args.methods = args.methods or "original,lampe"
    methods = [m.strip() for m in (args.methods or ALL_METHODS).split(",") if m.strip()]
    for m in methods:
        try:
            M.parse(m)
        except ValueError as e:
            raise UsageError(f"--methods: {e}") from None
    depths = _numbers("--depths", args.depths, float)
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UsageError(f"--depths: depths are fractions of the context in [0, 1], got {args.depths!r}")
    model, tok = _load_model(args.model, _torch_dtype(args.dtype), args.device)
    W = pretrained_window(model.config)
    lengths = (_numbers("--lengths", args.lengths, int) if args.lengths else
               [int(m * W) for m in _numbers("--multiples", args.multiples, float)])
    name = os.path.basename(os.path.normpath(args.model)) if os.path.exists(args.model) else args.model
    text_ids = haystack = ruler_haystack = None
    need = max(lengths) * 3 + 1 if args.text_tokens is None else (args.text_tokens or None)
    if set(tasks) & set(runner.TEXT_TASKS):
        from .eval import texts as data
        text = data.text_file(args.text) if args.text else data.book("persuasion")
        text_ids = T.tokenize_text(tok, text, max_tokens=need)
    if "needle" in tasks or (args.haystack == "austen" and set(tasks) & set(runner.RETRIEVAL_TASKS[2:])):
        from .eval import texts as data
        haystack = T.tokenize_text(tok, data.austen(), max_tokens=need)
        ruler_haystack = haystack if args.haystack == "austen" else None
    out = args.out or os.path.join("eval-results", name)
    recs = run_grid(model, tok, out_dir=out, tasks=tasks, methods=methods, lengths=lengths, depths=depths,
                    samples=args.samples, windows=args.windows, text_ids=text_ids, haystack_ids=haystack,
                    ruler_haystack_ids=ruler_haystack, ppl_last=args.ppl_last, growth_prompt=args.growth_prompt,
                    preamble=args.model != "tiny",
                    resume=not args.no_resume, model_name=name, batch=args.batch, time_budget=args.time_budget)
    summary = summarize(recs, counts=True)
    table = markdown(summary, W)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(f"# {name} (pretrained window {W})\n\nEach cell: accuracy or perplexity (number of prompts or "
                 f"windows).\n\n{table}\n")
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({t: {m: {str(L): dict(value=v, n=n) for L, (v, n) in d.items()} for m, d in by.items()}
                   for t, by in summary.items()}, fh, indent=1)
    pngs = plots(recs, out, W, title=f"{name}, pretrained window {W}")
    print(table)
    print(f"records: {os.path.join(out, 'records.jsonl')}; plots: {', '.join(pngs) or 'none (matplotlib missing)'}")
    return 0


# --------------------------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    import tempfile
    import time

    from .eval import overview, run_grid, summarize
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
    text_ids = None
    try:  # perplexity on held-out text when it is already on this machine (the demo stays offline)
        from .eval import texts as data
        if data.available().get("persuasion"):
            text_ids = T.tokenize_text(tok, data.book("persuasion"), max_tokens=3 * max(lengths) + 1)
    except Exception:  # no cached text: the passkey part is the demo
        text_ids = None
    tasks = ["passkey"] + (["perplexity"] if text_ids is not None else [])
    with tempfile.TemporaryDirectory(prefix="lampe-demo-") as tmp:
        recs = run_grid(model, tok, out_dir=tmp, tasks=tasks, methods=["original", "lampe"], lengths=lengths,
                        depths=depths, samples=args.samples, windows=2, text_ids=text_ids, ppl_last=128,
                        preamble=args.model != "tiny", model_name=args.model, progress=False)
    summary = summarize(recs)
    for method in ("original", "lampe"):
        for L in lengths:
            answers = [f"{r['key']}->{r['answer'] or '?'}" for r in recs
                       if r["task"] == "passkey" and r["method"] == method and r["length"] == L]
            print(f"  {method:<9} L={L:>6} ({L / W:.2g}x W): accuracy {summary['passkey'][method][L]:4.0%}   "
                  f"{' '.join(answers[:6])}")
    if "perplexity" in summary:
        print("perplexity of the last 128 tokens of Persuasion (held out):")
        for method in ("original", "lampe"):
            print(f"  {method:<9} " + "   ".join(f"{L / W:.2g}x {summary['perplexity'][method][L]:7.2f}"
                                                for L in lengths))
    out = args.out or "lampe-demo.png"
    if overview(recs, out, W, title=f"{args.model}: original vs LaMPE (lampe.patch)"):
        print(f"plot: {os.path.abspath(out)}")
    else:
        print("(matplotlib not installed: no plot)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


# --------------------------------------------------------------------------------------------- main

def _version() -> str:
    from ._version import __version__
    return __version__


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default where there is one and the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    ap = argparse.ArgumentParser(prog="lampe", description="LaMPE tools: plans, the demo, evaluations.",
                                 formatter_class=fmt)
    ap.add_argument("--version", action="version", version=f"lampe {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{plan,config,demo,eval}")

    pp = sub.add_parser("plan", formatter_class=fmt, help="print the LaMPE plan of a prompt length, or what "
                        "lampe.patch would choose for a model",
                        description="Print the LaMPE plan of a prompt length (regions, positions, offsets), and/or "
                                    "preview what lampe.patch(model) would choose for a model's config.")
    pp.add_argument("--length", type=int, help="prompt length L in tokens (required unless --model-config)")
    pp.add_argument("--model-config", metavar="CONFIG",
                    help="a config.json, a checkpoint directory or a known model name (tiny, smollm2-135m): "
                         "print what lampe.patch would choose for it and use its defaults for the plan")
    pp.add_argument("--preset", choices=PRESETS, help="mapping length from a scaled-sigmoid preset "
                    "('auto' needs --pretrained-window); default: --mapping-length 1536, or the model's rule "
                    "with --model-config")
    pp.add_argument("--mapping-length", type=int, metavar="U", help="a fixed mapping length U (not with --preset)")
    pp.add_argument("--pretrained-window", type=int, metavar="W", help="the model's pretraining context, "
                    "for --preset auto")
    pp.add_argument("--window", type=int, metavar="H", help="local window H (default: 512, or the model's with "
                    "--model-config)")
    pp.add_argument("--sink", type=int, metavar="T", help="sink T (default: 200, or the model's with --model-config)")
    pp.add_argument("--decode-steps", type=int, default=1, help="decode steps to show after the prompt")
    pp.set_defaults(func=cmd_plan)

    pc = sub.add_parser("config", help="print show_config(): version, ISAs, threads, build")
    pc.set_defaults(func=cmd_config)

    pd = sub.add_parser("demo", formatter_class=fmt, help="passkey retrieval at 1x-8x the window: original vs LaMPE")
    pd.add_argument("--model", default="tiny", help="tiny (bundled, offline), smollm2-135m, a checkpoint directory "
                    "or a .gguf file")
    pd.add_argument("--length", type=int, help="one input length instead of 1x, 2x, 4x, 8x the window")
    pd.add_argument("--samples", type=int, default=2, help="prompts per depth (3 depths) and length")
    pd.add_argument("--out", default="lampe-demo.png", help="plot file")
    pd.set_defaults(func=cmd_demo)

    pe = sub.add_parser("eval", formatter_class=fmt, help="evaluation grid: tasks x methods x lengths",
                        description="Evaluation grid: tasks x methods x lengths, one JSON record per prompt in "
                                    "OUT/records.jsonl (rerunning resumes), a Markdown table and plots.")
    pe.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a checkpoint directory or a .gguf file")
    pe.add_argument("--tasks", default="passkey,perplexity", help="comma list of passkey, needle, multikey, "
                    "multivalue, multiquery, vartrack, perplexity, growth (perplexity of the tokens decoded after "
                    "a prompt of --growth-prompt tokens)")
    pe.add_argument("--methods", help=f"comma list of {ALL_METHODS.replace(',', ', ')}, lampe-calibrated or "
                    f"lampe:FIELD=VALUE[:FIELD=VALUE] (default: {ALL_METHODS}; with --quick: original,lampe)")
    pe.add_argument("--multiples", default="1,2,4,8", help="lengths as multiples of the pretrained window")
    pe.add_argument("--lengths", help="explicit token lengths (replace --multiples)")
    pe.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths for passkey and needle; RULER-style "
                    "tasks place needles at random depths and use as many prompts")
    pe.add_argument("--samples", type=int, default=5, help="prompts per depth, length and method")
    pe.add_argument("--windows", type=int, help="perplexity windows per length and method (default: samples // 2, "
                    "at least 1)")
    pe.add_argument("--ppl-last", type=int, default=256, help="perplexity of the last N tokens of each window")
    pe.add_argument("--growth-prompt", type=int, metavar="P", help="growth task: the prompt length, the rest of "
                    "each window is decoded token by token (default: the pretrained window)")
    pe.add_argument("--text", help="a text file for perplexity (default: Persuasion, held out)")
    pe.add_argument("--text-tokens", type=int, metavar="N", help="tokens of the text (and haystack) to use; "
                    "windows start at fixed offsets modulo what fits (default: 3 x the longest length + 1, as in "
                    "the first recorded results; 0: the whole text, which spreads windows over the book)")
    pe.add_argument("--haystack", choices=["noise", "austen"], default="noise",
                    help="haystack of the RULER-style tasks: repeated filler sentences or Jane Austen's novels")
    pe.add_argument("--out", help="output directory (default: eval-results/MODEL)")
    pe.add_argument("--no-resume", action="store_true", help="start over instead of continuing records.jsonl")
    pe.add_argument("--quick", action="store_true", help="small grid for CI: --multiples 1,2,4 --samples 2 "
                    "--depths 0.5 and methods original,lampe unless --methods is given")
    pe.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    pe.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model weights dtype")
    pe.add_argument("--batch", type=int, default=1, help="prompts of one length generated together")
    pe.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    pe.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="start no new batch after this many seconds (rerun to continue)")
    pe.set_defaults(func=cmd_eval)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    sub = ap._subparsers._group_actions[0].choices[args.cmd]  # for error messages
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here
        return rc
    except UsageError as e:
        sub.error(str(e))  # exits with status 2
    except (ValueError, TypeError) as e:
        print(f"{sub.prog}: error: {_flag_names(str(e)) if args.cmd == 'plan' else e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``lampe plan ... | head``): stop quietly, as command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
