"""Kernel levels: the cap, the emulated bf16/AMX test levels, and the kernel-vs-reference grid of
tests/test_attention.py on the emulated levels (the real avx512bf16 / amx levels run that grid
through conftest's `isa` fixture wherever the CPU has them)."""
import os
import subprocess
import sys

import pytest

import lampe
from lampe import info

# the directory the tested lampe was imported from (a source tree or site-packages), for subprocesses
LAMPE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lampe.__file__)))


def test_levels_are_a_line():
    avail = lampe.available_isas()
    assert avail == list(info.ISA_LEVELS[:len(avail)]), "available levels must be a prefix of the cap order"
    assert not set(avail) & set(info.TEST_ISAS)


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa"):
        lampe.set_cpu_isa("avx1024")
    with pytest.raises(TypeError):
        lampe.set_cpu_isa(3)


def test_unavailable_level_is_refused():
    missing = [lvl for lvl in info.ISA_LEVELS if lvl not in lampe.available_isas()]
    if not missing:
        pytest.skip("this CPU has every level")
    with pytest.raises(ValueError, match="not available"):
        lampe.set_cpu_isa(missing[0])
    assert info.current_isa() == lampe.available_isas()[-1]


@pytest.mark.parametrize("cap", info.ISA_LEVELS)
def test_env_cap_picks_best_level_not_above(cap, tmp_path):
    # LAMPE_CPU_ISA caps: a level the CPU lacks runs the best one below it
    avail = lampe.available_isas()
    want = [lvl for lvl in info.ISA_LEVELS[:info.ISA_LEVELS.index(cap) + 1] if lvl in avail][-1]
    env = dict(os.environ, LAMPE_CPU_ISA=cap, PYTHONPATH=LAMPE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # cwd: a folder without lampe/ (python -c puts the cwd first on sys.path; a source tree there
    # would shadow the lampe under test)
    out = subprocess.run([sys.executable, "-c", "import lampe.info as i; print(i.current_isa())"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert out == want


@pytest.mark.skipif(not info.test_isas(), reason="the emulated levels need avx512")
def test_test_levels_selectable_and_restorable():
    best = lampe.available_isas()[-1]
    try:
        for lvl in info.TEST_ISAS:
            lampe.set_cpu_isa(lvl)
            assert info.current_isa() == lvl
    finally:
        lampe.set_cpu_isa(best)
    assert info.current_isa() == best


@pytest.fixture(params=info.test_isas() or [pytest.param(None, marks=pytest.mark.skip(reason="needs avx512"))])
def test_isa(request):
    best = lampe.available_isas()[-1]
    lampe.set_cpu_isa(request.param)
    yield request.param
    lampe.set_cpu_isa(best)


def _grid():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_attention
    return test_attention


@pytest.mark.parametrize("case", range(len(_grid().GRID)))
def test_attention_grid_on_test_levels(test_isa, rng, case):
    """Every line of test_attention's grid (bf16 lines run the bf16 panels, VDPBF16PS / AMX
    emulated), against the float64 reference with the same tolerances."""
    ta = _grid()
    B, Hq, Hkv, Lq, Lk, D, dtype, cfg, extra = ta.GRID[case]
    ta.check(rng, B, Hq, Hkv, Lq, Lk, D, dtype, cfg, **dict(extra))


@pytest.mark.parametrize("L,D,G", [(200, 128, 4), (333, 64, 3), (130, 80, 8), (97, 256, 1)])
def test_bf16_prefill_shapes_on_test_levels(test_isa, rng, L, D, G):
    """bf16 prompts long enough for the prefill panels, head dims that pad (80: 96/80 dims),
    row counts that are not multiples of the tile heights."""
    pytest.importorskip("torch")
    ta = _grid()
    cfg = lampe.LampeConfig(window=32, sink=4, mapping_length=50)
    ta.check(rng, 1, 2 * G, 2, L, L, D, "bfloat16", cfg)
    ta.check(rng, 1, G, 1, L, L, D, "bfloat16", None)
