"""transformers integration: ``lampe.patch(model)`` (needs torch and transformers)."""
from .describe import describe
from .patching import (LampeHandle, default_config, is_patched, mapping_preset, patch, patched, pretrained_window,
                       resolve_config)

__all__ = ["patch", "patched", "is_patched", "describe", "LampeHandle", "default_config", "resolve_config",
           "pretrained_window", "mapping_preset"]
