"""lampe.calibrate: fit the length-aware mapping length of a new model (the paper's procedure).

For each input length L, scan candidate mapping lengths U, keep the one with the lowest
perplexity on the last tokens of real text, then fit the scaled sigmoid
U(L) = Lmax / (1 + exp(-(a L + b))) to the best (L, U) pairs: Lmax a little above the largest
best U, then a and b by least squares on the logit log(U / (Lmax - U)) = a L + b.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..config import LampeConfig, MappingSigmoid
from ..hf.patching import default_config, patch, pretrained_window
from . import tasks as T


def calibrate(model, text, lengths: Sequence[int], tokenizer=None, candidates: Optional[Sequence[float]] = None,
              last: int = 128, windows: int = 2, **overrides):
    """Return (config, report): a LampeConfig whose mapping_length is the fitted MappingSigmoid,
    and per-length scan results. ``text`` is a string (needs ``tokenizer``) or token ids;
    ``candidates`` are fractions of the pretrained window W (default 0.05 .. 0.9)."""
    W = pretrained_window(model.config)
    ids = list(text) if not isinstance(text, str) else T.tokenize_text(tokenizer, text)
    fracs = candidates or (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)
    base = default_config(model.config, **overrides)
    report = []
    for L in lengths:
        scan = []
        for f in fracs:
            U = max(1, int(round(f * W)))
            h = patch(model, base.replace(mapping_length=U))
            try:
                loss = np.mean([T.perplexity(model, tokenizer, ids, L, min(last, L - 1), offset=7919 * (k + 1))["loss"]
                                for k in range(windows)])
            finally:
                h.remove()
            scan.append((U, float(loss)))
        best_u, best_loss = min(scan, key=lambda x: x[1])
        report.append(dict(length=L, best_mapping_length=best_u, best_ppl=math.exp(best_loss),
                           scan=[dict(mapping_length=u, ppl=math.exp(v)) for u, v in scan]))
    sig = fit_sigmoid([r["length"] for r in report], [r["best_mapping_length"] for r in report])
    return base.replace(mapping_length=sig), report


def fit_sigmoid(lengths: Sequence[int], best: Sequence[int]) -> MappingSigmoid:
    L = np.asarray(lengths, dtype=np.float64)
    U = np.asarray(best, dtype=np.float64)
    lmax = float(U.max()) * 1.05 + 1.0
    y = np.log(U / (lmax - U))
    if len(L) >= 2 and np.ptp(L) > 0:
        a, b = np.polyfit(L, y, 1)
    else:
        a, b = 0.0, float(y[0])
    return MappingSigmoid(a=float(a), b=float(b), lmax=lmax)
