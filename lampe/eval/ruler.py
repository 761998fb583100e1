"""RULER-style synthetic retrieval tasks, generated offline (Hsieh et al. 2024, "RULER: What's the
Real Context Size of Your Long-Context Language Models?", arXiv:2404.06654).

These separate context-extension methods that a single passkey does not: several needles compete
for attention, and variable tracking needs several hops across the whole context. Each builder
returns a :class:`~lampe.eval.tasks.Case`, exactly ``n_tokens`` long, from a seed; the answer is
scored by RULER's string match (the fraction of expected strings found in the decoded answer).

- ``multikey`` (RULER niah_multikey_1): four "special magic number for KEY" needles at random
  depths; the question asks for one key's 7-digit number.
- ``multivalue`` (niah_multivalue): one key with four numbers at random depths; all four asked.
- ``multiquery`` (niah_multiquery): four keys; the numbers of all four asked.
- ``vartrack`` (vt): a chain ``VAR A = 1234567``, ``VAR B = VAR A``, ... of five variables at
  random depths; the question asks for every variable holding the number.

The haystack is the noise filler of the passkey task (RULER's "noise" haystack), or real text
when ``haystack_ids`` is given (RULER's "essay" haystack).
"""
from __future__ import annotations

import random
import string
from typing import Optional, Sequence

from . import tasks as T

TASKS = ("multikey", "multivalue", "multiquery", "vartrack")

#: Key words (two of them, hyphenated, make a key), as RULER draws keys from a word list.
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "lemon", "piano", "forest", "silver",
         "candle", "garden", "rocket", "violet", "harbor", "meadow", "copper", "falcon", "winter", "island",
         "marble", "pepper", "saddle", "thunder", "velvet", "willow", "anchor", "basket", "cactus", "dragon",
         "ember", "feather", "glacier", "hammer", "jigsaw", "kettle", "lantern", "mirror", "nickel", "orchid",
         "parrot", "quartz", "ribbon", "summit", "tunnel", "umbrella", "walnut", "yellow", "zephyr")

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _keys(rnd: random.Random, n: int) -> list:
    keys = set()
    while len(keys) < n:
        keys.add(f"{rnd.choice(WORDS)}-{rnd.choice(WORDS)}")
    return sorted(keys, key=lambda k: rnd.random())


def _number(rnd: random.Random) -> str:
    return str(rnd.randint(1_000_000, 9_999_999))


def _filler(tok, rnd: random.Random, haystack_ids: Optional[Sequence[int]]):
    return T.noise(tok) if haystack_ids is None else T.text_filler(haystack_ids, rnd.randint(0, 10**9))


def _prompt(tok, rnd, n_tokens, intro, needles, question, haystack_ids, preamble):
    prefix = T.bos(tok) + (T.encode(tok, intro) if preamble else [])
    inserts = [(rnd.random(), T.encode(tok, s)) for s in needles]
    return T.fill(prefix, _filler(tok, rnd, haystack_ids), inserts, T.encode(tok, question), n_tokens)


def _needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}. "


def multikey(tok, n_tokens: int, seed: int, haystack_ids=None, preamble: bool = True, keys: int = 4) -> T.Case:
    rnd = random.Random(seed)
    ks = _keys(rnd, keys)
    vals = [_number(rnd) for _ in ks]
    q = rnd.randrange(keys)
    question = (f"\nWhat is the special magic number for {ks[q]} mentioned in the provided text? "
                f"The special magic number for {ks[q]} mentioned in the provided text is")
    ids = _prompt(tok, rnd, n_tokens, INTRO, [_needle(k, v) for k, v in zip(ks, vals)], question, haystack_ids,
                  preamble)
    return T.Case(ids, [vals[q]], 12)


def multivalue(tok, n_tokens: int, seed: int, haystack_ids=None, preamble: bool = True, values: int = 4) -> T.Case:
    rnd = random.Random(seed)
    key = _keys(rnd, 1)[0]
    vals = [_number(rnd) for _ in range(values)]
    question = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                f"The special magic numbers for {key} mentioned in the provided text are")
    ids = _prompt(tok, rnd, n_tokens, INTRO, [_needle(key, v) for v in vals], question, haystack_ids, preamble)
    return T.Case(ids, vals, 12 * values)


def multiquery(tok, n_tokens: int, seed: int, haystack_ids=None, preamble: bool = True, keys: int = 4) -> T.Case:
    rnd = random.Random(seed)
    ks = _keys(rnd, keys)
    vals = [_number(rnd) for _ in ks]
    names = ", ".join(ks[:-1]) + " and " + ks[-1]
    question = (f"\nWhat are all the special magic numbers for {names} mentioned in the provided text? "
                f"The special magic numbers for {names} mentioned in the provided text are")
    ids = _prompt(tok, rnd, n_tokens, INTRO, [_needle(k, v) for k, v in zip(ks, vals)], question, haystack_ids,
                  preamble)
    return T.Case(ids, vals, 12 * keys)


def vartrack(tok, n_tokens: int, seed: int, haystack_ids=None, preamble: bool = True, hops: int = 4) -> T.Case:
    rnd = random.Random(seed)
    names = set()
    while len(names) < hops + 1:
        names.add("".join(rnd.choice(string.ascii_uppercase) for _ in range(5)))
    names = sorted(names, key=lambda k: rnd.random())
    value = _number(rnd)
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    # The chain keeps its order through the context (each assignment after the one it copies).
    depths = sorted(rnd.random() for _ in chain)
    prefix = T.bos(tok) + (T.encode(tok, VT_INTRO) if preamble else [])
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                f"are assigned the value {value}, they are:")
    inserts = [(d, T.encode(tok, s)) for d, s in zip(depths, chain)]
    ids = T.fill(prefix, _filler(tok, rnd, haystack_ids), inserts, T.encode(tok, question), n_tokens)
    return T.Case(ids, names, 8 * (hops + 1))


BUILDERS = dict(multikey=multikey, multivalue=multivalue, multiquery=multiquery, vartrack=vartrack)


def case(task: str, tok, n_tokens: int, seed: int, haystack_ids=None, preamble: bool = True, **_) -> T.Case:
    if task not in BUILDERS:
        raise ValueError(f"unknown RULER-style task {task!r}; choose from {TASKS}")
    return BUILDERS[task](tok, n_tokens, seed, haystack_ids=haystack_ids, preamble=preamble)
