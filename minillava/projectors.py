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
    """Every projector first standardises its input per feature channel, (x - mean) / std. The statistics are
    identity (0, 1) until `set_feature_stats` fits them to a data set's vision features (the trainer's
    `--standardize-features`). Why: a frozen tower's patch features share a large common component (DINOv2-S:
    per-channel offsets up to 2.7 against 0.18 of between-image spread), so an MLP on the raw features sees
    nearly the same input for every image and learns what differs between pictures slowly. Measured on the
    demo's captions: standardised inputs cut the caption loss 6.9 -> 1.5 in 30 steps where raw ones reached
    4.8, and it told the images apart (loss with the images shuffled: 3.5 against 1.5; raw: 5.0 against 4.8)."""

    name = "base"

    def __init__(self, vision_dim: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(vision_dim))  # (Dv,)
        self.register_buffer("feature_std", torch.ones(vision_dim))  # (Dv,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, N, Dl)
        return self.project(self.standardize(x))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, P, Dv)
        return (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, N, Dl), standardised input
        raise NotImplementedError

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fit the input standardisation: per-channel mean and std (Dv,) of the vision features."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(f"feature stats of shape {tuple(mean.shape)} for a {self.feature_mean.numel()}-wide input")
        if not bool((std > 0).all()):
            raise ValueError("feature stats: every channel's std must be > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    @property
    def standardizes(self) -> bool:
        """Whether the input standardisation is fitted (not the identity)."""
        return bool(self.feature_mean.any() or (self.feature_std != 1).any())

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
        super().__init__(vision_dim)
        self.linear = nn.Linear(vision_dim, llm_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, P, Dl)
        return self.linear(x)


class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear: LLaVA-1.5's projector body, also behind the poolers."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, Din) -> (B, P, Dout)
        return self.linear_2(self.act(self.linear_1(x)))


@register("mlp2x_gelu")
class MLPProjector(Projector):
    """LLaVA-1.5: Linear -> GELU -> Linear. The layers sit at the top level (not in a GeluMLP) so the weight
    names are transformers Llava's `multi_modal_projector.linear_1/linear_2`."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__(vision_dim)
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    project = GeluMLP.forward  # (B, P, Dv) -> (B, P, Dl): the same three layers, by the same names


@register("avgpool")
class AvgPoolProjector(Projector):
    """k x k average pooling of the patch grid, then the 2-layer MLP (LLaVA-NeXT's pooler, MobileVLM's LDPv2
    idea): k = 2 turns a 16 x 16 grid into 64 tokens while keeping the grid's geometry."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: tuple[int, int], pool: int = 2) -> None:
        super().__init__(vision_dim)
        if grid[0] % pool or grid[1] % pool:
            raise ValueError(f"avgpool: patch grid {grid[0]}x{grid[1]} does not divide by pool size {pool}")
        self.grid, self.pool = tuple(grid), pool
        self.mlp = GeluMLP(vision_dim, llm_dim)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        if extra_tokens:
            raise ValueError("avgpool pools the patch grid only: use select_feature='patch' (no CLS token)")
        return (grid[0] // self.pool) * (grid[1] // self.pool)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (B, R*C, Dv) -> (B, R*C/k^2, Dl)
        p = x.shape[1]
        rows, cols = self.grid
        if p != rows * cols:
            raise ValueError(f"avgpool: got {p} patch features, expected a {rows}x{cols} grid")
        return self.mlp(average_blocks(x, self.grid, self.pool))

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
        super().__init__(vision_dim)
        if grid[0] % factor or grid[1] % factor:
            raise ValueError(f"pixel_shuffle: patch grid {grid[0]}x{grid[1]} does not divide by factor {factor}")
        self.grid, self.factor = tuple(grid), factor
        self.proj = nn.Linear(vision_dim * factor**2, llm_dim, bias=False)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        if extra_tokens:
            raise ValueError("pixel_shuffle regroups the patch grid only: use select_feature='patch' (no CLS token)")
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (B, R*C, Dv) -> (B, R*C/r^2, Dl)
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


def average_blocks(x: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:  # (B, R*C, D) -> (B, R*C/k^2, D)
    """The mean of each k x k block of a row-major patch grid, as row-major tokens (the blocks of `block_weights`)."""
    rows, cols = grid
    x = x.transpose(1, 2).unflatten(-1, (rows, cols))  # (B, D, R, C)
    return nn.functional.avg_pool2d(x, k).flatten(2).transpose(1, 2)


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
    patches (CLS included) becomes `num_latents` tokens. `pool` k > 1 first averages each k x k block of the
    patch grid (kept CLS/register tokens pass as they are), so the latents read fewer, less noisy keys: on the
    demo's DINOv2-S 8 x 8 grid a 2 x 2 pool lifted the projector's Fashion-MNIST reading 79.9 -> 82.6 % and
    its new-image slots 98.5 -> 98.8 % (seed 0, docs/training.md), with a quarter of the keys.

    `layout_rank` r > 0 adds a second reading, by position: the (pooled) grid, flattened, through a rank-r
    linear map to the L x Dl tokens, added to the latents' tokens (zero at the start). Why: a latent reads a
    softmax-weighted mean of the patches, so it sees *what* is in the picture wherever it is (the synthetic
    scenes' objects move about) but not *where* on the grid each feature sits, which is what tells a shirt
    from a T-shirt on aligned Fashion-MNIST pictures: a linear probe reads 88 % of their classes from the
    4 x 4 grid and 83 % from the demo's latents. Linear and low-rank, it cannot learn the training scenes'
    layouts by heart as an MLP on the flattened grid does (unseen colour-shape pairs 93.5 -> 88.3 %).
    The demo's rank 32 lifted the trained model's Fashion-MNIST answers from 77.4 to 83.6 % (seed 0, 1000 test
    images; seeds 1 / 2: 82.7 / 85.4 %) with the synthetic splits within a run's spread (docs/training.md)."""

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        grid: tuple[int, int],
        num_latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        pool: int = 1,
        layout_rank: int = 0,
    ) -> None:
        super().__init__(vision_dim)
        if pool < 1 or grid[0] % pool or grid[1] % pool:
            raise ValueError(f"perceiver: patch grid {grid[0]}x{grid[1]} does not divide by pool size {pool}")
        if layout_rank < 0:
            raise ValueError(f"perceiver: layout_rank must be 0 (off) or more, got {layout_rank}")
        self.grid, self.pool = tuple(grid), pool
        self.resampler = PerceiverResampler(vision_dim, depth, heads, dim_head, num_latents, ff_mult)
        self.linear = nn.Linear(vision_dim, llm_dim)
        self.num_keys = grid[0] * grid[1] // pool**2  # K: the pooled grid's positions
        self.layout = None
        if layout_rank:
            self.layout = nn.Sequential(  # (B, K*Dv) -> (B, r) -> (B, L*Dl)
                nn.Linear(self.num_keys * vision_dim, layout_rank, bias=False),
                nn.Linear(layout_rank, num_latents * llm_dim),
            )
            nn.init.zeros_(self.layout[1].weight)  # starts as the plain perceiver
            nn.init.zeros_(self.layout[1].bias)

    def num_tokens(self, grid: tuple[int, int], extra_tokens: int = 0) -> int:
        return self.resampler.num_latents

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (B, E+P, Dv) -> (B, L, Dl)
        media = self.pool_patches(x)  # (B, E+K, Dv)
        tokens = self.linear(self.resampler(media))  # (B, L, Dl): what is in the picture
        if self.layout is None:
            return tokens
        grid = media[:, self.extra_tokens(x) :].flatten(1)  # (B, K*Dv): the grid in row-major order, CLS left out
        return tokens + self.layout(grid).unflatten(-1, tokens.shape[1:])  # + where it sits

    def pool_patches(self, x: torch.Tensor) -> torch.Tensor:  # (B, E+R*C, Dv) -> (B, E+R*C/k^2, Dv)
        if self.pool == 1:
            return x
        extra = self.extra_tokens(x)
        return torch.cat([x[:, :extra], average_blocks(x[:, extra:], self.grid, self.pool)], dim=1)

    def extra_tokens(self, x: torch.Tensor) -> int:  # (B, E+R*C, Dv) -> E
        """How many kept CLS/register tokens come before the patch grid; fewer features than the grid: an error."""
        rows, cols = self.grid
        extra = x.shape[1] - rows * cols
        if extra < 0:
            raise ValueError(f"perceiver: got {x.shape[1]} patch features, expected a {rows}x{cols} grid")
        return extra

    def token_to_patch_weights(
        self, grid: tuple[int, int], extra_tokens: int = 0, features: torch.Tensor | None = None
    ) -> torch.Tensor:  # (L, R*C)
        """Latent n's attention in the resampler's last layer, averaged over heads, over the patch keys only and
        renormalised there: its keys on the latents (self-attention) and on kept CLS/register tokens sit nowhere
        on the grid. The last layer is the one whose reading the latents hand on; earlier layers are left out.
        With `pool`, a key is a k x k block: its attention spreads evenly over the block's patches. The
        `layout_rank` reading is not drawn: it reads every position of the grid, each through its own weights."""
        patches = grid[0] * grid[1]
        if features is None or features.dim() != 3 or features.shape[:2] != (1, extra_tokens + patches):
            got = None if features is None else tuple(features.shape)
            raise ValueError(
                f"perceiver: token_to_patch_weights needs one image's features (1, {extra_tokens + patches}, Dv), "
                f"got {got}"
            )
        media = self.pool_patches(self.standardize(features))  # (1, E+K, Dv)
        _, maps = self.resampler(media, return_attention=True)  # (depth, 1, H, L, E+K+L)
        on_keys = maps[-1, 0, :, :, extra_tokens : extra_tokens + self.num_keys].float().mean(0)  # (L, K)
        return (on_keys / on_keys.sum(-1, keepdim=True)) @ block_weights(grid, self.pool)


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
