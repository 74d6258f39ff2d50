"""Perceiver resampler (Flamingo / OpenFlamingo): a fixed number of learned latents read any number of patches.

    patches (I, P, Dv) + latents (L, Dv) --depth x [latents attend to [patches; latents], FFN]--> (I, L, Dv)

The latents also attend to themselves (keys and values are the concatenation of media and latents), so
they can share what they read. The layer layout, pre-LayerNorms and bias-free projections follow
OpenFlamingo's `PerceiverResampler`; the temporal embeddings for video frames are left out (one image is one
frame here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """OpenFlamingo's pre-norm FFN without biases; shared by the resampler and the gated xattn blocks."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # (I, P, D), (I, L, D) -> (I, L, D)
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)  # (I, L, H*Dh)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # (I, P+L, H*Dh) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (I, H, *, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (I, H, L, Dh)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(
        self, dim: int, depth: int = 2, heads: int = 8, dim_head: int = 64, num_latents: int = 64, ff_mult: int = 4
    ) -> None:
        super().__init__()
        if min(depth, heads, dim_head, num_latents, ff_mult) < 1:
            raise ValueError("perceiver: depth, heads, dim_head, num_latents and ff_mult must all be at least 1")
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, media: torch.Tensor) -> torch.Tensor:  # (I, P, D) -> (I, L, D)
        latents = self.latents.expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
