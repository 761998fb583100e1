"""lampe.calibrate: fit the length-aware mapping length of a new model (the paper's procedure).

For each input length L, scan candidate mapping lengths U, keep the one with the lowest
perplexity on the last tokens of real text, then fit the scaled sigmoid
U(L) = Lmax / (1 + exp(-(a L + b))) to the best (L, U) pairs (see fit_sigmoid).
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
    """Least-squares scaled sigmoid through (length, best U) points: for each candidate Lmax
    above the largest U, a and b by linear regression on the logit; keep the Lmax whose curve
    is closest to the points."""
    L = np.asarray(lengths, dtype=np.float64)
    U = np.asarray(best, dtype=np.float64)
    if len(L) < 2 or np.ptp(L) == 0:
        lmax = float(U.max()) * 2.0
        return MappingSigmoid(a=0.0, b=float(np.log(U.mean() / (lmax - U.mean()))), lmax=lmax)
    best_fit = None
    for lmax in float(U.max()) * np.geomspace(1.01, 4.0, 200):
        a, b = np.polyfit(L, np.log(U / (lmax - U)), 1)
        err = float(np.sum((lmax / (1.0 + np.exp(-(a * L + b))) - U) ** 2))
        if best_fit is None or err < best_fit[0]:
            best_fit = (err, float(a), float(b), float(lmax))
    _, a, b, lmax = best_fit
    return MappingSigmoid(a=a, b=b, lmax=lmax)
