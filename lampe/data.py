"""Deprecated: the evaluation texts moved to :mod:`lampe.eval.texts` (removal in the next release).

``book``, ``austen``, ``text_file``, ``available``, ``BOOKS`` and ``AUSTEN`` still resolve here
with a DeprecationWarning. The R serialization reader that lived here (``unserialize``,
``read_rds``, ``read_rda``, ``read_lazyload_db``, ``RObject``) is gone: use the ``rdata`` library.
"""
import warnings

_MOVED = ("BOOKS", "AUSTEN", "book", "austen", "text_file", "available")


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(f"lampe.data.{name} moved to lampe.eval.texts.{name}; lampe.data will be removed",
                      DeprecationWarning, stacklevel=2)
        from .eval import texts
        return getattr(texts, name)
    raise AttributeError(f"module 'lampe.data' has no attribute {name!r} (evaluation texts are in lampe.eval.texts; "
                         f"R files are read with the rdata library)")
