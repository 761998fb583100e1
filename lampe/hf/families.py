"""The model families lampe.patch serves, and what it does in each (one table, read by patch(),
describe() and docs/patching.md)."""
from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    name: str
    layout: str = "half"          # rotary pairing: "half" (rotate_half) or "interleaved"
    local_layers: bool = False    # sliding-window layers are part of the design: they keep their own attention
    min_version: tuple = (4, 57)  # oldest transformers whose attention classes use the attention interface
    note: str = ""


FAMILIES = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", note="sliding window (when configured) must be turned off: disable_sliding_window=True"),
    "mixtral": Family("Mixtral", note="sliding window (when configured) must be turned off: disable_sliding_window=True"),
    "qwen2": Family("Qwen2", note="use_sliding_window=True, when set, must be turned off: disable_sliding_window=True"),
    "qwen2_moe": Family("Qwen2-MoE", min_version=(5, 0),
                        note="transformers 4.57's Qwen2-MoE attention calls torch's sdpa directly"),
    "qwen3": Family("Qwen3", note="use_sliding_window=True, when set, must be turned off: disable_sliding_window=True"),
    "qwen3_moe": Family("Qwen3-MoE"),
    "phi3": Family("Phi-3", note="longrope: LaMPE uses the short (in-window) factors"),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma 2", local_layers=True,
                     note="sliding layers keep their own attention; global layers use LaMPE with the model's "
                          "attention-logit soft-capping"),
    "gemma3_text": Family("Gemma 3", local_layers=True,
                          note="sliding layers keep their own attention and local rotary base; global layers use "
                               "LaMPE with the global rotary base"),
    "gpt_neox": Family("GPT-NeoX / Pythia", note="partial rotary (rotary_pct / partial_rotary_factor)"),
    "stablelm": Family("StableLM", min_version=(5, 0), note="partial rotary (partial_rotary_factor)"),
    "cohere": Family("Cohere", layout="interleaved", note="interleaved rotary pairs"),
    "olmo2": Family("OLMo 2"),
    "granite": Family("Granite", note="attention_multiplier is the attention scale"),
    "starcoder2": Family("StarCoder2", note="sliding window (when configured) must be turned off: "
                                            "disable_sliding_window=True"),
}

UNSUPPORTED = {
    "gemma3": "the multimodal Gemma 3 wrapper (patch its language model, a Gemma3ForCausalLM)",
    "llama4": "NoPE layers (layers without rotary embeddings) and chunked attention",
    "smollm3": "NoPE layers (layers without rotary embeddings)",
    "phi": "its attention module's own partial-rotary layout",
    "gptj": "its attention module (interleaved rotary outside the attention interface)",
    "qwen3_next": "linear-attention layers and partial rotary embeddings",
}

#: Rope types whose in-window frequencies lampe knows; W comes from original_max_position_embeddings
#: for the scaled ones.
ROPE_TYPES = ("default", "llama3", "yarn", "linear", "dynamic", "longrope")
SCALED_ROPE_TYPES = ("yarn", "linear", "dynamic", "longrope")
