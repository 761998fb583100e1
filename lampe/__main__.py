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
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
