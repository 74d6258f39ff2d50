"""`minillava viz`: does the LLM look at the picture, and where? (attention.py computes, plots.py draws)."""

from minillava.viz.attention import Visualization, eager_attention, visualize
from minillava.viz.plots import write_visualization

__all__ = ["Visualization", "eager_attention", "visualize", "write_visualization"]
