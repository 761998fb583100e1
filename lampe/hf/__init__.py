"""transformers integration: ``lampe.patch(model)`` (needs torch and transformers)."""
from .patching import LampeHandle, default_config, is_patched, mapping_preset, patch, patched, pretrained_window

__all__ = ["patch", "patched", "is_patched", "LampeHandle", "default_config", "pretrained_window", "mapping_preset"]
