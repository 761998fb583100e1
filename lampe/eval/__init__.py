"""Evaluation: passkey retrieval, needle in a haystack, RULER-style synthetic tasks and perplexity
beyond the pretrained window, for the original model, RoPE-scaling baselines, SelfExtend, ReRoPE
and LaMPE, through one harness (``python -m lampe eval``)."""
from .calibrate import calibrate, fit_sigmoid
from .methods import METHODS, apply
from .runner import load_records, markdown, overview, plots, run_grid, summarize

__all__ = ["calibrate", "fit_sigmoid", "METHODS", "apply", "run_grid", "summarize", "markdown", "plots",
           "load_records", "overview"]
