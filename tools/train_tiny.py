#!/usr/bin/env python
"""Train the tiny byte-level Llama bundled in ``lampe/assets/tiny-llama`` (see docs/tiny_model.md).

    PYTHONPATH=. python tools/train_tiny.py --out lampe/assets/tiny-llama --minutes 20 --seed 0

A 4-layer Llama (vocab 259: ids 0 pad, 1 bos, 2 eos, byte b -> b + 3, as ``lampe.models.ByteTokenizer``)
is trained from scratch with a three-phase curriculum keyed to the wall-clock budget:

1. warm-up (first 25%): 64-token rows, half repeated random strings (induction) and half mini
   passkey rows "The pass key is K. <filler>The pass key is K";
2. short (next 20%): 128-token rows of the main mixture;
3. main (rest): 256-token rows (the pretrained window W): 50% synthetic passkey examples (the
   classic grass/sky/sun filler, answer digits weighted 5x), 25% repeated random strings with
   Austen snippets between the copies, 25% random windows of Jane Austen's novels (Persuasion
   excluded: it is the held-out text).

Every ``--eval-every`` steps it measures in-window passkey accuracy (greedy 5-digit answer, 100
fresh examples of 128-256 tokens, varied depths) and stops at ``--target`` accuracy or after
``--minutes`` of wall-clock time. Why the curriculum: docs/tiny_model.md (the plain 60/40
passkey/Austen mixture learned no retrieval at all in 20 minutes).

Afterwards it saves ``config.json`` and ``model.safetensors`` (float16 storage; load in float32),
reloads that checkpoint and evaluates passkey retrieval at 512/1024/2048 tokens for the plain model
(expected near 0: beyond W) and under ``lampe.patch`` with a few window/sink settings, recording all
figures in ``training.json``. ``--eval-only`` repeats just the evaluation on a saved checkpoint.

The passkey generator (:func:`passkey_prompt`) can be imported by demos so they use the format the
model was trained on: ``sys.path.insert(0, "tools"); from train_tiny import passkey_prompt``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "
ANSWER_DIGITS = 5
PAD, BOS, EOS, OFFSET, VOCAB = 0, 1, 2, 3, 259
WINDOW = 256  # the pretrained window W = max_position_embeddings

_COPY_ALPHABET = "0123456789" * 3 + "abcdefghijklmnopqrstuvwxyz" + "    "
_SENTENCE_ENDS = [i + 2 for i in range(len(FILLER)) if FILLER.startswith(". ", i)]  # offsets after ". "


def encode(text: str) -> list[int]:
    """Byte ids, same convention as lampe.models.ByteTokenizer (no bos)."""
    return [b + OFFSET for b in text.encode("utf-8")]


def _filler(rng: random.Random, n: int) -> str:
    """``n`` characters of repeated filler that end at a random sentence end (so the start is cut
    at an arbitrary offset)."""
    if n <= 0:
        return ""
    end = rng.choice(_SENTENCE_ENDS)  # the filler ends after this offset of some repetition
    reps = n // len(FILLER) + 2
    s = FILLER * reps
    stop = (reps - 1) * len(FILLER) + end
    return s[stop - n:stop]


def passkey_prompt(n_tokens: int, depth: float | None = None, key: int | None = None,
                   rng: random.Random | None = None) -> tuple[str, str]:
    """``(prompt, answer)``: bos + prompt + answer is exactly ``n_tokens`` tokens for the byte
    tokenizer (prompt ends with "The pass key is ", answer is the 5 digits).

    The needle sits at relative ``depth`` (0 = right after bos, 1 = just before the question),
    snapped to the nearest sentence boundary of the filler."""
    rng = rng or random.Random()
    key = rng.randint(10 ** (ANSWER_DIGITS - 1), 10 ** ANSWER_DIGITS - 1) if key is None else key
    answer = str(key)
    needle = NEEDLE.format(key=answer)
    n_filler = n_tokens - 1 - len(needle) - len(QUESTION) - len(answer)
    if n_filler < 0:
        raise ValueError(f"a passkey example needs at least {n_tokens - n_filler} tokens, got {n_tokens}")
    filler = _filler(rng, n_filler)
    depth = rng.random() if depth is None else float(depth)
    cut = round(depth * n_filler)
    bounds = [0, n_filler] + [i + 2 for i in range(n_filler - 1) if filler.startswith(". ", i)]
    cut = min(bounds, key=lambda b: (abs(b - cut), b))
    return filler[:cut] + needle + filler[cut:] + QUESTION, answer


# ---------------------------------------------------------------------------------------- training


def build_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=WINDOW, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, rms_norm_eps=1e-5,
                       attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.02)


class Batches:
    """Training batches ``(ids, targets, weights)``; rows are right-padded with PAD (weight 0)."""

    def __init__(self, text: str, seed: int, batch: int, passkey_frac: float, answer_weight: float,
                 min_len: int, copy_frac: float = 0.0):
        import numpy as np

        self.np = np
        self.data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + OFFSET
        self.rng = random.Random(seed)
        self.batch = batch
        self.n_passkey = round(batch * passkey_frac)
        self.n_copy = round(batch * copy_frac)
        self.answer_weight = answer_weight
        self.min_len = min_len

    def copy_row(self, T: int) -> list[int]:
        """Synthetic induction data: a random string X (digits, letters, spaces) repeated several
        times with Austen snippets of random length between the copies; every copy after the
        first can only be predicted by looking back. Returns T tokens (bos not included)."""
        rng = self.rng
        x = "".join(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(6, min(40, T // 3))))
        out: list[int] = []
        while len(out) < T:
            out += encode(x)
            gap = rng.randint(0, T // 3)
            start = rng.randrange(len(self.data) - gap)
            out += [int(t) for t in self.data[start:start + gap]]
        return out[:T]

    def copy_batch(self, T: int):
        """Warm-up batch of short rows (T tokens, as many rows as the token budget allows):
        half plain repeated random strings (induction), half mini passkey rows
        "The pass key is K. <short filler>The pass key is K" with the second K weighted."""
        import torch

        rng = self.rng
        B = self.batch * WINDOW // T
        ids = torch.full((B, T + 1), PAD, dtype=torch.long)
        w = torch.zeros(B, T)
        for r in range(B):
            if r % 2 == 0:
                x = encode("".join(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(4, T // 3))))
                row = [BOS] + (x * (T // len(x) + 2))[:T]
                ids[r] = torch.tensor(row)
                w[r] = 1.0
            else:
                key = str(rng.randint(10 ** (ANSWER_DIGITS - 1), 10 ** ANSWER_DIGITS - 1))
                head, tail = f"The pass key is {key}. ", f"The pass key is {key}"
                room = T - len(head) - len(tail)
                text = head + _filler(rng, rng.randint(0, max(0, room))) + tail
                row = [BOS] + encode(text)
                n = len(row)
                ids[r, :n] = torch.tensor(row)
                w[r, :n - 1] = 1.0
                w[r, n - 1 - ANSWER_DIGITS:n - 1] = self.answer_weight
        return ids[:, :-1], ids[:, 1:], w

    def next(self, T: int = WINDOW):
        """A batch of rows of T tokens; rows shorter than WINDOW come in proportionally larger
        batches (same tokens per step) and keep the passkey/copy/text proportions."""
        import torch

        np = self.np
        scale = WINDOW // T
        B = self.batch * scale
        ids = np.full((B, T + 1), PAD, dtype=np.int64)
        w = np.zeros((B, T), dtype=np.float32)
        for r in range(B):
            kind = r // scale
            if kind < self.n_passkey:
                n = self.rng.randint(min(self.min_len, T), T)
                prompt, answer = passkey_prompt(n, rng=self.rng)
                row = [BOS] + encode(prompt + answer)
                assert len(row) == n
                ids[r, :n] = row
                w[r, :n - 1] = 1.0
                w[r, n - 1 - ANSWER_DIGITS:n - 1] = self.answer_weight  # targets = the answer digits
            elif kind < self.n_passkey + self.n_copy:
                row = [BOS] + self.copy_row(T)
                ids[r, :T + 1] = row[:T + 1]
                w[r, :] = 1.0
            else:
                start = self.rng.randrange(len(self.data) - T)
                ids[r, 0] = BOS
                ids[r, 1:T + 1] = self.data[start:start + T]
                w[r, :] = 1.0
        x = torch.from_numpy(ids[:, :T].copy())
        y = torch.from_numpy(ids[:, 1:].copy())
        return x, y, torch.from_numpy(w)


def eval_set(rng: random.Random, n: int, lo: int, hi: int):
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        prompt, answer = passkey_prompt(L, rng=rng)
        out.append((prompt, answer))
    return out


def teacher_forced_accuracy(model, examples, batch: int = 50, per_digit: bool = False):
    """Greedy 5-digit accuracy. With the answer fed back, greedy decoding reproduces the answer
    iff the argmax at each answer position equals its digit, so one causal forward pass per
    example gives the same result as ``generate`` (exact for the unpatched model)."""
    import torch

    correct, digits = 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            rows = [[BOS] + encode(p + a) for p, a in chunk]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), PAD, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
            logits = model(input_ids=ids).logits  # right padding: causal rows are unaffected
            for j, r in enumerate(rows):
                n = len(r)
                pred = logits[j, n - 1 - ANSWER_DIGITS:n - 1].argmax(-1)
                correct += int(torch.equal(pred, ids[j, n - ANSWER_DIGITS:n]))
                digits += int((pred == ids[j, n - ANSWER_DIGITS:n]).sum())
    if per_digit:
        return correct / len(examples), digits / (ANSWER_DIGITS * len(examples))
    return correct / len(examples)


def generate_answer(model, prompt: str) -> str:
    import torch

    ids = torch.tensor([[BOS] + encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_DIGITS,
                             do_sample=False, pad_token_id=PAD, eos_token_id=None)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    return bytes(t - OFFSET for t in new if t >= OFFSET).decode("utf-8", errors="replace")


def generate_accuracy(model, examples) -> float:
    return sum(generate_answer(model, p) == a for p, a in examples) / len(examples)


def lr_at(step: int, elapsed: float, args) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_frac`` over the
    wall-clock budget (the step count is unknown in advance under a time cap)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, elapsed / (args.minutes * 60))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args, record: dict):
    import torch
    from transformers import LlamaForCausalLM

    from lampe.data import austen

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    config = build_config(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)
    config.initializer_range = args.init_std or 1 / math.sqrt(args.hidden)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads / {args.kv_heads} kv heads, intermediate {args.intermediate}", flush=True)
    text = austen(exclude=("persuasion",))
    batches = Batches(text, args.seed, args.batch, args.passkey_frac, args.answer_weight, args.min_len,
                      args.copy_frac)
    eval_rng = random.Random(args.seed + 10_000)  # held-out stream: never used for training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    history = []
    t0 = time.perf_counter()
    step, acc, ema = 0, 0.0, None
    stop_reason = "time"
    budget = args.minutes * 60
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            stop_reason = "time" if elapsed >= budget else "max_steps"
            break
        lr = lr_at(step, elapsed, args)
        for g in opt.param_groups:
            g["lr"] = lr
        if elapsed < args.warm_frac * budget:
            x, y, w = batches.copy_batch(args.warm_len)
        else:
            short = elapsed < (args.warm_frac + args.short_frac) * budget
            x, y, w = batches.next(args.short_len if short else WINDOW)
        logits = model(input_ids=x).logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1), reduction="none")
        loss = (ce * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % args.log_every == 0:
            print(f"step {step:5d}  loss {lv:.4f} (ema {ema:.4f})  gnorm {float(gnorm):.2f}  lr {lr:.2e}  "
                  f"elapsed {time.perf_counter() - t0:7.1f}s", flush=True)
        if step % args.eval_every == 0:
            model.eval()
            acc, dacc = teacher_forced_accuracy(model, eval_set(eval_rng, args.eval_n, 128, WINDOW), per_digit=True)
            model.train()
            el = time.perf_counter() - t0
            history.append({"step": step, "loss": round(lv, 4), "loss_ema": round(ema, 4),
                            "passkey_acc": acc, "digit_acc": round(dacc, 3), "elapsed_s": round(el, 1)})
            print(f"== step {step:5d}  loss {lv:.4f}  in-window passkey acc {acc:.2f} (per digit {dacc:.2f})  "
                  f"elapsed {el:7.1f}s", flush=True)
            if acc >= args.target:
                stop_reason = f"target {args.target} reached"
                break
    wall = time.perf_counter() - t0
    model.eval()
    record.update({
        "steps": step, "stop_reason": stop_reason, "train_wall_time_s": round(wall, 1),
        "final_loss": round(lv, 4), "final_loss_ema": round(ema, 4),
        "last_periodic_passkey_acc": acc, "num_parameters": n_params,
        "tokens_seen": step * args.batch * WINDOW, "history": history,
    })
    print(f"stopped after {step} steps, {wall:.1f}s ({stop_reason})", flush=True)
    return model


def save(model, out: Path, dtype_name: str):
    import torch

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype)
    model.config.dtype = dtype_name
    model.save_pretrained(out, safe_serialization=True)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors creates 0600 files
    model.to(torch.float32)
    portable_config(out)


def portable_config(out: Path) -> None:
    """Make config.json load the same way under transformers 4.x and 5.x: float32 by default
    (the stored float16 weights are upcast on load; transformers 5 would otherwise keep the
    storage dtype) and rope_theta also under its legacy top-level key (4.x ignores
    ``rope_parameters``)."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        cfg["rope_theta"] = theta
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def evaluate(out: Path, args, record: dict, long: bool = True):
    import torch
    from transformers import LlamaForCausalLM

    import lampe

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
    t0 = time.perf_counter()
    rng = random.Random(args.seed + 20_000)
    final = eval_set(rng, args.final_n, 128, WINDOW)
    acc_tf = teacher_forced_accuracy(model, final)
    # Check the shortcut against real greedy decoding on part of the set.
    k = min(50, len(final))
    acc_gen = generate_accuracy(model, final[:k])
    acc_tf_k = teacher_forced_accuracy(model, final[:k])
    print(f"saved checkpoint, float32: in-window passkey acc {acc_tf:.3f} on {len(final)} "
          f"(generate on first {k}: {acc_gen:.2f}, teacher-forced on them {acc_tf_k:.2f})", flush=True)
    record["final_in_window_passkey_acc"] = acc_tf
    record["final_in_window_eval"] = {
        "n": len(final), "lengths": [128, WINDOW], "depths": "uniform [0, 1]",
        "method": "greedy 5 digits (teacher-forced argmax; exact equivalent of generate)",
        "generate_check": {"n": k, "generate_acc": acc_gen, "teacher_forced_acc": acc_tf_k},
        "checkpoint": "saved float16 weights loaded in float32",
    }
    # Per-depth in-window accuracy at exactly W tokens.
    depth_rng = random.Random(args.seed + 30_000)
    by_depth = {}
    for d in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = [passkey_prompt(WINDOW, depth=d, rng=depth_rng) for _ in range(20)]
        by_depth[str(d)] = teacher_forced_accuracy(model, ex)
    record["in_window_acc_at_256_by_depth"] = by_depth
    print(f"in-window acc at {WINDOW} tokens by depth: {by_depth}", flush=True)

    if not long:
        return
    lengths = [int(x) for x in args.long_lengths.split(",")]
    n = args.long_n
    long_rng = random.Random(args.seed + 40_000)
    sets = {L: [passkey_prompt(L, depth=(i + 0.5) / n, rng=long_rng) for i in range(n)] for L in lengths}
    results = {"n_per_length": n, "depths": f"evenly spaced (i + 0.5) / {n}",
               "method": "model.generate, greedy, 5 new tokens, exact match", "original": {}}
    for L in lengths:
        results["original"][str(L)] = generate_accuracy(model, sets[L])
        print(f"original model  L={L:5d}: {results['original'][str(L)]:.2f}", flush=True)
    settings = [("default", {})] + [(f"window={w},sink={s}", {"window": w, "sink": s})
                                    for w, s in ((32, 8), (64, 16), (128, 32))]
    for name, kw in settings:
        try:
            h = lampe.patch(model, **kw)
        except Exception as e:  # report, don't lose the other figures
            results[f"lampe {name}"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"lampe {name}: patch failed: {e}", flush=True)
            continue
        try:
            cfg = h.config if hasattr(h, "config") else None
            entry = {"config": {"window": cfg.window, "sink": cfg.sink, "mapping_length": cfg.mapping_length}
                     if cfg is not None else kw}
            for L in lengths:
                t1 = time.perf_counter()
                try:
                    entry[str(L)] = generate_accuracy(model, sets[L])
                except Exception as e:
                    entry[str(L)] = f"error: {type(e).__name__}: {e}"
                print(f"lampe {name:20s} L={L:5d}: {entry[str(L)]}  ({time.perf_counter() - t1:.1f}s)", flush=True)
            results[f"lampe {name}"] = entry
        finally:
            h.remove()
    record["out_of_window_passkey_acc"] = results
    record["eval_wall_time_s"] = round(time.perf_counter() - t0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="lampe/assets/tiny-llama")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap on training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--passkey-frac", type=float, default=0.5)
    ap.add_argument("--copy-frac", type=float, default=0.25,
                    help="share of synthetic induction (repeated random string) rows; the rest is Austen text")
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--min-len", type=int, default=104, help="shortest training passkey example")
    ap.add_argument("--short-len", type=int, default=128,
                    help="curriculum: row length during the first --short-frac of the time budget")
    ap.add_argument("--short-frac", type=float, default=0.2)
    ap.add_argument("--warm-frac", type=float, default=0.25,
                    help="curriculum: the first fraction of the time budget trains only short induction "
                         "and mini-passkey rows of --warm-len tokens")
    ap.add_argument("--warm-len", type=int, default=64)
    ap.add_argument("--init-std", type=float, default=0.0,
                    help="initializer_range; 0: 1/sqrt(hidden) (Llama's 0.02 suits 4096-wide models)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help="0: no step cap")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--final-n", type=int, default=200)
    ap.add_argument("--long-lengths", default="512,1024,2048")
    ap.add_argument("--long-n", type=int, default=20)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--eval-only", action="store_true", help="skip training; evaluate the checkpoint in --out")
    ap.add_argument("--no-long-eval", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rec_path = out / "training.json"
    command = "python tools/train_tiny.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.eval_only:
        record = json.loads(rec_path.read_text())
        record["eval_command"] = command
    else:
        record = {"command": command, "seed": args.seed,
                  "args": {k: v for k, v in vars(args).items() if k not in ("out", "eval_only")}}
        model = train(args, record)
        save(model, out, args.dtype)
    record.update({"torch": torch.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version(), "threads": args.threads, "storage_dtype": args.dtype})
    try:
        evaluate(out, args, record, long=not args.no_long_eval)
    finally:
        record["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())
                           if p.is_file() and p.name != "training.json"}
        rec_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in record if k not in ("history", "args")}, indent=2), flush=True)


if __name__ == "__main__":
    main()
