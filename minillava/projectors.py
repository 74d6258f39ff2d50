"""Projector registry: patch features (B, P, Dv) -> image tokens (B, N, Dl).

Every projector says how many tokens it emits for a patch grid (`num_tokens`), so the processor derives
the count of `<image>` placeholders from the projector instead of hard-coding it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PROJECTORS: dict[str, type[Projector]] = {}


def register(name: str) -> Callable[[type[Projector]], type[Projector]]:
    def wrap(cls: type[Projector]) -> type[Projector]:
        PROJECTORS[name] = cls
        cls.name = name
        return cls

    return wrap


class Projector(nn.Module):
    name = "base"

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        """Tokens out for a (rows, cols) patch grid plus `extra_tokens` (CLS/registers kept)."""
        return grid[0] * grid[1] + extra_tokens


@register("linear")
class LinearProjector(Projector):
    """LLaVA-1.0: one linear map."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, P, Dl)
        return self.linear(x)


@register("mlp2x_gelu")
class MLPProjector(Projector):
    """LLaVA-1.5: Linear -> GELU -> Linear."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, P, Dl)
        return self.linear_2(self.act(self.linear_1(x)))


def build_projector(name: str, vision_dim: int, llm_dim: int, **options: object) -> Projector:
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; available: {', '.join(sorted(PROJECTORS))}")
    return PROJECTORS[name](vision_dim, llm_dim, **options)
