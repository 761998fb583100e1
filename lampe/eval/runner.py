"""The evaluation grid: tasks x methods x lengths (x depths x samples), one JSON record per
finished cell in ``records.jsonl`` (so ``resume`` continues an interrupted run), then a Markdown
table and PNG plots.

Cells: a depth-controlled retrieval task (passkey, needle) has ``len(depths) x samples`` prompts
per (method, length); a RULER-style task (lampe.eval.ruler) places its needles at random depths
and has the same number of prompts; perplexity has ``windows`` windows of real text. Prompts
depend on the cell only (task, length, depth, sample), never on the method, so every method
answers the same prompts.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from . import methods as M
from . import ruler as R
from . import tasks as T

DEPTH_TASKS = ("passkey", "needle")
RETRIEVAL_TASKS = DEPTH_TASKS + R.TASKS
TEXT_TASKS = ("perplexity", "growth")
TASKS = RETRIEVAL_TASKS + TEXT_TASKS


class Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, desc: str):
        self.n, self.total, self.desc, self.t0 = 0, total, desc, time.time()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, note: str = "", n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
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


def seed(task: str, length: int, depth, sample: int) -> int:
    """The prompt's seed: the same prompts for every method (it depends on the cell only).
    Passkey and needle keep the formula of the first recorded results; the other tasks add a
    per-task constant so that two tasks never share their random draws."""
    s = 1000003 * sample + 7919 * length + int(1000 * (depth or 0))
    return s if task in DEPTH_TASKS else s + zlib.crc32(task.encode())


def ppl_offset(sample: int) -> int:
    """Where perplexity window ``sample`` starts in the text (modulo what fits)."""
    return 104729 * (sample + 1)


def cells(tasks: Sequence[str], methods: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
          samples: int, windows: Optional[int] = None) -> list:
    """Every (task, method, length, depth, sample) of the grid, in the order they run: lengths
    ascending, so an interrupted run (or one stopped by a time budget) has its short cells."""
    windows = max(1, samples // 2) if windows is None else windows
    out = []
    for L in sorted(lengths):
        for method in methods:
            for task in tasks:
                if task in DEPTH_TASKS:
                    out += [(task, method, L, d, s) for d in depths for s in range(samples)]
                elif task in R.TASKS:
                    out += [(task, method, L, None, s) for s in range(samples * len(depths))]
                elif task in TEXT_TASKS:
                    out += [(task, method, L, None, s) for s in range(windows)]
                else:
                    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return out


def build_case(task, tok, L, depth, sample, haystack_ids=None, preamble=False):
    sd = seed(task, L, depth, sample)
    if task == "passkey":
        return T.passkey_case(tok, L, depth, sd, preamble=preamble)
    if task == "needle":
        return T.needle_case(tok, L, depth, sd, haystack_ids=haystack_ids)
    return R.case(task, tok, L, sd, haystack_ids=haystack_ids, preamble=preamble)


def run_grid(model, tok, *, out_dir: str, tasks: Sequence[str] = ("passkey",), methods: Sequence[str] = M.METHODS,
             lengths: Sequence[int], depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 5,
             windows: Optional[int] = None, text_ids: Optional[Sequence[int]] = None,
             haystack_ids: Optional[Sequence[int]] = None, ruler_haystack_ids: Optional[Sequence[int]] = None,
             ppl_last: int = 256, growth_prompt: Optional[int] = None, preamble: bool = False, resume: bool = True,
             model_name: str = "model", batch: int = 1, time_budget: Optional[float] = None,
             progress: bool = True) -> list:
    """Run every cell not already in out_dir/records.jsonl and return all records.

    ``haystack_ids``: real text for the needle task; ``ruler_haystack_ids``: real text for the
    RULER-style tasks (default: their noise filler); ``growth_prompt``: the prompt length of the
    growth task (default: the pretrained window; records with another prompt length are other
    cells, so write them to another out_dir); ``batch``: prompts (or perplexity windows) generated
    together, all of one length; ``time_budget``: seconds after which no new batch starts (the
    records so far stay; rerunning continues)."""
    for m in methods:
        if M.parse(m)[0] == "lampe-calibrated" and M.calibrated_for(model.config) is None:
            raise ValueError("lampe-calibrated: no calibrated mapping length is recorded for this model "
                             "(lampe.eval.methods.CALIBRATED)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "records.jsonl")
    if not resume and os.path.exists(path):
        os.remove(path)
    done = {_key(r) for r in load_records(path)}
    grid = cells(tasks, methods, lengths, depths, samples, windows)
    too_short = set()
    for task, L in sorted({(c[0], c[2]) for c in grid if c[0] in RETRIEVAL_TASKS}):
        try:
            hay = haystack_ids if task == "needle" else ruler_haystack_ids
            build_case(task, tok, L, depths[0] if task in DEPTH_TASKS else None, 0, hay, preamble)
        except ValueError as e:
            if "too short" not in str(e):
                raise
            too_short.add((task, L))
            print(f"{task} at {L} tokens: skipped ({e})", file=sys.stderr)
    todo = [c for c in grid if c not in done and (c[0], c[2]) not in too_short]
    bar = Progress(len(todo), model_name) if progress else None
    deadline = None if time_budget is None else time.time() + float(time_budget)
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    groups = defaultdict(list)  # one method setup per (method, length)
    for c in todo:
        groups[(c[1], c[2])].append(c)
    with open(path, "a") as fh:
        for (method, L), group in groups.items():
            if deadline is not None and time.time() > deadline:
                break
            with M.apply(model, method, L) as info:
                by_task = defaultdict(list)
                for c in group:
                    by_task[c[0]].append(c)
                for task, tcells in by_task.items():
                    for i in range(0, len(tcells), max(1, batch)):
                        if deadline is not None and time.time() > deadline:
                            break
                        chunk = tcells[i:i + max(1, batch)]
                        t0, c0 = time.time(), time.process_time()
                        if task == "perplexity":
                            results = T.perplexities(model, text_ids, L, min(ppl_last, L - 1),
                                                     [ppl_offset(c[4]) for c in chunk])
                        elif task == "growth":
                            from ..hf import pretrained_window
                            results = T.growth(model, text_ids, L, growth_prompt or pretrained_window(model.config),
                                               [ppl_offset(c[4]) for c in chunk])
                        else:
                            hay = haystack_ids if task == "needle" else ruler_haystack_ids
                            cases = [build_case(task, tok, L, c[3], c[4], hay, preamble) for c in chunk]
                            results = T.run_cases(model, tok, cases)
                        wall, cpu = time.time() - t0, time.process_time() - c0
                        for c, r in zip(chunk, results):
                            rec = dict(task=task, method=method, length=L, depth=c[3], sample=c[4], model=model_name,
                                       seconds=round(wall / len(chunk), 3), cpu_seconds=round(cpu / len(chunk), 3),
                                       batch=len(chunk), device=device, dtype=dtype, backend=info["backend"], **r)
                            fh.write(json.dumps(rec) + "\n")
                        fh.flush()
                        if bar is not None:
                            bar.update(f"{task} {method} L={L}", n=len(chunk))
    if bar is not None:
        bar.close()
    return load_records(path)


def score_of(rec: dict) -> float:
    """A retrieval record's score in [0, 1] (records written before RULER tasks carry only
    ``correct``)."""
    return float(rec["score"]) if "score" in rec else float(rec["correct"])


def summarize(records: Iterable[dict], counts: bool = False) -> dict:
    """task -> method -> length -> mean score (retrieval) or perplexity (exp of the mean loss);
    with ``counts``, each value is (value, number of prompts or windows)."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        v = r["loss"] if r["task"] in TEXT_TASKS else score_of(r)
        acc[r["task"]][r["method"]][r["length"]].append(v)
    out = {}
    for task, by_m in acc.items():
        out[task] = {}
        for m, by_l in by_m.items():
            out[task][m] = {}
            for L, v in by_l.items():
                val = math.exp(sum(v) / len(v)) if task in TEXT_TASKS else sum(v) / len(v)
                out[task][m][L] = (val, len(v)) if counts else val
    return out


def markdown(summary: dict, window: int) -> str:
    """One table per task; a value given as (value, n) shows its prompt count."""
    lines = []
    for task, by_m in summary.items():
        lengths = sorted({L for v in by_m.values() for L in v})
        unit = "perplexity" if task in TEXT_TASKS else "accuracy"
        lines.append(f"### {task} ({unit})\n")
        lines.append("| method | " + " | ".join(f"{L} ({L / window:g}x)" for L in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        for m, by_l in by_m.items():
            row = []
            for L in lengths:
                v = by_l.get(L)
                if v is None:
                    row.append("-")
                    continue
                val, n = v if isinstance(v, tuple) else (v, None)
                s = f"{val:.2f}" if task in TEXT_TASKS else f"{val:.0%}"
                row.append(s if n is None else f"{s} ({n})")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _figure(**kw):
    """A matplotlib Figure that does not touch pyplot's global state or backend (so a notebook's
    inline backend is left alone); None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(**kw)


def _line_axes(ax, by_m, window, perplexity):
    for m, by_l in by_m.items():
        xs = sorted(by_l)
        ax.plot([L / window for L in xs], [by_l[L] for L in xs], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length / pretrained window")
    if perplexity:
        ax.set_yscale("log")
        ax.set_ylabel("perplexity of the last tokens")
    else:
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("accuracy")


def overview(records: list, path: str, window: int, title: str = "") -> Optional[str]:
    """One figure: accuracy of every retrieval task and perplexity against length, every method
    (one panel per task). Returns the PNG path, or None without matplotlib."""
    summary = summarize(records)
    names = [t for t in TASKS if t in summary]
    fig = _figure(figsize=(4.2 * len(names), 3.6)) if names else None
    if fig is None:
        return None
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, task in zip(axes, names):
        _line_axes(ax, summary[task], window, task in TEXT_TASKS)
        ax.set_title(task)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plots(records: list, out_dir: str, window: int, title: str = "") -> list:
    """Accuracy heatmaps (method x length) per retrieval task, perplexity curves, and the
    one-figure overview (overview.png); the PNG paths written."""
    if _figure() is None:
        return []
    import numpy as np

    summary = summarize(records)
    written = []
    for task, by_m in summary.items():
        lengths = sorted({L for v in by_m.values() for L in v})
        names = list(by_m)
        fig = _figure(figsize=(1.6 + 1.1 * len(lengths), 0.8 + 0.45 * len(names)))
        ax = fig.subplots()
        if task in TEXT_TASKS:
            _line_axes(ax, by_m, window, True)
            ax.legend(fontsize=8)
        else:
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
        written.append(p)
    p = overview(records, os.path.join(out_dir, "overview.png"), window, title)
    return written + ([p] if p else [])
