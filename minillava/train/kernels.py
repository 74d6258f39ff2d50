"""How a training step runs its arithmetic: the autocast precision, and SDPA's attention kernel on a CPU.

The LLM steps (loop.py) and the projector-only warm start (warmstart.py) both run under these.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch


def autocast_ctx(precision: str, device: torch.device) -> AbstractContextManager:
    """Autocast to bf16 / fp16 for `precision` "bf16" / "fp16"; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# Up to this many tokens a row, SDPA's math kernel trains faster on a CPU than its flash kernel, whose backward has a
# fixed cost per call: forward + backward of bf16 attention, 9 heads of 64, causal mask, 2 cores of an AMX Xeon,
# math / flash time: 0.46 at 16 x 32 tokens, 0.42 at 16 x 51 (the demo's rows), 0.57 at 8 x 128, 1.17 at 8 x 192,
# 1.25 at 4 x 260, 3.3 at 2 x 768 (and math's memory grows with the square of the length)
MATH_ATTENTION_MAX_TOKENS = 128


def attention_kernel(device: torch.device, tokens: int) -> AbstractContextManager:
    """SDPA's kernel for a training step over rows of `tokens` tokens: on a CPU the math kernel for short rows
    (its backward is a few matmuls; the demo's LoRA steps went from ~2.9 to ~2.3 s), else SDPA's own choice."""
    if device.type != "cpu" or tokens > MATH_ATTENTION_MAX_TOKENS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
