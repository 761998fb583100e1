"""The planner against the worked examples and tables of docs/spec.md, and its properties."""
import numpy as np
import pytest

import lampe
from spec_examples import CONFIGS


def cfg_of(ex, decode="shifted"):
    return lampe.LampeConfig(window=ex["H"], sink=ex["T"], mapping_length=ex["U"], decode=decode)


def as_rows(regions):
    return [(r.name, r.key_lo, r.key_hi, r.qpos, r.kpos.tolist(), (r.qpos - r.kpos).tolist()) for r in regions]


def expected(rows):
    return [(n, lo, hi, q, list(k), list(rel)) for n, lo, hi, q, k, rel in rows]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_plan_scalars(name):
    ex = CONFIGS[name]
    p = lampe.plan(ex["L"], cfg_of(ex))
    assert p.mapped_ids.tolist() == ex["m"]
    assert (p.sink_size, p.bias_map, p.bias_sink, p.fallback) == (ex["R"], ex["b1"], ex["b2"], ex["fallback"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_prompt_rows(name):
    ex = CONFIGS[name]
    p = lampe.plan(ex["L"], cfg_of(ex))
    assert sorted(ex["prompt"]) == list(range(ex["L"]))
    for i, rows in ex["prompt"].items():
        assert as_rows(p.regions(i)) == expected(rows), f"row {i}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_decode_rows(name):
    ex = CONFIGS[name]
    shifted = lampe.plan(ex["L"], cfg_of(ex))
    authors = lampe.plan(ex["L"], cfg_of(ex, decode="authors"))
    for D, rows in ex["shifted"].items():
        assert as_rows(shifted.regions(ex["L"] + D - 1)) == expected(rows), f"shifted D={D}"
    for D, rows in ex["decode"].items():
        if rows == "error":
            with pytest.raises(ValueError, match="decode='authors'"):
                authors.regions(ex["L"] + D - 1)
        else:
            assert as_rows(authors.regions(ex["L"] + D - 1)) == expected(rows), f"decode D={D}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_duplicates(name):
    ex = CONFIGS[name]
    t = lampe.plan(ex["L"], cfg_of(ex)).table()
    short = {"local": "H", "map": "M", "sink": "T", "full": "F"}
    seen = {}
    for q, k, r in zip(t["query"], t["key"], t["region"]):
        seen.setdefault((int(q), int(k)), []).append(short[r])
    dups = sorted((q, k, "".join(rs)) for (q, k), rs in seen.items() if len(rs) > 1)
    assert dups == sorted(ex["prefill_duplicates"])


# docs/spec.md §5: L, H, T, U, m[H], m[L-1], #(f32 != exact), R, b1, b2, map rel max, tail rel min..max
SECTION5 = [
    (8192, 512, 200, 1536, 96, 1536, 0, 202, 415, 6076, 1914, 1914, 2115),
    (32768, 512, 200, 1536, 24, 1536, 0, 213, 487, 30541, 2014, 2014, 2226),
    # §5 prints map rel max 2418 here: that is the rational m[L-1] = 1993; with the float32 id the
    # same row prescribes (m[L-1] = 1992), §2.1 gives 1992 + b1 - m[R-1] = 1992 + 449 - 24 = 2417.
    (16384, 512, 200, 1993, 62, 1992, 1, 205, 449, 13761, 2417, 2418, 2622),
    (32768, 512, 200, 4501, 70, 4501, 2, 203, 441, 27650, 4915, 4915, 5117),
    (65536, 512, 200, 4501, 35, 4501, 10, 203, 476, 60369, 4964, 4964, 5166),
    (65536, 512, 200, 6129, 47, 6129, 13, 203, 464, 58758, 6575, 6575, 6777),
    (131072, 512, 200, 6204, 24, 6204, 20, 211, 487, 124179, 6682, 6682, 6892),
    (131072, 1024, 200, 3072, 24, 3072, 9, 213, 999, 126792, 4067, 4067, 4279),
    (16384, 512, 200, 1702, 53, 1702, 0, 202, 458, 14042, 2140, 2140, 2341),
    (32768, 2048, 200, 17829, 1114, 17829, 19, 200, 933, 13914, 18654, 18654, 18853),
    (131072, 512, 200, 78864, 308, 78864, 218, 201, 203, 51924, 78947, 78947, 79147),
    (12000, 512, 200, 12000, 512, 12000, 3, 200, -1, 1, 11800, 11799, 11998),
]


@pytest.mark.parametrize("L,H,T,U,mH,mL,ndiff,R,b1,b2,map_max,tail_min,tail_max", SECTION5)
def test_spec_section5(L, H, T, U, mH, mL, ndiff, R, b1, b2, map_max, tail_min, tail_max):
    p = lampe.plan(L, lampe.LampeConfig(window=H, sink=T, mapping_length=U))
    m = p.mapped_ids
    assert (int(m[H]), int(m[-1]), p.sink_size, p.bias_map, p.bias_sink) == (mH, mL, R, b1, b2)
    exact = (np.arange(L, dtype=np.int64) * U) // (L - 1)  # the rational floor(U p / (L - 1))
    diff = m != exact
    assert int(diff.sum()) == ndiff
    assert np.all(np.abs(m - exact) <= 1)
    # the map starts one below the local window's largest distance (row H) ...
    first = {r.name: r.qpos - r.kpos for r in p.regions(H)}
    assert first["map"].tolist() == [H - 1]
    # ... and the last row spans the table's relative positions
    last = {r.name: r.qpos - r.kpos for r in p.regions(L - 1)}
    assert (last["map"].max(), last["sink"].min(), last["sink"].max()) == (map_max, tail_min, tail_max)


def f32_recipe(L, U):
    """An independent NumPy transcription of spec §1.1."""
    if L == 1:
        return np.zeros(1, dtype=np.int64)
    r = np.float32(np.float32(1.0) / np.float32(L - 1)) * np.float32(U)
    return np.floor(np.float32(r) * np.arange(L, dtype=np.float32)).astype(np.int64)


@pytest.mark.parametrize("L,U", [(1, 5), (2, 1), (16384, 1993), (131072, 6204), (100000, 99999), (5000, 12000),
                                 (2**24, 6204)])
def test_mapping_recipe_matches_numpy_float32(L, U):
    cfg = lampe.LampeConfig(window=max(1, L // 4), sink=1, mapping_length=U)
    try:
        m = lampe.plan(L, cfg).mapped_ids
    except ValueError:
        pytest.skip("configuration has no valid sink; recipe checked through _C below")
    assert np.array_equal(m, f32_recipe(L, U))


def test_mapping_recipe_long_and_known_difference():
    p = lampe.plan(16384, lampe.LampeConfig(window=512, sink=200, mapping_length=1993))
    assert p.mapped_ids[-1] == 1992  # the float32 recipe, not the rational 1993
    p = lampe.plan(2**24, lampe.LampeConfig(window=512, sink=200, mapping_length=6204))
    assert np.array_equal(p.mapped_ids, f32_recipe(2**24, 6204))


def random_configs(rng, n):
    out = []
    while len(out) < n:
        H = int(rng.integers(1, 40))
        L = int(rng.integers(1, 300))
        T = int(rng.integers(1, 60))
        U = int(rng.integers(1, 2 * L + 2))
        try:
            p = lampe.plan(L, lampe.LampeConfig(window=H, sink=T, mapping_length=U))
        except ValueError as e:
            assert "sink" in str(e)
            continue
        out.append(p)
    return out


def test_properties_prompt_rows(rng):
    for p in random_configs(rng, 150):
        L, H, R = p.length, p.window, p.sink_size
        t = p.table()
        assert np.all(np.diff(t["query"]) >= 0)
        for i in range(L):
            rows = t[t["query"] == i]
            keys, counts = np.unique(rows["key"], return_counts=True)
            assert keys.tolist() == list(range(i + 1)), "union of regions must be the causal set"
            dup_d = sorted(i - keys[counts > 1])
            if p.fallback:
                assert dup_d == []
            else:
                allowed = {H, L - R}
                assert set(dup_d) <= allowed
                assert all(c <= 3 for c in counts)
            if not p.fallback and i >= H:
                # the local window has H + 1 keys; the map continues one below its largest distance
                loc = rows[rows["region"] == "local"]
                assert len(loc) == min(i, H) + 1
                mp = rows[rows["region"] == "map"]
                if i == H:
                    assert (mp["qpos"] - mp["kpos"]).tolist() == [H - 1]


def test_properties_rows_after_prompt(rng):
    for p in random_configs(rng, 100):
        L, H, R = p.length, p.window, p.sink_size
        last = {}
        for r in p.regions(L - 1):
            for j, kp in zip(range(r.key_lo, r.key_hi + 1), r.kpos):
                d = L - 1 - j
                # drop the duplicates: the local copy at distance H, the map copy at distance L - R
                if (r.name == "local" and d == H) or (r.name == "map" and d == L - R):
                    continue
                last[d] = r.qpos - kp
        for D in (1, 2, 3, H, H + 1, 2 * H + 5, 3 * L):
            pos = L + D - 1
            t = p.table([pos])
            keys, counts = np.unique(t["key"], return_counts=True)
            assert keys.tolist() == list(range(pos + 1)) and np.all(counts == 1), "exact partition"
            for j, qp, kp in zip(t["key"], t["qpos"], t["kpos"]):
                d = pos - j
                if d < L:
                    assert qp - kp == last[d], (L, H, R, D, d)
                elif not p.fallback:
                    assert qp - kp == d - p.bias_sink
                else:
                    assert qp - kp == d


def test_regions_and_table_agree(rng):
    for p in random_configs(rng, 40):
        qs = [0, p.length - 1, p.length, p.length + 3]
        t = p.table(qs)
        rebuilt = []
        for q in qs:
            for r in p.regions(q):
                for j, kp in zip(range(r.key_lo, r.key_hi + 1), r.kpos):
                    rebuilt.append((q, j, r.name, r.qpos, int(kp)))
        assert [tuple(x) for x in t.tolist()] == rebuilt


def test_invalid_configurations():
    with pytest.raises(ValueError, match="sink"):
        lampe.plan(20, lampe.LampeConfig(window=4, sink=16, mapping_length=10))  # R = 17 > L - H
    with pytest.raises(ValueError, match="sink"):
        lampe.LampeConfig(sink=0)
    with pytest.raises(ValueError, match="sink"):
        lampe.plan(20, lampe.LampeConfig(window=4, sink=25, mapping_length=10))  # T >= L
    with pytest.raises(ValueError, match="2\\^24"):
        lampe.plan(2**24 + 1, lampe.LampeConfig())
    with pytest.raises(ValueError, match="length"):
        lampe.plan(0, lampe.LampeConfig())
    with pytest.raises(TypeError, match="length"):
        lampe.plan(3.5, lampe.LampeConfig())
    # fallback plans still report R, b1, b2 and are valid with a large sink
    p = lampe.plan(7, lampe.LampeConfig(window=4, sink=2, mapping_length=3))
    assert (p.sink_size, p.bias_map, p.bias_sink, p.fallback) == (3, 1, 1, True)
    assert lampe.plan(5, lampe.LampeConfig(window=4, sink=50, mapping_length=3)).fallback


def test_table_refuses_huge():
    p = lampe.plan(10000, lampe.LampeConfig(window=64, sink=4, mapping_length=100))
    with pytest.raises(ValueError, match="entries"):
        p.table()
    assert len(p.table([9999])) > 9999


def test_regions_argument_errors():
    p = lampe.plan(20, lampe.LampeConfig(window=4, sink=2, mapping_length=10))
    with pytest.raises(ValueError, match="position"):
        p.regions(-1)
    with pytest.raises(TypeError, match="position"):
        p.regions("3")
    with pytest.raises(TypeError):
        p.table(["a"])


# docs/spec.md §4: U at these lengths for each preset.
SIGMOID = {
    "llama2": [1536, 1536, 1283, 1500, 1702, 2028, 2239, 2423, 2473, 2488, 2489],
    "llama3": [1536, 1536, 1036, 1461, 1993, 3275, 4501, 5810, 6129, 6201, 6204],
    "mistral": [1536, 1536, 4104, 5788, 7898, 12976, 17829, 23015, 24280, 24566, 24575],
    "llama3.1": [5672, 6728, 6728, 7960, 9389, 12923, 17468, 29672, 44548, 68981, 78864],
}
SIGMOID_L = [4096, 8191, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072]


@pytest.mark.parametrize("preset", sorted(SIGMOID))
def test_mapping_length_presets(preset):
    assert [lampe.mapping_length(L, preset) for L in SIGMOID_L] == SIGMOID[preset]
    cfg = lampe.LampeConfig(mapping_length=preset)
    assert lampe.plan(16384, cfg).mapping_length == SIGMOID[preset][4]


def test_mapping_length_generic_rule():
    # The generic rule reproduces the llama3 sigmoid at W = 8192 (beyond its threshold) ...
    for L in SIGMOID_L[2:]:
        assert abs(lampe.mapping_length(L, "auto", pretrained_window=8192) - lampe.mapping_length(L, "llama3")) <= 1
    # ... and scales with the window: sensible values from 128 tokens to 128K.
    for W in (128, 256, 1024, 4096, 32768, 131072):
        us = [lampe.mapping_length(k * W, "auto", pretrained_window=W) for k in (1, 2, 4, 8, 16)]
        assert all(a <= b for a, b in zip(us, us[1:])), "non-decreasing in the input length"
        assert 0.10 * W <= us[0] <= 0.2 * W
        assert us[-1] <= 0.76 * W
    with pytest.raises(ValueError, match="pretrained_window"):
        lampe.plan(100, lampe.LampeConfig(mapping_length="auto"))
    with pytest.raises(ValueError, match="preset"):
        lampe.mapping_length(100, "llama9")
    with pytest.raises(ValueError, match="mapping_length"):
        lampe.LampeConfig(mapping_length="gpt")


@pytest.mark.parametrize("mode", ["selfextend", "rerope"])
def test_baseline_policies_relative_positions(mode, rng):
    """SelfExtend and ReRoPE from their papers, checked entry by entry on plan.table()."""
    for _ in range(20):
        w, G, L = int(rng.integers(1, 20)), int(rng.integers(1, 9)), int(rng.integers(1, 200))
        cfg = lampe.LampeConfig.selfextend(window=w, group=G) if mode == "selfextend" else lampe.LampeConfig.rerope(w)
        t = lampe.plan(L, cfg).table()
        for q, k, qp, kp in zip(t["query"], t["key"], t["qpos"], t["kpos"]):
            d = q - k
            if d < w:
                assert qp - kp == d
            elif mode == "selfextend":
                assert qp - kp == q // G + w - w // G - k // G
            else:
                assert qp - kp == w
        # an exact partition of the causal set
        assert len(t) == L * (L + 1) // 2
    with pytest.raises(ValueError, match="beyond the planned length"):
        lampe.plan(10, lampe.LampeConfig.rerope(3)).regions(10)


def test_plans_are_immutable():
    """Plans are cached and shared: neither fields nor mapped ids can change."""
    p = lampe.plan(100, lampe.LampeConfig(window=8, sink=2, mapping_length=20))
    with pytest.raises(AttributeError):
        p.length = 3
    with pytest.raises(AttributeError):
        p.sink_size = 0
    with pytest.raises(ValueError):
        p.mapped_ids[0] = 7
    with pytest.raises(ValueError):
        p.mapped_ids.setflags(write=True)
    base = p.mapped_ids
    while isinstance(getattr(base, "base", None), np.ndarray):
        base = base.base
        with pytest.raises(ValueError):
            base.setflags(write=True)
    q = lampe.plan(100, lampe.LampeConfig(window=8, sink=2, mapping_length=20))
    assert q.length == 100 and q.mapped_ids[-1] == 20
