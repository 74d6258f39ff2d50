"""Projector registry: patch features (B, P, Dv) -> image tokens (B, N, Dl).

Every projector says how many tokens it emits for a patch grid (`num_tokens`), so the processor derives
the count of `<image>` placeholders from the projector instead of hard-coding it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from minillava.resampler import PerceiverResampler

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


@register("avgpool")
class AvgPoolProjector(Projector):
    """k x k average pooling of the patch grid, then the 2-layer MLP (LLaVA-NeXT's pooler, MobileVLM's LDPv2
    idea): k = 2 turns a 16 x 16 grid into 64 tokens while keeping the grid's geometry."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: tuple[int, int], pool: int = 2) -> None:
        super().__init__()
        if grid[0] % pool or grid[1] % pool:
            raise ValueError(f"avgpool: patch grid {grid[0]}x{grid[1]} does not divide by pool size {pool}")
        self.grid, self.pool = tuple(grid), pool
        self.mlp = MLPProjector(vision_dim, llm_dim)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        if extra_tokens:
            raise ValueError("avgpool pools the patch grid only: use select_feature='patch' (no CLS token)")
        return (grid[0] // self.pool) * (grid[1] // self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, R*C, Dv) -> (B, R*C/k^2, Dl)
        b, p, d = x.shape
        rows, cols = self.grid
        if p != rows * cols:
            raise ValueError(f"avgpool: got {p} patch features, expected a {rows}x{cols} grid")
        x = x.transpose(1, 2).reshape(b, d, rows, cols)  # (B, Dv, R, C)
        x = nn.functional.avg_pool2d(x, self.pool)  # (B, Dv, R/k, C/k)
        return self.mlp(x.flatten(2).transpose(1, 2))  # row-major tokens, like the patches


@register("perceiver")
class PerceiverProjector(Projector):
    """Flamingo's Perceiver resampler at the vision width, then a linear map to the LLM width: any number of
    patches (CLS included) becomes `num_latents` tokens."""

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        num_latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.resampler = PerceiverResampler(vision_dim, depth, heads, dim_head, num_latents, ff_mult)
        self.linear = nn.Linear(vision_dim, llm_dim)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        return self.resampler.num_latents

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, L, Dl)
        return self.linear(self.resampler(x))


def build_projector(name: str, vision_dim: int, llm_dim: int, grid: tuple[int, int], **options: object) -> Projector:
    """`grid` is the tower's (rows, cols) patch grid; projectors that reduce tokens need its geometry."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; available: {', '.join(sorted(PROJECTORS))}")
    cls = PROJECTORS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self", "vision_dim", "llm_dim", "grid"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"projector {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}"
        )
    if "grid" in params:
        options["grid"] = grid
    return cls(vision_dim, llm_dim, **options)
