"""lampe's cache directory, shared by the evaluation texts and the downloaded models."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$LAMPE_CACHE`` if set, else ``$XDG_CACHE_HOME/lampe``, else ``~/.cache/lampe``, joined
    with ``parts``. Nothing is created here; writers make the directories they need."""
    root = os.environ.get("LAMPE_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lampe"
    return base.joinpath(*parts)
