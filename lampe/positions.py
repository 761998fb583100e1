"""The position plan of one prompt: mapped ids, extended sink, offsets and per-row regions.

All arithmetic happens in the C planner (csrc/core/positions.c); this module only shapes its
answers for Python. Section numbers (§) refer to docs/spec.md.
"""
from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Optional

import numpy as np

from . import _C
from .config import LampeConfig

REGION_NAMES = ("local", "map", "sink", "full")
_DECODE_CODES = {"shifted": 0, "authors": 1}
_MODE_CODES = {"lampe": 0, "selfextend": 1, "rerope": 2}
#: plan.table() refuses to build more entries than this.
MAX_TABLE_ENTRIES = 10**7

TABLE_DTYPE = np.dtype([("query", np.int64), ("key", np.int64), ("region", "U5"), ("qpos", np.int64),
                        ("kpos", np.int64)])


class Region(NamedTuple):
    """Keys key_lo..key_hi (inclusive) of one query, seen from query position ``qpos``;
    ``kpos[j - key_lo]`` is key j's position. ``mapped``/``shift``: kpos = m[j - shift] if mapped."""

    name: str
    key_lo: int
    key_hi: int
    qpos: int
    kpos: np.ndarray
    mapped: bool
    shift: int


class Plan(_C.Plan):
    """A LaMPE plan for a prompt of ``length`` tokens (made by :func:`plan`; cached and shared, so
    immutable: no attribute can be set and ``mapped_ids`` is a read-only view of immutable
    storage). Fields: length (L), window (H), sink (T), mapping_length (U), sink_size (R),
    bias_map (b1), bias_sink (b2), fallback (L < 2H), mapped_ids (m), mode, decode. The C kernel
    reads the plan's struct directly (csrc/python/module.c)."""

    __slots__ = ("mode", "decode")

    def __new__(cls, length, window, sink, mapping_length, mode="lampe", decode="shifted"):
        self = super().__new__(cls, length, window, sink, mapping_length, _DECODE_CODES[decode], _MODE_CODES[mode])
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "decode", decode)
        return self

    def __setattr__(self, name, value):
        raise AttributeError(f"Plan is immutable (plans are cached and shared); cannot set {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"Plan is immutable (plans are cached and shared); cannot delete {name!r}")

    def __reduce__(self):
        return (Plan, (self.length, self.window, self.sink, self.mapping_length, self.mode, self.decode))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return (f"Plan(length={self.length}, window={self.window}, sink={self.sink}, "
                f"mapping_length={self.mapping_length}, sink_size={self.sink_size}, bias_map={self.bias_map}, "
                f"bias_sink={self.bias_sink}, fallback={self.fallback}, decode={self.decode!r})")

    # ------------------------------------------------------------------ queries

    def _raw(self, positions) -> np.ndarray:
        pos = np.asarray(positions)
        if pos.dtype.kind not in "iu":
            raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
        pos = np.ascontiguousarray(pos.reshape(-1), dtype=np.int64)
        return _C.regions(self, pos)

    def _kpos(self, mapped, shift, lo, hi):
        keys = np.arange(lo, hi + 1, dtype=np.int64)
        return self.mapped_ids[keys - shift] if mapped else keys

    def regions(self, position: int) -> list:
        """The regions of the query at ``position``: a prompt row if position < length, else a row
        after the prompt (spec §0). Each is a :class:`Region`; empty regions are left out."""
        if isinstance(position, bool) or not hasattr(position, "__index__"):
            raise TypeError(f"position must be an int, got {type(position).__name__}")
        raw = self._raw([int(position)])[0]
        out = []
        for kind, mapped, lo, hi, qpos, shift in raw.tolist():
            if kind < 0:
                continue
            out.append(Region(REGION_NAMES[kind], lo, hi, qpos, self._kpos(mapped, shift, lo, hi), bool(mapped),
                              shift))
        return out

    def table(self, queries: Optional[Iterable[int]] = None) -> np.ndarray:
        """Every (query, key) visit as a structured array with fields query, key, region, qpos, kpos,
        ordered by query, then region (local, map, sink, full), then key. A key seen by two regions
        appears twice. Default: all prompt rows."""
        if queries is None:
            qs = np.arange(self.length, dtype=np.int64)
        else:
            qs = np.asarray(list(queries) if not isinstance(queries, np.ndarray) else queries)
            if qs.size and qs.dtype.kind not in "iu":
                raise TypeError(f"queries must be integers, got dtype {qs.dtype}")
            qs = qs.astype(np.int64).reshape(-1)
        # Count before building: refuse a table that would not fit comfortably in memory.
        est = float(np.sum(qs.astype(np.float64) + 3))  # a row sees at most p + 1 keys, 2 twice
        if est > 2 * MAX_TABLE_ENTRIES:
            raise ValueError(f"plan.table would hold about {est} entries (more than {MAX_TABLE_ENTRIES}); "
                             "pass fewer queries or use plan.regions()")
        raw = self._raw(qs)  # [n, 3, 6]
        kind = raw[:, :, 0]
        present = kind >= 0
        lo, hi = raw[:, :, 2], raw[:, :, 3]
        counts = np.where(present, hi - lo + 1, 0)
        total = int(counts.sum())
        if total > MAX_TABLE_ENTRIES:
            raise ValueError(f"plan.table would hold {total} entries (more than {MAX_TABLE_ENTRIES}); "
                             "pass fewer queries or use plan.regions()")
        seg = counts.reshape(-1)
        keep = seg > 0
        seg = seg[keep]
        flat = raw.reshape(-1, 6)[keep]
        qrep = np.repeat(qs, LAMPE_MAX_REGIONS)[keep]
        out = np.empty(total, dtype=TABLE_DTYPE)
        starts = np.repeat(np.cumsum(seg) - seg, seg)
        within = np.arange(total, dtype=np.int64) - starts
        key = np.repeat(flat[:, 2], seg) + within
        mapped = np.repeat(flat[:, 1], seg).astype(bool)
        shift = np.repeat(flat[:, 5], seg)
        kpos = key.copy()
        if mapped.any():
            kpos[mapped] = self.mapped_ids[key[mapped] - shift[mapped]]
        out["query"] = np.repeat(qrep, seg)
        out["key"] = key
        out["region"] = np.asarray(REGION_NAMES)[np.repeat(flat[:, 0], seg)]
        out["qpos"] = np.repeat(flat[:, 4], seg)
        out["kpos"] = kpos
        return out


LAMPE_MAX_REGIONS = 3


@functools.lru_cache(maxsize=128)
def _plan_cached(length: int, config: LampeConfig) -> Plan:
    return Plan(length, config.window, config.sink, config.mapping_length_for(length), config.mode, config.decode)


def plan(length: int, config: Optional[LampeConfig] = None) -> Plan:
    """Plan LaMPE for a prompt of ``length`` tokens (spec §1-§2). Plans are cached and immutable.

    Raises ValueError naming ``sink`` when L >= 2H and the extended sink R falls outside
    [1, L - window], and for lengths above 2^24."""
    if config is None:
        config = LampeConfig()
    if not isinstance(config, LampeConfig):
        raise TypeError(f"config must be a LampeConfig, got {type(config).__name__}")
    if isinstance(length, bool) or not hasattr(length, "__index__"):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    length = int(length)
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length > _C.MAX_LENGTH:
        raise ValueError(f"length {length} is above the supported maximum 2^24 (the float32 mapping recipe is "
                         "exact only up to 2^24)")
    return _plan_cached(length, config)


class RowLayout(NamedTuple):
    """Where each batch row's keys and queries sit (every field an int64 array [B]); the kernel
    contract's lampe_attn_seq (csrc/include/lampe/lampe.h) in Python."""

    key_offset: np.ndarray   #: first valid key's tensor index (left pads)
    key_count: np.ndarray    #: valid keys from there; later slots are never attended
    query_start: np.ndarray  #: own position of query row 0 (row t has position query_start + t)
    prompt: np.ndarray       #: prompt length in own positions: rows at positions >= it come after the prompt
    prompt_given: bool       #: prompt_length was passed (False: the default, key_count)


def _int_per_row(value, batch: int, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise TypeError(f"{name} must be an int or an int64 array [B], got {arr.dtype} {arr.shape}")
    if arr.ndim == 1 and arr.shape[0] != batch:
        raise ValueError(f"{name} must have B = {batch} entries, got {arr.shape[0]}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} overflows int64")
    return np.broadcast_to(arr.astype(np.int64), (batch,)).copy()


def _padding(key_padding_mask, batch: int, kv_len: int):
    """(key_offset, key_count) from a [B, Lk] bool mask whose rows are False* True* False*."""
    if key_padding_mask is None:
        return np.zeros(batch, dtype=np.int64), np.full(batch, kv_len, dtype=np.int64)
    if hasattr(key_padding_mask, "detach"):
        key_padding_mask = key_padding_mask.detach().to("cpu").numpy()
    m = np.asarray(key_padding_mask)
    if m.dtype != np.bool_:
        raise TypeError(f"key_padding_mask must be boolean (True = valid key), got dtype {m.dtype}")
    if m.shape != (batch, kv_len):
        raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{batch}, {kv_len}], got {m.shape}")
    count = m.sum(axis=1).astype(np.int64)
    off = np.where(count > 0, np.argmax(m, axis=1), kv_len).astype(np.int64)
    idx = np.arange(kv_len)[None, :]
    run = (idx >= off[:, None]) & (idx < (off + count)[:, None])
    if not np.array_equal(run, m):
        b = int(np.argmax(np.any(run != m, axis=1)))
        raise ValueError(f"key_padding_mask row {b} has a hole: each row must be False* True* False* (left pads, "
                         "valid keys, then slots never attended such as right padding or a static cache's unused "
                         "tail)")
    return off, count


def batch_layout(batch: int, q_len: int, kv_len: int, prompt_length=None, key_padding_mask=None,
                 query_start=None) -> RowLayout:
    """Read the per-row arguments of the attention functions (shared by the reference, the C
    kernel's front end and the torch backend, so all three read them the same way).

    ``key_padding_mask`` [B, Lk] bool, True = valid, each row False* True* False*. Positions count
    from a row's first valid key. ``query_start`` (int or [B]; default Lk - Lq - key_offset, i.e.
    the queries are the last Lq positions) is the position of query row 0. ``prompt_length``
    (int or [B], in key tensor indices like Lk; default key_offset + key_count) ends the prompt: a
    row is a prompt row iff its position < prompt_length - key_offset."""
    if q_len > kv_len:
        raise ValueError(f"q has more positions ({q_len}) than k ({kv_len}); queries are the last Lq positions")
    if kv_len > _C.MAX_POSITIONS:
        raise ValueError(f"k has {kv_len} positions, above the supported maximum 2^25 = {_C.MAX_POSITIONS} "
                         "(a prompt of up to 2^24 tokens and as many after it)")
    off, count = _padding(key_padding_mask, batch, kv_len)
    if query_start is None:
        qs = kv_len - q_len - off
    else:
        qs = _int_per_row(query_start, batch, "query_start")
        if np.any(qs <= -_C.MAX_POSITIONS) or np.any(qs + q_len > _C.MAX_POSITIONS):
            raise ValueError(f"query_start must keep every query position in (-2^25, 2^25), got {qs.min()}.."
                             f"{qs.max()} for {q_len} queries")
    if prompt_length is None:
        own = count.copy()
    else:
        pl = _int_per_row(prompt_length, batch, "prompt_length")
        if np.any(pl < 1):
            raise ValueError(f"prompt_length must be >= 1, got {pl.min()}")
        if np.any(pl > kv_len):
            raise ValueError(f"prompt_length ({pl.max()}) must not exceed the number of keys ({kv_len})")
        own = pl - off
        bad = (count > 0) & (own < 1)
        if np.any(bad):
            b = int(np.argmax(bad))
            raise ValueError(f"prompt_length[{b}] = {pl[b]} does not exceed the {off[b]} padded keys of that row")
    return RowLayout(off, count, qs, own, prompt_length is not None)


def is_lampe_mode(mode: str) -> bool:
    """LaMPE itself (rows after the prompt exist), as opposed to the SelfExtend / ReRoPE baselines."""
    return _MODE_CODES[mode] == 0


def row_plans(config: Optional[LampeConfig], rows: RowLayout, q_len: int) -> list:
    """The plan of every batch row (None: plain causal attention, or no valid key). The baselines
    plan the total length: by default every row's, and an explicit prompt_length may not leave
    rows after it."""
    plans = []
    for b in range(len(rows.key_offset)):
        if config is None or rows.key_count[b] == 0:
            plans.append(None)
            continue
        length = int(rows.prompt[b])
        if not is_lampe_mode(config.mode):
            need = int(rows.query_start[b]) + q_len
            if length < need:
                if rows.prompt_given:
                    raise ValueError(f"prompt_length: mode={config.mode!r} has no rows after the prompt; every row is "
                                     "planned with the total length, so leave prompt_length at its default")
                length = need
        plans.append(plan(length, config))
    return plans
