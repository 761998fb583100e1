"""lampe: Length-aware Multi-grained Positional Encoding (LaMPE) for RoPE LLMs, with C kernels.

    >>> import lampe
    >>> p = lampe.plan(32768, lampe.LampeConfig(mapping_length="llama3"))
    >>> p.sink_size, p.bias_map, p.bias_sink
"""
from ._version import __version__


def _missing_extension(error):
    """One line saying what to run when the C extension cannot be imported.

    The usual cause is Python started in a checkout's root (``python -m lampe``, a notebook, a
    REPL): the current directory comes first on sys.path, so this source tree, where nothing has
    been compiled, shadows an installed lampe."""
    import importlib.machinery
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    built = [n for n in os.listdir(here)
             if n.startswith("_C.") and n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    if built:
        msg = (f"lampe's C extension {os.path.join(here, built[0])} does not load ({error}); "
               f"rebuild it: run `pip install -e .` in {root}")
    else:
        msg = (f"lampe's C extension is not built in the source tree {here}: run `pip install -e .` in {root} "
               f"(builds it in place), or start Python outside {root} to use an installed lampe")
    # name= lets `python -m lampe` report it on one line, as it does for a missing package.
    return ImportError(msg, name=__name__)


try:
    from . import _C
except ImportError as _error:
    raise _missing_extension(_error) from None

from .config import DEFAULT_TEMPERATURE, PRESETS, LampeConfig, MappingSigmoid, mapping_length
from .positions import Plan, Region, plan
from .rotary import rope
from .attention import attention
from . import reference
from .info import available_isas, set_cpu_isa, show_config


def patch(model, config=None, **kwargs):
    """Patch a transformers model so long inputs use LaMPE (see :mod:`lampe.hf`)."""
    from .hf import patch as _patch
    return _patch(model, config, **kwargs)


def patched(model, config=None, **kwargs):
    """Context manager: ``with lampe.patched(model): ...``."""
    from .hf import patched as _patched
    return _patched(model, config, **kwargs)


def calibrate(model, text, lengths, tokenizer=None, **kwargs):
    """Fit a length-aware mapping length for a new model (see :mod:`lampe.eval.calibrate`)."""
    from .eval.calibrate import calibrate as _calibrate
    return _calibrate(model, text, lengths, tokenizer=tokenizer, **kwargs)


def is_patched(model) -> bool:
    return getattr(model, "_lampe_handle", None) is not None


__all__ = ["patch", "patched", "is_patched", "calibrate", "MappingSigmoid", "__version__", "LampeConfig", "Plan", "Region", "plan", "mapping_length", "rope", "attention",
           "reference", "available_isas", "set_cpu_isa", "show_config", "DEFAULT_TEMPERATURE", "PRESETS"]
