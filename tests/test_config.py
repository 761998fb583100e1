"""LampeConfig and MappingSigmoid: validation on construction, normalisation, values."""
import math

import numpy as np
import pytest

import lampe
from lampe import MappingSigmoid

# docs/spec.md §4: the llama3 preset's constants and a few of its tabulated U(L)
LLAMA3 = dict(a=0.00010493097327094324, b=-2.466638011138158, lmax=6204.409324666837, threshold=8192, below=1536)
LLAMA3_U = {4096: 1536, 8191: 1536, 8192: 1036, 12288: 1461, 16384: 1993, 32768: 4501, 131072: 6204}

GOOD = dict(a=1e-3, b=-2.0, lmax=1000.0)


@pytest.mark.parametrize("field,value,error", [
    ("a", float("nan"), ValueError), ("a", float("inf"), ValueError), ("a", -1, ValueError), ("a", -1e-9, ValueError),
    ("a", "x", TypeError), ("a", None, TypeError), ("a", True, TypeError), ("a", 1j, TypeError),
    ("b", float("nan"), ValueError), ("b", -float("inf"), ValueError), ("b", "x", TypeError),
    ("lmax", float("nan"), ValueError), ("lmax", 0, ValueError), ("lmax", 0.5, ValueError), ("lmax", -10, ValueError),
    ("lmax", 2.0 ** 24 + 1, ValueError), ("lmax", "1000", TypeError),
    ("threshold", -1, ValueError), ("threshold", 10.5, ValueError), ("threshold", float("nan"), ValueError),
    ("threshold", "8192", TypeError), ("threshold", 2 ** 24 + 1, ValueError),
])
def test_mapping_sigmoid_rejects_bad_fields_by_name(field, value, error):
    with pytest.raises(error, match=rf"^{field}\b"):
        MappingSigmoid(**{**GOOD, field: value})


def test_mapping_sigmoid_below_goes_with_threshold():
    with pytest.raises(ValueError, match=r"^below must be >= 1"):
        MappingSigmoid(**GOOD, threshold=8192)           # U = 0 below the threshold
    with pytest.raises(ValueError, match=r"^below=1536 needs a threshold"):
        MappingSigmoid(**GOOD, below=1536)               # would silently never apply
    with pytest.raises(ValueError, match=r"^below must be <= "):
        MappingSigmoid(**GOOD, threshold=10, below=2 ** 24 + 1)
    with pytest.raises(ValueError, match=r"^below must be a whole number"):
        MappingSigmoid(**GOOD, threshold=10, below=3.5)


def test_mapping_sigmoid_normalises_numbers():
    s = MappingSigmoid(a=np.float32(0.5), b=np.int64(-1), lmax=100, threshold=8192.0, below=np.int32(7))
    assert (s.a, s.b, s.lmax, s.threshold, s.below) == (0.5, -1.0, 100.0, 8192, 7)
    assert all(type(x) is float for x in (s.a, s.b, s.lmax)) and type(s.threshold) is int and type(s.below) is int
    assert MappingSigmoid(a=0, b=0, lmax=1).a == 0.0  # a = 0: a constant mapping length


def test_mapping_sigmoid_values_match_the_spec_table():
    s = MappingSigmoid(**LLAMA3)
    assert {L: s(L) for L in LLAMA3_U} == LLAMA3_U
    cfg = lampe.LampeConfig(mapping_length=s)
    assert cfg.mapping_length_for(16384) == 1993


def test_mapping_sigmoid_saturates_instead_of_raising():
    # exp(-(aL + b)) overflows a double here; U is the clamp value, as in the C planner.
    assert MappingSigmoid(a=0, b=-800, lmax=100)(10) == 1
    assert MappingSigmoid(a=1, b=0, lmax=100)(10 ** 6) == 100
    assert MappingSigmoid(a=0, b=800, lmax=2 ** 24)(1) == 2 ** 24
    assert MappingSigmoid(a=0, b=0, lmax=3)(5) == 1  # int(1.5)


def test_mapping_sigmoid_is_frozen():
    s = MappingSigmoid(**GOOD)
    with pytest.raises(AttributeError):
        s.a = -1
    assert math.isclose(s(2000), 1000 / (1 + math.exp(0)), abs_tol=1)


# -- names (issue 12): mode "lampe" (was "reference"), decode "authors" (was "reference") ---------

def test_current_names_and_defaults():
    cfg = lampe.LampeConfig()
    assert (cfg.mode, cfg.decode) == ("lampe", "shifted")
    assert lampe.LampeConfig(decode="authors").decode == "authors"
    for mode in ("lampe", "selfextend", "rerope"):
        assert lampe.LampeConfig(mode=mode).mode == mode


def test_old_spellings_warn_and_are_normalised():
    with pytest.warns(DeprecationWarning, match=r"mode='reference' is deprecated.*mode='lampe'") as rec:
        cfg = lampe.LampeConfig(mode="reference")
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert cfg.mode == "lampe" and cfg == lampe.LampeConfig()
    with pytest.warns(DeprecationWarning, match=r"decode='reference' is deprecated.*decode='authors'"):
        cfg = lampe.LampeConfig(decode="reference")
    assert cfg.decode == "authors" and cfg == lampe.LampeConfig(decode="authors")
    with pytest.warns(DeprecationWarning):
        assert lampe.LampeConfig().replace(mode="reference").mode == "lampe"


def test_bad_names_are_refused_by_field():
    with pytest.raises(ValueError, match=r"^mode must be one of \('lampe', 'selfextend', 'rerope'\)"):
        lampe.LampeConfig(mode="LaMPE")
    with pytest.raises(ValueError, match=r"^decode must be one of \('shifted', 'authors'\)"):
        lampe.LampeConfig(decode="exact")
    with pytest.raises(TypeError, match=r"^mode must be a str"):
        lampe.LampeConfig(mode=["lampe"])
    with pytest.raises(TypeError, match=r"^decode must be a str"):
        lampe.LampeConfig(decode=None)
