"""The module lmms-eval's plugin hook imports for `--model minillava` (see `minillava.eval.lmms_adapter`)."""

from minillava.eval.lmms_adapter import MiniLlavaLMMS

__all__ = ["MiniLlavaLMMS"]
