"""lampe: Length-aware Multi-grained Positional Encoding (LaMPE) for RoPE LLMs, with C kernels.

    >>> import lampe
    >>> p = lampe.plan(32768, lampe.LampeConfig(mapping_length="llama3"))
    >>> p.sink_size, p.bias_map, p.bias_sink
"""
from ._version import __version__
from . import _C
from .config import DEFAULT_TEMPERATURE, PRESETS, LampeConfig, mapping_length
from .positions import Plan, Region, plan
from .rotary import rope
from .attention import attention
from . import reference
from .info import available_isas, set_cpu_isa, show_config

__all__ = ["__version__", "LampeConfig", "Plan", "Region", "plan", "mapping_length", "rope", "attention",
           "reference", "available_isas", "set_cpu_isa", "show_config", "DEFAULT_TEMPERATURE", "PRESETS"]
