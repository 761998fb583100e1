"""Evaluation tasks: passkey retrieval, needle in a haystack, perplexity on long text.

Every task takes a (model, tokenizer) pair already set up with a method (lampe.eval.methods)
and returns plain dicts, one per sample, so the runner can store one JSON record per cell.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n")
QUESTION = "What is the pass key? The pass key is"


def _encode(tok, text: str) -> list:
    if hasattr(tok, "offset"):  # lampe.models.ByteTokenizer
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list:
    b = getattr(tok, "bos_token_id", None)
    return [b] if b is not None else []


def _digits(tok, ids) -> str:
    text = tok.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids), skip_special_tokens=True)
    out = ""
    for ch in text.lstrip():
        if ch.isdigit():
            out += ch
        elif out:
            break
        elif not ch.isspace():
            break
    return out


def _fill_to(tok, prefix_ids, filler_ids_fn, suffix_ids, depth, needle_ids, n_tokens):
    """bos + prefix + filler[:a] + needle + filler[:b] + suffix with |total| = n_tokens."""
    budget = n_tokens - len(prefix_ids) - len(needle_ids) - len(suffix_ids)
    if budget < 0:
        raise ValueError(f"length {n_tokens} is too short for the prompt ({n_tokens - budget} tokens without filler)")
    filler = filler_ids_fn(budget)
    cut = int(round(depth * budget))
    return prefix_ids + filler[:cut] + needle_ids + filler[cut:budget] + suffix_ids


def passkey_prompt(tok, n_tokens: int, depth: float, key: int, preamble: bool = False) -> list:
    """The classic passkey prompt (Mohtashami & Jaggi 2023) of exactly ``n_tokens`` tokens, with
    the key sentence at relative ``depth`` of the filler."""
    filler_unit = _encode(tok, FILLER)

    def filler(n):
        reps = n // max(1, len(filler_unit)) + 2
        return (filler_unit * reps)[:n]

    prefix = _bos(tok) + (_encode(tok, PREAMBLE) if preamble else [])
    needle = _encode(tok, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return _fill_to(tok, prefix, filler, _encode(tok, QUESTION), depth, needle, n_tokens)


def needle_prompt(tok, haystack_ids: Sequence[int], n_tokens: int, depth: float, key: int, offset: int = 0) -> list:
    """Needle in a haystack: a magic number hidden in real text (e.g. Jane Austen)."""
    question = _encode(tok, "\nWhat is the special magic number mentioned in the text above? "
                            "The special magic number is")
    needle = _encode(tok, f" The special magic number is {key}. ")

    def filler(n):
        if len(haystack_ids) < n:
            raise ValueError(f"haystack of {len(haystack_ids)} tokens is shorter than {n}")
        start = offset % max(1, len(haystack_ids) - n)
        return list(haystack_ids[start:start + n])

    return _fill_to(tok, _bos(tok), filler, question, depth, needle, n_tokens)


@torch.no_grad()
def answer(model, tok, ids: list, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``ids``; the digits it starts with."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad if pad is not None else eos, eos_token_id=eos)
    return _digits(tok, out[0, x.shape[1]:])


def passkey(model, tok, n_tokens: int, depth: float, seed: int, preamble: bool = False) -> dict:
    key = random.Random(seed).randint(10000, 99999)
    ids = passkey_prompt(tok, n_tokens, depth, key, preamble=preamble)
    got = answer(model, tok, ids)
    return dict(key=str(key), answer=got, correct=got[:5] == str(key), tokens=len(ids))


def needle(model, tok, haystack_ids, n_tokens: int, depth: float, seed: int) -> dict:
    rnd = random.Random(seed)
    key = rnd.randint(10000, 99999)
    ids = needle_prompt(tok, haystack_ids, n_tokens, depth, key, offset=rnd.randint(0, 10**9))
    got = answer(model, tok, ids)
    return dict(key=str(key), answer=got, correct=got[:5] == str(key), tokens=len(ids))


@torch.no_grad()
def token_losses(model, ids: Sequence[int]) -> torch.Tensor:
    """Per-token negative log-likelihood of ids[1:] given the prefix, in one forward pass."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    logits = model(x, use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu()


def perplexity(model, tok, text_ids: Sequence[int], n_tokens: int, last: int, offset: int = 0,
               buckets: int = 8) -> dict:
    """Loss of the last ``last`` tokens of an ``n_tokens`` window of real text, and the mean loss
    per position bucket (``buckets`` equal slices of the window)."""
    if len(text_ids) < n_tokens + 1:
        raise ValueError(f"text of {len(text_ids)} tokens is shorter than {n_tokens}")
    start = offset % (len(text_ids) - n_tokens)
    window = list(text_ids[start:start + n_tokens])
    losses = token_losses(model, window)
    tail = losses[-last:]
    per = [float(c.mean()) for c in torch.tensor_split(losses, buckets)]
    loss = float(tail.mean())
    return dict(loss=loss, ppl=math.exp(loss), tokens=n_tokens, last=len(tail), bucket_loss=per)


def tokenize_text(tok, text: str, max_tokens: Optional[int] = None) -> list:
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # enough characters for any tokenizer's ratio
    ids = _encode(tok, text)
    return ids[:max_tokens] if max_tokens else ids
