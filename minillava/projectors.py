"""Projector registry: patch features (B, P, Dv) -> image tokens (B, N, Dl).

Every projector says how many tokens it emits for a patch grid (`num_tokens`), so the processor derives
the count of `<image>` placeholders from the projector instead of hard-coding it, and which patches each
token comes from (`token_to_patch_weights`), so attention on image tokens can be drawn back on the picture.
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

    def token_to_patch_weights(
        self, grid: tuple[int, int], extra_tokens: int = 0, features: torch.Tensor | None = None
    ) -> torch.Tensor:  # (N, R*C)
        """How much of image token n comes from patch p (row-major): each row of a patch-derived token sums
        to 1; rows of kept CLS/register tokens are 0, as they sit nowhere on the grid.

        The default is one token per patch, in the order the tower emits them (prefix tokens first). A
        projector that overrides `num_tokens` overrides this too. Geometric ones ignore `features`; an
        input-dependent one (a Perceiver resampler) computes the map from the patch features (1, P, Dv) of
        the image being shown: its last layer's latent-to-patch attention, averaged over heads and
        renormalised over the patch keys (the latents also attend to themselves), and raises without them.
        """
        patches = grid[0] * grid[1]
        return torch.cat([torch.zeros(extra_tokens, patches), torch.eye(patches)])


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

    def token_to_patch_weights(
        self, grid: tuple[int, int], extra_tokens: int = 0, features: torch.Tensor | None = None
    ) -> torch.Tensor:  # (R*C/k^2, R*C)
        self.num_tokens(grid, extra_tokens)  # refuses CLS tokens
        return block_weights(grid, self.pool)


@register("pixel_shuffle")
class PixelShuffleProjector(Projector):
    """nanoVLM's modality projector: space-to-depth r x r of the patch grid, then one linear map (no bias, as
    nanoVLM). r = 2 turns a 16 x 16 grid of Dv-wide patches into 64 tokens of width 4 * Dv: fewer, wider
    tokens that keep every feature, where avgpool averages them away."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: tuple[int, int], factor: int = 2) -> None:
        super().__init__()
        if grid[0] % factor or grid[1] % factor:
            raise ValueError(f"pixel_shuffle: patch grid {grid[0]}x{grid[1]} does not divide by factor {factor}")
        self.grid, self.factor = tuple(grid), factor
        self.proj = nn.Linear(vision_dim * factor**2, llm_dim, bias=False)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        if extra_tokens:
            raise ValueError("pixel_shuffle regroups the patch grid only: use select_feature='patch' (no CLS token)")
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, R*C, Dv) -> (B, R*C/r^2, Dl)
        return self.proj(self.shuffle(x))

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:  # (B, R*C, Dv) -> (B, R*C/r^2, r*r*Dv)
        """Token (i, j) of the (R/r, C/r) output grid holds patches (r*i + a, r*j + b), a, b < r, concatenated
        in row-major (a, b) order: the r x r block it covers, and nothing else."""
        b, p, d = x.shape
        (rows, cols), r = self.grid, self.factor
        if p != rows * cols:
            raise ValueError(f"pixel_shuffle: got {p} patch features, expected a {rows}x{cols} grid")
        x = x.reshape(b, rows // r, r, cols // r, r, d)  # (B, R/r, a, C/r, b, Dv)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, R/r, C/r, a, b, Dv)
        return x.reshape(b, (rows // r) * (cols // r), r * r * d)

    def token_to_patch_weights(
        self, grid: tuple[int, int], extra_tokens: int = 0, features: torch.Tensor | None = None
    ) -> torch.Tensor:  # (R*C/r^2, R*C)
        self.num_tokens(grid, extra_tokens)  # refuses CLS tokens
        return block_weights(grid, self.factor)


def block_weights(grid: tuple[int, int], k: int) -> torch.Tensor:  # (R*C/k^2, R*C)
    """Token (i, j) of the (R/k, C/k) grid covers the k x k block of patches under it, each with weight 1/k^2."""
    rows, cols = grid
    patch_row = torch.arange(rows).repeat_interleave(cols)  # (R*C,) row of each row-major patch
    patch_col = torch.arange(cols).repeat(rows)
    patch_token = (patch_row // k) * (cols // k) + patch_col // k  # (R*C,) the token each patch falls in
    weights = torch.zeros((rows // k) * (cols // k), rows * cols)
    weights[patch_token, torch.arange(rows * cols)] = 1.0 / k**2
    return weights


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
