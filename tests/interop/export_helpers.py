"""What the export tests share: greedy tokens through minillava's own decode loop, and a relative error."""

from __future__ import annotations

import torch

from minillava.generate import GenerationConfig, decode, stop_token_ids
from minillava.processor import Encoded, Processor


def greedy_tokens(model: torch.nn.Module, processor: Processor, batch: list[Encoded], n: int) -> list[list[int]]:
    """The token ids `generate.decode` picks for each row, greedy, up to n (after a stop, the pad id)."""
    cfg = GenerationConfig(max_new_tokens=n)
    steps = decode(model, processor.collate(batch, "left"), cfg, stop_token_ids(processor), processor.pad_token_id)
    return torch.stack([token for token, _ in steps], dim=1).tolist()


def relative_error(got, expected) -> float:
    """The largest absolute difference over the largest |expected| (torch tensors or numpy arrays)."""
    return float(abs(got - expected).max() / abs(expected).max())
