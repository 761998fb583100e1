"""Evaluation tasks: passkey retrieval, needle in a haystack, RULER-style synthetic retrieval
(lampe.eval.ruler) and perplexity on long text.

A retrieval task is a :class:`Case` (prompt ids, the strings a correct answer contains, how many
tokens to generate) built from (length, depth, seed), and a score of the generated ids. The
runner (lampe.eval.runner) builds the cases, generates for a batch of them at once and stores one
JSON record per case. Perplexity is one forward pass over a window of real text.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..models import decoded_digits

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n")
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Case:
    """One retrieval prompt: ``ids`` (exactly the requested length), the strings a correct answer
    contains (``expected``), and the scoring rule (``digits``: the first run of decoded digits must
    start with expected[0]; otherwise the fraction of ``expected`` found in the decoded text)."""

    ids: List[int]
    expected: List[str]
    max_new_tokens: int = 8
    digits: bool = False
    info: Dict[str, object] = field(default_factory=dict)

    def score(self, tok, new_ids) -> dict:
        if self.digits:
            got = decoded_digits(tok, new_ids)
            ok = got[:len(self.expected[0])] == self.expected[0]
            text = tok.decode(_list(new_ids), skip_special_tokens=True)
            return dict(key=self.expected[0], answer=got, text=text[:200], score=float(ok), correct=ok)
        text = tok.decode(_list(new_ids), skip_special_tokens=True)
        found = sum(e in text for e in self.expected)
        return dict(expected=self.expected, answer=text.strip()[:200], score=found / len(self.expected),
                    correct=found == len(self.expected))


def _list(ids) -> list:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def encode(tok, text: str) -> list:
    if hasattr(tok, "offset"):  # lampe.models.ByteTokenizer
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def bos(tok) -> list:
    b = getattr(tok, "bos_token_id", None)
    return [b] if b is not None else []


def noise(tok) -> Callable[[int], list]:
    """The repeated filler sentences, cut to n tokens."""
    unit = encode(tok, FILLER)

    def filler(n):
        return (unit * (n // max(1, len(unit)) + 2))[:n]
    return filler


def text_filler(haystack_ids: Sequence[int], offset: int) -> Callable[[int], list]:
    """n consecutive tokens of real text, starting at ``offset`` (modulo what fits)."""
    def filler(n):
        if len(haystack_ids) < n:
            raise ValueError(f"haystack of {len(haystack_ids)} tokens is shorter than {n}")
        start = offset % max(1, len(haystack_ids) - n)
        return list(haystack_ids[start:start + n])
    return filler


def fill(prefix: list, filler: Callable[[int], list], inserts: Sequence, suffix: list, n_tokens: int) -> list:
    """prefix + filler with each (depth, ids) of ``inserts`` placed at its relative depth + suffix,
    exactly ``n_tokens`` long (inserts at sentence-agnostic token offsets, in depth order)."""
    budget = n_tokens - len(prefix) - len(suffix) - sum(len(ids) for _, ids in inserts)
    if budget < 0:
        raise ValueError(f"length {n_tokens} is too short for the prompt ({n_tokens - budget} tokens without filler)")
    hay = filler(budget)
    out, at = list(prefix), 0
    for depth, ids in sorted(inserts, key=lambda x: x[0]):
        cut = int(round(depth * budget))
        out += hay[at:cut] + list(ids)
        at = cut
    return out + hay[at:budget] + list(suffix)


def passkey_prompt(tok, n_tokens: int, depth: float, key: int, preamble: bool = False) -> list:
    """The classic passkey prompt (Mohtashami & Jaggi 2023) of exactly ``n_tokens`` tokens, with
    the key sentence at relative ``depth`` of the filler."""
    prefix = bos(tok) + (encode(tok, PREAMBLE) if preamble else [])
    needle = encode(tok, f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return fill(prefix, noise(tok), [(depth, needle)], encode(tok, QUESTION), n_tokens)


def needle_prompt(tok, haystack_ids: Sequence[int], n_tokens: int, depth: float, key: int, offset: int = 0) -> list:
    """Needle in a haystack: a magic number hidden in real text (e.g. Jane Austen)."""
    question = encode(tok, "\nWhat is the special magic number mentioned in the text above? "
                           "The special magic number is")
    needle = encode(tok, f" The special magic number is {key}. ")
    return fill(bos(tok), text_filler(haystack_ids, offset), [(depth, needle)], question, n_tokens)


def passkey_case(tok, n_tokens: int, depth: float, seed: int, preamble: bool = False, **_) -> Case:
    key = random.Random(seed).randint(10000, 99999)
    return Case(passkey_prompt(tok, n_tokens, depth, key, preamble=preamble), [str(key)], 8, digits=True)


def needle_case(tok, n_tokens: int, depth: float, seed: int, haystack_ids=None, **_) -> Case:
    if haystack_ids is None:
        raise ValueError("the needle task needs haystack_ids (real text)")
    rnd = random.Random(seed)
    key = rnd.randint(10000, 99999)
    ids = needle_prompt(tok, haystack_ids, n_tokens, depth, key, offset=rnd.randint(0, 10**9))
    return Case(ids, [str(key)], 8, digits=True)


@torch.no_grad()
def generate(model, tok, prompts: Sequence[list], max_new_tokens: int) -> list:
    """Greedy continuations (new token ids) of equal-length prompts, as one batch."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() batches prompts of one length only")
    x = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=model.device)
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad if pad is not None else eos, eos_token_id=eos)
    return [row[x.shape[1]:].cpu() for row in out]


def run_cases(model, tok, cases: Sequence[Case]) -> list:
    """Generate for every case (one batch) and score each: a list of result dicts."""
    new = generate(model, tok, [c.ids for c in cases], max(c.max_new_tokens for c in cases))
    return [dict(c.score(tok, ids[:c.max_new_tokens]), tokens=len(c.ids), **c.info) for c, ids in zip(cases, new)]


def passkey(model, tok, n_tokens: int, depth: float, seed: int, preamble: bool = False) -> dict:
    """One passkey prompt, generated and scored."""
    return run_cases(model, tok, [passkey_case(tok, n_tokens, depth, seed, preamble=preamble)])[0]


@torch.no_grad()
def token_losses(model, ids: Sequence[Sequence[int]], chunk: int = 1024) -> torch.Tensor:
    """Per-token negative log-likelihood of ids[b, 1:] given the prefix, in one forward pass.

    The vocabulary projection runs on ``chunk`` positions at a time, so memory stays
    O(chunk x vocabulary) instead of holding [L, vocabulary] logits (3 GB for SmolLM2 at 16K)."""
    x = torch.tensor([list(r) for r in ids], dtype=torch.long, device=model.device)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or body is None or body is model:
        logits = model(x, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").cpu()
    hidden = body(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
    cap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    for i in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, i:i + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1 + i:1 + i + chunk],
                                                     reduction="none").cpu())
    return torch.cat(out, dim=1)


def text_window(text_ids: Sequence[int], n_tokens: int, offset: int) -> list:
    if len(text_ids) < n_tokens + 1:
        raise ValueError(f"text of {len(text_ids)} tokens is shorter than {n_tokens}")
    start = offset % (len(text_ids) - n_tokens)
    return list(text_ids[start:start + n_tokens])


def perplexities(model, text_ids: Sequence[int], n_tokens: int, last: int, offsets: Sequence[int],
                 buckets: int = 8) -> list:
    """For each offset: the loss of the last ``last`` tokens of the ``n_tokens`` window of real text
    starting there, and the mean loss per position bucket (``buckets`` equal slices). One batch."""
    losses = token_losses(model, [text_window(text_ids, n_tokens, o) for o in offsets])
    out = []
    for row in losses:
        loss = float(row[-last:].mean())
        out.append(dict(loss=loss, ppl=math.exp(loss), tokens=n_tokens, last=min(last, len(row)),
                        bucket_loss=[float(c.mean()) for c in torch.tensor_split(row, buckets)]))
    return out


def perplexity(model, tok, text_ids: Sequence[int], n_tokens: int, last: int, offset: int = 0,
               buckets: int = 8) -> dict:
    """Loss of the last ``last`` tokens of an ``n_tokens`` window of real text (see perplexities)."""
    return perplexities(model, text_ids, n_tokens, last, [offset], buckets)[0]


@torch.no_grad()
def growth(model, text_ids: Sequence[int], n_tokens: int, prompt: int, offsets: Sequence[int],
           quarters: int = 4) -> list:
    """Perplexity of a sequence that grows by decoding: for each offset, the first ``prompt``
    tokens of an ``n_tokens`` window of real text go through one forward pass (the prompt), then
    the rest one token at a time through the cache, as generate() does, teacher-forced. The loss
    covers every token after the prompt; ``quarter_loss`` splits it into equal parts. One window
    at a time (the decode steps dominate)."""
    from ..hf import compat

    if not 0 < prompt < n_tokens:
        raise ValueError(f"growth needs 0 < prompt ({prompt}) < length ({n_tokens})")
    out = []
    for o in offsets:
        x = torch.tensor([text_window(text_ids, n_tokens + 1, o)], dtype=torch.long, device=model.device)
        step = model(x[:, :prompt], use_cache=True)
        logits = [step.logits[:, -1].float()]
        for t in range(prompt, n_tokens):
            step = model(x[:, t:t + 1], use_cache=True, **compat.cache_kwargs(model, compat.output_cache(step)))
            logits.append(step.logits[:, -1].float())
        losses = torch.nn.functional.cross_entropy(torch.cat(logits), x[0, prompt:n_tokens + 1],
                                                   reduction="none").cpu()
        loss = float(losses.mean())
        out.append(dict(loss=loss, ppl=math.exp(loss), tokens=n_tokens, prompt=prompt,
                        quarter_loss=[float(c.mean()) for c in torch.tensor_split(losses, quarters)]))
    return out


def tokenize_text(tok, text: str, max_tokens: Optional[int] = None) -> list:
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # enough characters for any tokenizer's ratio
    ids = encode(tok, text)
    return ids[:max_tokens] if max_tokens else ids
