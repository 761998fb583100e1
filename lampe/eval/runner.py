"""The evaluation grid: methods x lengths (x depths x samples), one JSON record per finished
cell in ``records.jsonl`` (so ``resume`` continues an interrupted run), then a Markdown table and
PNG plots.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from . import methods as M
from . import tasks as T


class Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, desc: str):
        self.n, self.total, self.desc, self.t0 = 0, total, desc, time.time()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, note: str = ""):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.desc}] {self.n}/{self.total} {time.time() - self.t0:6.1f}s {note}", file=sys.stderr,
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _key(rec: dict) -> tuple:
    return (rec["task"], rec["method"], rec["length"], rec.get("depth"), rec.get("sample"))


def load_records(path: str) -> list:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _seed(length: int, depth, sample: int) -> int:
    """The same prompts for every method: the seed depends on the cell, not on the method."""
    return 1000003 * sample + 7919 * length + int(1000 * (depth or 0))


def run_grid(model, tok, *, out_dir: str, tasks: Sequence[str] = ("passkey",), methods: Sequence[str] = M.METHODS,
             lengths: Sequence[int], depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 5,
             text_ids: Optional[Sequence[int]] = None, haystack_ids: Optional[Sequence[int]] = None,
             ppl_last: int = 256, preamble: bool = False, resume: bool = True, model_name: str = "model") -> list:
    """Run every (task, method, length, depth, sample) cell not already in out_dir/records.jsonl."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "records.jsonl")
    done = {_key(r) for r in load_records(path)} if resume else set()
    if not resume and os.path.exists(path):
        os.remove(path)
    cells = []
    for task in tasks:
        for method in methods:
            for L in lengths:
                if task in ("passkey", "needle"):
                    cells += [(task, method, L, d, s) for d in depths for s in range(samples)]
                elif task == "perplexity":
                    cells += [(task, method, L, None, s) for s in range(max(1, samples // 2))]
                else:
                    raise ValueError(f"unknown task {task!r} (passkey, needle, perplexity)")
    todo = [c for c in cells if c not in done]
    bar = Progress(len(todo), f"{model_name}")
    # One method setup per (method, length): group the cells.
    groups = defaultdict(list)
    for c in todo:
        groups[(c[1], c[2])].append(c)
    with open(path, "a") as fh:
        for (method, L), group in groups.items():
            with M.apply(model, method, L):
                for task, _, _, depth, sample in group:
                    t0 = time.time()
                    seed = _seed(L, depth, sample)
                    if task == "passkey":
                        r = T.passkey(model, tok, L, depth, seed=seed, preamble=preamble)
                    elif task == "needle":
                        r = T.needle(model, tok, haystack_ids, L, depth, seed=seed)
                    else:
                        r = T.perplexity(model, tok, text_ids, L, min(ppl_last, L - 1), offset=104729 * (sample + 1))
                    rec = dict(task=task, method=method, length=L, depth=depth, sample=sample, model=model_name,
                               seconds=round(time.time() - t0, 3), **r)
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    bar.update(f"{task} {method} L={L}")
    bar.close()
    return load_records(path)


def summarize(records: Iterable[dict]) -> dict:
    """task -> method -> length -> (accuracy or perplexity)."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        v = float(r["correct"]) if r["task"] in ("passkey", "needle") else r["loss"]
        acc[r["task"]][r["method"]][r["length"]].append(v)
    out = {}
    for task, by_m in acc.items():
        out[task] = {}
        for m, by_l in by_m.items():
            if task == "perplexity":
                out[task][m] = {L: math.exp(sum(v) / len(v)) for L, v in by_l.items()}
            else:
                out[task][m] = {L: sum(v) / len(v) for L, v in by_l.items()}
    return out


def markdown(summary: dict, window: int) -> str:
    lines = []
    for task, by_m in summary.items():
        lengths = sorted({L for v in by_m.values() for L in v})
        unit = "accuracy" if task != "perplexity" else "perplexity"
        lines.append(f"### {task} ({unit})\n")
        lines.append("| method | " + " | ".join(f"{L} ({L / window:g}x)" for L in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for m, by_l in by_m.items():
            cells = []
            for L in lengths:
                v = by_l.get(L)
                cells.append("-" if v is None else (f"{v:.0%}" if task != "perplexity" else f"{v:.2f}"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plots(records: list, out_dir: str, window: int) -> list:
    """Accuracy heatmaps (method x length) and perplexity curves; PNG files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    summary = summarize(records)
    written = []
    for task, by_m in summary.items():
        lengths = sorted({L for v in by_m.values() for L in v})
        names = list(by_m)
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 0.8 + 0.45 * len(names)))
        if task == "perplexity":
            for m in names:
                xs = [L for L in lengths if L in by_m[m]]
                ax.plot([L / window for L in xs], [by_m[m][L] for L in xs], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("input length / pretrained window")
            ax.set_ylabel("perplexity of the last tokens")
            ax.legend(fontsize=8)
        else:
            import numpy as np
            grid = np.array([[by_m[m].get(L, np.nan) for L in lengths] for m in names])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{L / window:g}x" for L in lengths])
            ax.set_yticks(range(len(names)), names)
            for i in range(len(names)):
                for j in range(len(lengths)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center",
                                color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
            ax.set_xlabel("input length / pretrained window")
        ax.set_title(task)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{task}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
