"""Pinning, timing and noise accounting shared by the benchmarks (torch optional)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

#: The CPUs this process may use when it starts; benchmarks pin to a prefix of this list.
ORIG_CPUS = sorted(os.sched_getaffinity(0))


def pin(nthreads: int) -> list:
    """Restrict the whole process (every existing thread, and so every thread created later) to
    the first ``nthreads`` CPUs of the original mask, and size torch's pool to match when torch is
    loaded. Setting only the calling thread would leave already-running pool threads (torch's
    OpenMP workers, lampe's workers) free to float onto other CPUs."""
    cpus = ORIG_CPUS[:nthreads]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # a thread that exited meanwhile
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(nthreads)
    return cpus


def cpu_snapshot(cpus=None):
    """(busy ticks of ``cpus``, total ticks of ``cpus``, ticks of this process) from /proc, where
    ``cpus`` defaults to this process's current affinity. This process runs only on those CPUs, so
    busy - own over an interval is what *other* processes (or the hypervisor, as steal) took from
    the CPUs the benchmark was using; load on CPUs it was not using does not count."""
    if cpus is None:
        cpus = os.sched_getaffinity(0)
    want = {f"cpu{c}" for c in cpus}
    try:
        busy = total = 0
        with open("/proc/stat") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0] in want:
                    v = [int(x) for x in parts[1:9]]
                    b = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
                    busy += b
                    total += b + v[3] + v[4]  # + idle iowait
        with open("/proc/self/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return busy, total, int(f[11]) + int(f[12]), frozenset(cpus)  # utime + stime of all threads
    except (OSError, ValueError, IndexError):
        return None


def foreign_pct(before, after):
    """Percent of the CPU time of the benchmark's CPUs that other processes took between two
    snapshots (taken on the same CPU set): a noise flag, since the benchmarks assume those CPUs
    are their own."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    other = (after[0] - before[0]) - (after[2] - before[2])
    return min(100.0, max(0.0, 100.0 * other / (after[1] - before[1])))


def wait_idle(max_seconds: float, max_pct: float = 10.0, window: float = 0.5):
    """Wait (at most ``max_seconds``) until other processes use under ``max_pct`` of this process's
    CPUs over a ``window``-second sample; returns the last sample (None without /proc). For shared
    machines, where a compile running beside the benchmark halves what it measures."""
    deadline = time.monotonic() + max_seconds
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        pct = foreign_pct(before, cpu_snapshot(before[3]) if before else None)
        if pct is None or pct < max_pct or time.monotonic() >= deadline:
            return pct


def default_reps(first_s: float) -> int:
    """Fewer repetitions for long calls: the spread of a multi-second call is small, and a 32K
    prompt takes minutes."""
    if first_s < 0.05:
        return 15
    if first_s < 0.5:
        return 9
    if first_s < 5.0:
        return 5
    return 3


#: A sample counts as clean when other processes took less than this % of its CPUs during it.
CLEAN_PCT = 10.0
#: Per-sample noise accounting needs enough clock ticks (10 ms each) to mean anything.
MIN_SAMPLE_FOR_FLAG_S = 0.2


def time_interleaved(contenders, warmup: int, reps=None, wait_s: float = 0.0) -> dict:
    """Time several contenders round-robin: warm-up calls for each, then repetition r of every
    contender before repetition r + 1 of any. On a machine shared with other work a burst of
    foreign load then lands on all contenders alike instead of on whichever ran during it, which
    keeps their ratios honest.

    ``contenders``: (name, fn, setup) with ``setup`` (or None) run untimed before each call (e.g.
    re-pinning to a thread count). Returns name -> dict(median_s, samples, other_pcts, other_pct,
    clean, out): ``median_s`` is the median of the clean samples (other% < CLEAN_PCT) when samples
    are long enough to judge and at least one is clean, else of all (``clean`` False then);
    ``out`` is the result of the last call. ``wait_s``: wait up to that long for quiet CPUs before
    each timed call, until one wait runs out (then the machine is busy and the rest go ahead)."""
    res = {name: dict(samples=[], other_pcts=[], out=None, first=None, agg=[0, 0, 0]) for name, _, _ in contenders}

    waiting = [wait_s]

    def call(name, fn, setup, timed):
        r = res[name]
        if setup is not None:
            setup()
        if timed and waiting[0]:
            pct = wait_idle(waiting[0])
            if pct is not None and pct >= CLEAN_PCT:
                waiting[0] = 0  # the machine stays busy: waiting before every call would only add hours
        r["out"] = None  # free the previous output before making the next one
        s0 = cpu_snapshot()
        t0 = time.perf_counter()
        r["out"] = fn()
        t = time.perf_counter() - t0
        s1 = cpu_snapshot(s0[3]) if s0 is not None else None
        if not timed:
            r["first"] = t
            return
        r["samples"].append(t)
        r["other_pcts"].append(foreign_pct(s0, s1))
        if s0 is not None and s1 is not None:
            for i in range(3):
                r["agg"][i] += s1[i] - s0[i]

    for name, fn, setup in contenders:
        for _ in range(warmup):
            call(name, fn, setup, False)
    n = reps
    if n is None and warmup:
        n = default_reps(max(res[name]["first"] for name, _, _ in contenders))
    done = 0
    while n is None or done < n:
        for name, fn, setup in contenders:
            call(name, fn, setup, True)
        done += 1
        if n is None:  # no warm-up: the first round decides, and counts
            n = default_reps(max(res[name]["samples"][0] for name, _, _ in contenders))
    for name, _, _ in contenders:
        r = res[name]
        b, tot, me = r.pop("agg")
        r["other_pct"] = min(100.0, max(0.0, 100.0 * (b - me) / tot)) if tot > 0 else None
        judge = min(r["samples"]) >= MIN_SAMPLE_FOR_FLAG_S and all(p is not None for p in r["other_pcts"])
        clean = [t for t, p in zip(r["samples"], r["other_pcts"]) if judge and p < CLEAN_PCT]
        if judge:
            r["clean"] = bool(clean)
            r["median_s"] = statistics.median(clean or r["samples"])
        else:  # short calls: one tick is 10 ms, so judge the whole case instead of each sample
            r["clean"] = r["other_pct"] is not None and r["other_pct"] < CLEAN_PCT
            r["median_s"] = statistics.median(r["samples"])
        r["n_clean"] = len(clean) if judge else None
        r.pop("first")
    return res


def fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def write_json(path: str, result: dict) -> None:
    """Write through a temp file so an interrupted run never leaves a half-written result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)
