"""`minillava viz`: does the LLM look at the picture, and where? (attention.py computes, plots.py draws)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minillava.viz.attention import SpliceAttention, Visualization, XattnAttention, eager_attention, visualize
    from minillava.viz.plots import write_visualization

__all__ = ["SpliceAttention", "Visualization", "XattnAttention", "eager_attention", "visualize", "write_visualization"]

# Loaded on first use (PEP 562): attention.py imports torch, and the CLI imports `minillava.viz.cli` (and with it
# this package) just to build its parser.
_HOME = {name: "minillava.viz.attention" for name in __all__} | {"write_visualization": "minillava.viz.plots"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
