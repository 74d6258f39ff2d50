"""Keep what the LLM knew: text-only rows learn the base LLM's own next-token distribution (--distill-text).

Visual instruction tuning moves the LLM; text-only samples (e.g. the base model's answers to text prompts, as
the demo replays) pull it back. Trained as plain next-token targets they pass on one token per position; as
soft targets they pass on the base model's whole distribution there, which holds far more of what it knew.
With LoRA the teacher costs no memory: it is the same LLM with its adapters switched off, one forward of the
text rows (no backward) per micro-batch that has any.

    text rows (R, T) --LLM, adapters off, no grad--> hidden (R, T, D) --supervised positions--> log p_base (n, V)
    loss at those positions = KL(p_base || p_model); rows with images keep cross-entropy with their labels
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from minillava.model import MiniLlava, SoftTargets
from minillava.processor import IGNORE_INDEX


@contextlib.contextmanager
def adapters_off(llm: nn.Module) -> Iterator[None]:
    """The base LLM for the duration: every LoRA layer skips its adapter. peft's own `enable_adapters(False)`
    also turns the adapters' requires_grad off and its re-enable turns every adapter's back on, frozen or not:
    the flag alone leaves what trains untouched."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in llm.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("distilling from the base LLM needs LoRA adapters (--lora/--qlora): the teacher is the LLM "
                         "with them switched off")  # fmt: skip
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before, strict=True):
            m._disable_adapters = flag


def text_teacher(model: MiniLlava, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, weight: float = 1.0) -> SoftTargets | None:  # fmt: skip
    """The base LLM's log-probabilities at the supervised positions of the rows without an image, their KL
    weighted by `weight`; None when every row has one (or no text row has a supervised token)."""
    rows = ~(input_ids == model.config.image_token_id).any(dim=1)  # (B,)
    keep = labels[rows][:, 1:] != IGNORE_INDEX  # (R, T-1)
    if not bool(keep.any()):
        return None
    with torch.no_grad(), adapters_off(model.llm):
        hidden = model(input_ids[rows], attention_mask[rows], return_logits=False, return_hidden=True).hidden
        # the vocabulary projection at the supervised positions only, as the student's loss does: a text row's
        # logits at every position were (R, T, 49k) floats, ~40 % of a step that had text rows
        logits = model.lm_head(hidden[:, :-1][keep])  # (n, V)
    return SoftTargets(rows, F.log_softmax(logits.float(), dim=-1), weight)  # (n, V)
