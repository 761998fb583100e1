"""lampe.calibrate: fit the length-aware mapping length of a new model (the paper's procedure).

For each input length L, scan candidate mapping lengths U, keep the one with the lowest
perplexity on the last tokens of real text, then fit the scaled sigmoid
U(L) = Lmax / (1 + exp(-(a L + b))) to the best (L, U) pairs (see fit_sigmoid).

Each scan point is one forward pass at length L (minutes at 16K on a CPU): ``log`` names a JSON
Lines file where every point is written as it finishes and read back on the next call, so an
interrupted calibration continues where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np

from ..config import MappingSigmoid
from ..hf.patching import default_config, patch, pretrained_window
from . import tasks as T

#: Candidate mapping lengths, as fractions of the pretrained window W.
CANDIDATES = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)


def calibrate(model, text, lengths: Sequence[int], tokenizer=None, candidates: Optional[Sequence[float]] = None,
              last: int = 128, windows: int = 2, lmax: Optional[float] = None, log: Optional[str] = None,
              **overrides):
    """Return (config, report): a LampeConfig whose mapping_length is the fitted MappingSigmoid,
    and per-length scan results (with the process CPU seconds each point took).

    ``text`` is a string (needs ``tokenizer``) or token ids; ``candidates`` are fractions of the
    pretrained window W (default :data:`CANDIDATES`); ``lmax`` fixes the sigmoid's ceiling (with
    few lengths the three-parameter fit is degenerate: two lengths put Lmax at about the largest
    best U); ``log`` is a JSON Lines file of finished scan points (read back to resume);
    ``overrides`` are LampeConfig fields applied on top of the model's defaults."""
    W = pretrained_window(model.config)
    ids = list(text) if not isinstance(text, str) else T.tokenize_text(tokenizer, text)
    fracs = candidates or CANDIDATES
    base = default_config(model.config, **overrides)
    done = {}
    if log and os.path.exists(log):
        with open(log) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    done[(r["length"], r["mapping_length"], r["window"])] = r
    report = []
    for L in lengths:
        scan = []
        for f in fracs:
            U = max(1, int(round(f * W)))
            points = []
            for k in range(windows):
                r = done.get((L, U, k))
                if r is None:
                    t0, c0 = time.time(), time.process_time()
                    h = patch(model, base.replace(mapping_length=U))
                    try:
                        loss = T.perplexity(model, tokenizer, ids, L, min(last, L - 1), offset=7919 * (k + 1))["loss"]
                    finally:
                        h.remove()
                    r = dict(length=L, mapping_length=U, window=k, loss=loss, seconds=round(time.time() - t0, 2),
                             cpu_seconds=round(time.process_time() - c0, 2))
                    if log:
                        with open(log, "a") as fh:
                            fh.write(json.dumps(r) + "\n")
                points.append(r)
            scan.append(dict(mapping_length=U, ppl=math.exp(float(np.mean([p["loss"] for p in points]))),
                             cpu_seconds=sum(p["cpu_seconds"] for p in points)))
        best = min(scan, key=lambda x: x["ppl"])
        report.append(dict(length=L, best_mapping_length=best["mapping_length"], best_ppl=best["ppl"], scan=scan))
    sig = fit_sigmoid([r["length"] for r in report], [r["best_mapping_length"] for r in report], lmax=lmax)
    return base.replace(mapping_length=sig), report


def fit_sigmoid(lengths: Sequence[int], best: Sequence[int], lmax: Optional[float] = None) -> MappingSigmoid:
    """Least-squares scaled sigmoid through (length, best U) points: for each candidate Lmax
    above the largest U (or the given ``lmax``), a and b by linear regression on the logit (a
    constant when the best U falls with L: a sigmoid may not decrease); keep the Lmax whose curve
    is closest to the points."""
    L = np.asarray(lengths, dtype=np.float64)
    U = np.asarray(best, dtype=np.float64)
    if lmax is not None and not float(lmax) > float(U.max()):
        raise ValueError(f"lmax ({lmax}) must exceed the largest best mapping length ({U.max():g})")
    if len(L) < 2 or np.ptp(L) == 0:
        top = float(lmax) if lmax is not None else float(U.max()) * 2.0
        return MappingSigmoid(a=0.0, b=float(np.log(U.mean() / (top - U.mean()))), lmax=top)
    tops = [float(lmax)] if lmax is not None else float(U.max()) * np.geomspace(1.01, 4.0, 200)
    best_fit = None
    for top in tops:
        z = np.log(U / (top - U))
        a, b = np.polyfit(L, z, 1)
        if a < 0:  # U must not shrink as inputs grow (MappingSigmoid requires a >= 0): a constant fits best
            a, b = 0.0, float(z.mean())
        err = float(np.sum((top / (1.0 + np.exp(-(a * L + b))) - U) ** 2))
        if best_fit is None or err < best_fit[0]:
            best_fit = (err, float(a), float(b), float(top))
    _, a, b, top = best_fit
    return MappingSigmoid(a=a, b=b, lmax=top)
