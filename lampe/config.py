"""LampeConfig: the user-facing settings of LaMPE, validated on construction."""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Optional, Union

from . import _C

#: The authors' RoPE amplitude s = 1 + 0.1 ln 2: every logit of a LaMPE row is scaled by s^2.
DEFAULT_TEMPERATURE = 1.0 + 0.1 * math.log(2.0)
#: Mapping-length presets with the authors' scaled-sigmoid constants (spec §4).
PRESETS = ("llama2", "llama3", "mistral", "llama3.1")
MODES = ("lampe", "selfextend", "rerope")
DECODES = ("shifted", "authors")
# Spellings of earlier releases, accepted for one more release with a DeprecationWarning.
_OLD_MODES = {"reference": "lampe"}
_OLD_DECODES = {"reference": "authors"}
MAX_LENGTH = _C.MAX_LENGTH


def _choice(name, value, choices, old):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value in old:
        warnings.warn(f"{name}={value!r} is deprecated; it is now spelled {name}={old[value]!r}",
                      DeprecationWarning, stacklevel=4)  # _choice, __post_init__, __init__, the caller
        return old[value]
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_int(name, value, minimum=1, maximum=MAX_LENGTH):
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_real(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_count(name, value, minimum, maximum=MAX_LENGTH):
    """An int field that may arrive as an integral float (the torch op carries the sigmoid as float[])."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        f = float(value)
        if not (math.isfinite(f) and f.is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value}")
        value = int(f)
    return _check_int(name, value, minimum, maximum)


@dataclass(frozen=True)
class MappingSigmoid:
    """A scaled sigmoid U(L) = int(lmax / (1 + exp(-(a L + b)))) (spec §4), e.g. fitted by
    lampe.calibrate; lengths below ``threshold`` use ``below``. Usable as a mapping_length.

    Every field is checked on construction (TypeError or ValueError naming it):

    - ``a`` finite and >= 0: U must not shrink as the input grows (a = 0 is a constant U);
    - ``b`` finite, any sign;
    - ``lmax`` finite, 1 <= lmax <= 2^24: the ceiling of U, which is always between 1 and the
      longest supported length;
    - ``threshold`` a whole number in 0 .. 2^24 (0: no threshold);
    - ``below`` a whole number: 1 .. 2^24 when ``threshold`` > 0 (it is the U of shorter
      inputs), and 0 when there is no threshold (it would never be used).

    Whole numbers may be given as integral floats (8192.0). U(L) is clamped to 1 .. 2^24 exactly
    as the C planner does, and never raises for a valid sigmoid at any length.
    """

    a: float
    b: float
    lmax: float
    threshold: int = 0
    below: int = 0

    def __post_init__(self):
        object.__setattr__(self, "a", _check_real("a", self.a, minimum=0.0))
        object.__setattr__(self, "b", _check_real("b", self.b))
        object.__setattr__(self, "lmax", _check_real("lmax", self.lmax, minimum=1.0, maximum=float(MAX_LENGTH)))
        object.__setattr__(self, "threshold", _check_count("threshold", self.threshold, minimum=0))
        if self.threshold:
            object.__setattr__(self, "below", _check_count("below", self.below, minimum=1))
        elif _check_count("below", self.below, minimum=0) != 0:
            raise ValueError(f"below={self.below} needs a threshold > 0 (it is the mapping length of inputs "
                             f"shorter than the threshold)")
        else:
            object.__setattr__(self, "below", 0)

    def __call__(self, length: int) -> int:
        if self.threshold and length < self.threshold:
            return self.below
        z = -(self.a * length + self.b)
        # math.exp raises where C's exp returns inf; lmax / (1 + inf) = 0, clamped to 1 below.
        u = self.lmax / (1.0 + math.exp(z)) if z < 709.0 else 0.0
        return int(min(max(u, 1.0), MAX_LENGTH))


@dataclass(frozen=True)
class LampeConfig:
    """Settings of LaMPE attention.

    window: H, the local window that keeps true positions (spec §2.1: H + 1 keys in prompt rows).
    sink: T, the requested sink ("tail"); the planner extends it to the end of its chunk (R).
    mapping_length: U as an int, a preset name ("llama2", "llama3", "mistral", "llama3.1") whose
        scaled sigmoid picks U from the prompt length, or "auto" (the generic rule scaled from
        ``pretrained_window``; see docs/mapping_length.md).
    mode: "lampe" is LaMPE and reproduces the authors' prefill, duplicated boundary keys
        included (spec §0-§2). "selfextend" and "rerope" are the baselines SelfExtend (Jin et al.
        2024) and ReRoPE (Su 2023) as position policies over the same kernels (spec §3):
        ``window`` is their neighbour window, and for SelfExtend ``mapping_length`` is the group
        size G (see :meth:`selfextend`, :meth:`rerope`). The old spelling "reference" is accepted
        with a DeprecationWarning and becomes "lampe".
    temperature: the RoPE amplitude s (cos and sin are multiplied by s; logits by s^2).
    decode: "shifted" (lampe's exact partition for every row after the prompt, spec §0) or
        "authors" (the authors' kpos = m[j], spec §2.3; only ``Plan.table``/``regions`` support it
        and only for the first ``window`` steps). The old spelling "reference" is accepted with a
        DeprecationWarning and becomes "authors".
    active_from: used by model patching: LaMPE runs only once the total length exceeds it;
        None means "whenever L >= 2H".
    pretrained_window: the model's pretraining context, needed by mapping_length="auto".
    growth_from: used by model patching: a sequence whose prompt (its first forward pass) was at
        most active_from tokens keeps the model's own attention while it grows by generation, until
        its total length exceeds growth_from; None means active_from. Switching mid-answer costs
        retrieval accuracy, so lampe.patch's defaults wait until 1.5 W (docs/results.md, "Do no harm").
    """

    window: int = 512
    sink: int = 200
    mapping_length: Union[int, str, "MappingSigmoid"] = 1536
    mode: str = "lampe"
    temperature: float = DEFAULT_TEMPERATURE
    decode: str = "shifted"
    active_from: Optional[int] = None
    pretrained_window: Optional[int] = None
    growth_from: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "window", _check_int("window", self.window))
        object.__setattr__(self, "sink", _check_int("sink", self.sink))
        u = self.mapping_length
        if isinstance(u, MappingSigmoid):
            pass
        elif isinstance(u, str):
            if u not in PRESETS and u != "auto":
                raise ValueError(f"mapping_length: unknown preset {u!r}; expected an int, one of {PRESETS} or 'auto'")
        else:
            object.__setattr__(self, "mapping_length", _check_int("mapping_length", u))
        object.__setattr__(self, "mode", _choice("mode", self.mode, MODES, _OLD_MODES))
        object.__setattr__(self, "decode", _choice("decode", self.decode, DECODES, _OLD_DECODES))
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(self.temperature).__name__}")
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature}")
        object.__setattr__(self, "temperature", t)
        if self.active_from is not None:
            object.__setattr__(self, "active_from", _check_int("active_from", self.active_from, minimum=0))
        if self.growth_from is not None:
            object.__setattr__(self, "growth_from", _check_int("growth_from", self.growth_from, minimum=0))
        if self.pretrained_window is not None:
            object.__setattr__(self, "pretrained_window",
                               _check_int("pretrained_window", self.pretrained_window, minimum=16))

    def mapping_length_for(self, length: int) -> int:
        """The mapping length U this config uses for a prompt of ``length`` tokens."""
        u = self.mapping_length
        if isinstance(u, int):
            return u
        if isinstance(u, MappingSigmoid):
            return u(length)
        if u == "auto":
            if self.pretrained_window is None:
                raise ValueError("mapping_length='auto' needs pretrained_window (the model's pretraining context)")
            return mapping_length(length, "auto", pretrained_window=self.pretrained_window)
        return mapping_length(length, u)

    @classmethod
    def paper(cls, pretrained_window: Optional[int] = None, mapping_length: Union[int, str, None] = None,
              **changes) -> "LampeConfig":
        """The authors' settings: window 512, sink 200, LaMPE whenever L >= 2H (active_from=0).

        For models pretrained on fewer than 4096 tokens the window and sink keep the ratios of the
        authors' smallest-window model, Llama 2 at 4K (W/8 and W*200/4096, at least 1 token).
        ``mapping_length`` defaults to the generic rule when ``pretrained_window`` is known, else
        the fixed 1536 of the authors' LongBench runs."""
        window, sink = paper_sizes(pretrained_window) if pretrained_window else (512, 200)
        if mapping_length is None:
            mapping_length = "auto" if pretrained_window else 1536
        base = dict(window=window, sink=sink, mapping_length=mapping_length, active_from=0,
                    pretrained_window=pretrained_window)
        base.update(changes)
        return cls(**base)

    @classmethod
    def selfextend(cls, window: int, group: int, **changes) -> "LampeConfig":
        """SelfExtend: true positions within ``window``, floor(pos / group) beyond (no temperature)."""
        return cls(**dict(dict(window=window, sink=1, mapping_length=group, mode="selfextend", temperature=1.0,
                               active_from=0), **changes))

    @classmethod
    def rerope(cls, window: int, **changes) -> "LampeConfig":
        """ReRoPE: true positions within ``window``; every farther key at relative position ``window``."""
        return cls(**dict(dict(window=window, sink=1, mapping_length=1, mode="rerope", temperature=1.0,
                               active_from=0), **changes))

    def replace(self, **changes) -> "LampeConfig":
        return replace(self, **changes)


def paper_sizes(pretrained_window: int):
    """(window, sink) of the paper for a model pretrained on ``pretrained_window`` tokens: the
    authors used 512 and 200 for every model they ran (4K to 128K windows). Below 4K lampe keeps
    the ratios of their smallest-window model, Llama 2 (W = 4096): window W/8, sink W*200/4096."""
    W = int(pretrained_window)
    if W >= 4096:
        return 512, 200
    return max(1, W * 512 // 4096), max(1, W * 200 // 4096)


def mapping_length(length: int, preset: str, pretrained_window: Optional[int] = None) -> int:
    """U for a prompt of ``length`` tokens under a scaled-sigmoid preset (spec §4), or "auto"."""
    length = _check_int("length", length)
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a str, got {type(preset).__name__}")
    if preset == "auto":
        if pretrained_window is None:
            raise ValueError("preset 'auto' needs pretrained_window")
        return _C.mapping_length(length, preset, _check_int("pretrained_window", pretrained_window, minimum=16))
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {PRESETS} or 'auto'")
    return _C.mapping_length(length, preset)
